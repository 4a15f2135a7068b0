"""The device's update decisions as a pure state machine: `step(state, event) -> (state, actions)`.

No I/O, no clock, no randomness: the agent (agent.py) turns what it hears and what happens into
events, saves the persisted part of the new state before it performs the actions, and feeds the
outcome of each action back as the next event. Every decision of the agent lives here, so every
path is a few lines of unit test (tests/unit/test_machine.py, with hypothesis over event sequences).

    Started ─┬─ a switch journal that moved something (or is rolling back) ─► RollBack ─► RolledBack ─┬─► ROLLED_BACK
             │      (an unconfirmed switch: tried again, max_attempts in all) ─► Verify(pending, resuming) ◄┘
             ├─ pending in CONFIRMING with no readable journal ─► RollBack (to the installed bytes)
             └─ pending in another phase (a journal that moved nothing is cleared) ─► Verify(pending, resuming)
    ReleaseHeard ──► Verify(raw)
    ReleaseVerified ─┬─ already installed ────────────────────────► IDLE (once)
                     ├─ this sequence was rolled back here ───────► ROLLED_BACK (once)
                     ├─ staged, this device not admitted ─────────► WAITING (once per version)
                     └─ otherwise ─► RunUpdate ─► PhaseEntered … ─┬─ UpdateSucceeded ─► ClearSwitch, KeepReleases, DONE
                                                                  └─ UpdateFailed ─┬─ retryable ─► FAILED + ScheduleRetry ─► RetryDue ─► Verify(pending)
                                                                                   └─ otherwise ─► FAILED | REFUSED | ROLLED_BACK
    ReleaseRefused ──► REFUSED (kept for a timestamp when that is all it lacks)
    TimestampAccepted ──► Verify(last release) if it waited for one | IDLE if the device was FROZEN
    FreshnessLost ──► FROZEN (once; not while an update is pending)
    RootAccepted ──► floors a revoked role may have raised are dropped
    AdmissionReceived ──► Verify(last release) | CheckRequested ──► Verify(last release)
    InternalError (a bug met while handling a message) ──► FAILED, and the agent goes on

The persisted part is `LocalState` (state.json): each phase is recorded in `pending` before the
phase starts (Mender's rule), so after a power cut `Started` resumes in the right place. The slot
switch has its own journal (switch.py), cleared (`ClearSwitch`) only once state.json records the
outcome; a release of what is installed already moves no floor unless a timestamp vouches for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from device_client.local_state import LocalState, PendingUpdate
from device_client.switch import SwitchRecord, SwitchStep
from schemas.errors import ReasonCode
from schemas.models import Phase, ReleaseManifest, Role
from services.runtime.trust import Admission, rollout_admits

__all__ = [
    "Action", "AdmissionReceived", "AgentState", "CheckRequested", "Event", "FreshnessLost", "InternalError",
    "ClearSwitch", "KeepReleases", "MachineConfig",
    "PhaseEntered", "ReleaseHeard", "ReleaseRefused", "ReleaseVerified", "Report", "RetryDue", "RollBack",
    "RolledBack", "RootAccepted", "RunUpdate", "ScheduleRetry", "Started", "StatusRequested",
    "TimestampAccepted", "TrustDocumentRefused", "UpdateFailed", "UpdateSucceeded", "Verify", "step",
]


# -- state ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MachineConfig:
    device_id: str
    max_attempts: int = 3
    retry_interval: float = 30.0


@dataclass(frozen=True)
class Reported:
    """The last transition reported: what the once-only rules and a status request look at."""

    phase: Phase
    target_version: str | None


@dataclass(frozen=True)
class AgentState:
    local: LocalState  # persisted (state.json); the agent saves it whenever a step changes it
    last_release: bytes | None = None  # the class's release as last heard, signed bytes
    frozen: bool = False
    awaits_timestamp: bool = False  # the last release was refused only for want of a fresh timestamp
    running: ReleaseManifest | None = None  # the verified release a RunUpdate is installing now
    rolling_back: bool = False  # RollBackUnconfirmed was emitted and its outcome has not arrived
    reported: Reported | None = None

    @property
    def updating(self) -> bool:
        return self.running is not None or self.rolling_back


# -- events ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Started:
    """The agent is connected and listening; `local` was loaded from disk, and with it what the
    switch journal holds (`switch`, or `switch_unreadable`) and the hash of the bytes active now."""

    switch: SwitchRecord | None = None
    switch_unreadable: bool = False
    active_sha256: str | None = None
    problems: tuple[tuple[ReasonCode, str], ...] = ()  # found at start (state.json rebuilt, an unsafe install dir)


@dataclass(frozen=True)
class ReleaseHeard:
    raw: bytes


@dataclass(frozen=True)
class ReleaseVerified:
    """The trust core accepted `raw` for this device (signatures, freshness, class, rollback)."""

    manifest: ReleaseManifest
    raw: bytes
    payload_sha256: str  # of the signed payload: what an admission names
    resuming: bool = False
    vouched: bool = False  # a fresh timestamp names it (always so, unless it is what is installed already)


@dataclass(frozen=True)
class ReleaseRefused:
    code: ReasonCode
    reason: str
    awaits_timestamp: bool = False  # refused only because no fresh timestamp names it yet
    resuming: bool = False


@dataclass(frozen=True)
class TrustDocumentRefused:
    """A root, timestamp or command that the trust core or the parser refused."""

    code: ReasonCode
    reason: str


@dataclass(frozen=True)
class TimestampAccepted:
    version: int


@dataclass(frozen=True)
class RootAccepted:
    version: int
    revoked_roles: frozenset[Role] = frozenset()


@dataclass(frozen=True)
class FreshnessLost:
    code: ReasonCode
    reason: str


@dataclass(frozen=True)
class AdmissionReceived:
    """An install command: admits the staged release it names (the release must still verify)."""

    admission: Admission


@dataclass(frozen=True)
class CheckRequested:
    pass


@dataclass(frozen=True)
class StatusRequested:
    pass


@dataclass(frozen=True)
class PhaseEntered:
    """The running update is about to start `phase` (downloading, verifying, patching, installing, confirming)."""

    phase: Phase
    target_version: str
    progress: int


@dataclass(frozen=True)
class UpdateSucceeded:
    manifest: ReleaseManifest
    figures: dict[str, Any] = field(default_factory=dict)  # traffic and timing for the DONE report


@dataclass(frozen=True)
class UpdateFailed:
    manifest: ReleaseManifest
    code: ReasonCode
    reason: str
    phase: Phase = Phase.FAILED  # REFUSED: the bytes were wrong; ROLLED_BACK: installed, then undone
    retryable: bool = False
    figures: dict[str, Any] = field(default_factory=dict)
    spent: bool = True  # counts against max_attempts; False: nothing was tried (no room yet): wait, for ever


@dataclass(frozen=True)
class RetryDue:
    pass


@dataclass(frozen=True)
class SubscriptionsRefused:
    """The broker refused subscriptions this device needs (its SUBACK said so): a gap in what the
    device hears, said beside its phase until a retry is granted."""

    reason: str


@dataclass(frozen=True)
class SubscriptionsGranted:
    """Every subscription refused before has now been granted."""


@dataclass(frozen=True)
class InternalError:
    """A bug met while handling a message: reported, and the agent goes on."""

    reason: str


@dataclass(frozen=True)
class RolledBack:
    """The switch in `record` was undone at start (`problem`: what the rollback reported, if it failed)."""

    record: SwitchRecord
    problem: str | None = None


Event = (
    Started | ReleaseHeard | ReleaseVerified | ReleaseRefused | TrustDocumentRefused | TimestampAccepted | RootAccepted
    | FreshnessLost | AdmissionReceived | CheckRequested | StatusRequested | PhaseEntered | UpdateSucceeded
    | UpdateFailed | RetryDue | RolledBack | InternalError | SubscriptionsRefused | SubscriptionsGranted
)


# -- actions --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    phase: Phase
    target_version: str | None = None
    reason: str | None = None
    reason_code: ReasonCode | None = None
    progress: int | None = None
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Verify:
    """Hand `raw` to the trust core; its verdict comes back as ReleaseVerified or ReleaseRefused."""

    raw: bytes
    resuming: bool = False


@dataclass(frozen=True)
class RunUpdate:
    """Fetch, verify, patch, install and confirm a verified release (the Updater)."""

    manifest: ReleaseManifest
    installed_sha256: str


@dataclass(frozen=True)
class KeepReleases:
    """After a committed install: keep the newest releases for peers, let go of the rest (before DONE
    is reported, so that what a device serves matches what it said)."""

    installed_sequence: int


@dataclass(frozen=True)
class ScheduleRetry:
    seconds: float


@dataclass(frozen=True)
class RollBack:
    """Undo a switch that was never confirmed healthy (found at start): the one `record` describes,
    or, with no readable journal, the pending release's (`envelope`) back to the installed bytes."""

    record: SwitchRecord | None
    envelope: str | None = None


@dataclass(frozen=True)
class ClearSwitch:
    """state.json now agrees with the active bytes: the switch journal can go."""


Action = Report | Verify | RunUpdate | KeepReleases | ScheduleRetry | RollBack | ClearSwitch


# -- the transition function ----------------------------------------------------------------------


def step(state: AgentState, event: Event, config: MachineConfig) -> tuple[AgentState, list[Action]]:
    """The next state and what to do, for one event. Pure: the same inputs give the same outputs."""
    match event:
        case Started():
            return _started(state, event)
        case ReleaseHeard(raw=raw) if raw == state.last_release and _refused_last(state):
            # The same bytes again, from the broker (a reconnect) or a peer, after this release failed
            # or was refused for good: nothing it depends on changed (a new timestamp, an admission, a
            # check or a retry each re-verify it), so it must not start a second attempt.
            return state, []
        case ReleaseHeard(raw=raw):
            state = replace(state, last_release=raw)
            return (state, []) if state.updating else (state, [Verify(raw)])
        case ReleaseVerified():
            return _verified(state, event, config)
        case ReleaseRefused():
            return _refused(state, event)
        case TrustDocumentRefused(code=code, reason=reason):
            return _report(state, Report(Phase.REFUSED, reason=reason, reason_code=code))
        case TimestampAccepted(version=version):
            return _timestamp(state, version)
        case RootAccepted(revoked_roles=revoked):
            local = state.local
            if Role.TIMESTAMP in revoked:  # fast-forward recovery: floors a revoked key pushed up are dropped
                local = local.model_copy(update={"timestamp_version": 0})
            if Role.RELEASE in revoked:
                local = local.model_copy(update={"last_sequence": 0})
            return replace(state, local=local), []
        case FreshnessLost(code=code, reason=reason):
            if state.frozen or state.local.pending is not None:
                return state, []
            return _report(replace(state, frozen=True), Report(Phase.FROZEN, reason=reason, reason_code=code))
        case AdmissionReceived(admission=admission):
            state = replace(state, local=state.local.model_copy(update={
                "approved_sequence": admission.sequence, "approved_release_sha256": admission.release_sha256}))
            return state, _reverify_last(state)
        case CheckRequested() if state.last_release is not None:
            return state, [] if state.updating else [Verify(state.last_release)]
        case CheckRequested() | StatusRequested() | SubscriptionsGranted():
            return state, [_last_report(state)]
        case SubscriptionsRefused(reason=reason):
            # Not a phase of its own: an update under way goes on (what it needs is already heard), and
            # the phase stays what the fleet service counts; the reason says what the device may miss.
            return state, [replace(_last_report(state), reason=reason, reason_code=ReasonCode.BROKER_ERROR)]
        case InternalError(reason=reason):
            return _report(state, Report(Phase.FAILED, reason=reason, reason_code=ReasonCode.INTERNAL_ERROR))
        case PhaseEntered(phase=phase, target_version=target, progress=progress):
            pending = state.local.pending
            if pending is None or state.running is None or state.running.version != target:
                return state, []  # not the update under way: nothing to record
            local = state.local.model_copy(update={"pending": pending.model_copy(update={"phase": phase})})
            return _report(replace(state, local=local), Report(phase, target_version=target, progress=progress))
        case UpdateSucceeded() | UpdateFailed() if event.manifest != state.running:
            return state, []  # only the outcome of the update under way counts
        case UpdateSucceeded():
            return _succeeded(state, event)
        case UpdateFailed():
            return _failed(state, event, config)
        case RetryDue():
            pending = state.local.pending
            if pending is None or state.updating:
                return state, []
            return state, [Verify(pending.envelope.encode(), resuming=True)]
        case RolledBack() if not state.rolling_back:
            return state, []
        case RolledBack():
            return _rolled_back(state, event, config)
    raise TypeError(f"not an event: {event!r}")


def _started(state: AgentState, event: Started) -> tuple[AgentState, list[Action]]:
    """Finish what a cut interrupted before anything else: a switch that moved (or may have) is
    rolled back; one that moved nothing is forgotten and the update resumes."""
    actions: list[Action] = []
    for code, reason in event.problems:
        state, said = _report(state, Report(Phase.FAILED, reason=reason, reason_code=code))
        actions += said
    local, pending, record = state.local, state.local.pending, event.switch
    if record is not None:
        nothing_moved = record.step == SwitchStep.SWITCHING and (
            event.active_sha256 == local.installed_sha256 if record.install.handler != "command" else pending is None)
        if not nothing_moved:  # the rollback reports; nothing is said before the old version is back
            return replace(state, rolling_back=True), [*actions, RollBack(record)]
        actions.append(ClearSwitch())
    elif pending is not None and (pending.phase == Phase.CONFIRMING or (
            event.switch_unreadable and pending.phase == Phase.INSTALLING)):
        return replace(state, rolling_back=True), [*actions, RollBack(None, pending.envelope)]
    elif event.switch_unreadable:
        actions.append(ClearSwitch())
    state, idle = _report(state, Report(Phase.IDLE))  # "idle" means listening
    actions += idle
    if pending is None:
        return state, actions
    return state, [*actions, Verify(pending.envelope.encode(), resuming=True)]


def _rolled_back(state: AgentState, event: RolledBack, config: MachineConfig) -> tuple[AgentState, list[Action]]:
    """A switch undone at start. A restart before the health check answered says nothing against the
    release (a power cut, most often), so the update is tried again, up to `max_attempts` in all like a
    boot counter: a version that itself kills the device during its check is given up after that."""
    record, pending = event.record, state.local.pending
    # SWITCHING: found at start; ROLLING_BACK for that same reason: that rollback was itself cut short.
    interrupted = record.step == SwitchStep.SWITCHING or record.reason_code == ReasonCode.UNCONFIRMED_RESTART
    attempts = (pending.attempts if pending is not None else 0) + 1
    retrying = interrupted and pending is not None and event.problem is None and attempts < config.max_attempts
    if retrying:
        assert pending is not None
        local = state.local.model_copy(update={"pending": pending.model_copy(update={"attempts": attempts,
                                                                                     "phase": Phase.DOWNLOADING})})
    else:
        local = state.local.model_copy(update={
            "pending": None, "rolled_back_sequence": max(state.local.rolled_back_sequence, record.sequence)})
    if interrupted:
        reason, code = f"restarted before {record.version} was confirmed healthy", ReasonCode.UNCONFIRMED_RESTART
    else:
        reason = record.reason or f"{record.version} was being rolled back"
        code = record.reason_code or ReasonCode.ROLLED_BACK
    reason += f"; rolled back to {local.installed_version}"
    if event.problem:
        reason += f" (the rollback reported: {event.problem})"
    if retrying:
        reason += f"; retry {attempts + 1} of {config.max_attempts}"
    state, actions = _report(replace(state, local=local, rolling_back=False),
                             Report(Phase.ROLLED_BACK, target_version=record.version, reason=reason, reason_code=code,
                                    figures={"retrying": True} if retrying else {}))
    if event.problem:
        return state, actions
    if retrying:
        assert pending is not None
        return state, [*actions, ClearSwitch(), Verify(pending.envelope.encode(), resuming=True)]
    return state, [*actions, ClearSwitch()]


def _refused_last(state: AgentState) -> bool:
    reported = state.reported
    return (reported is not None and reported.phase in (Phase.FAILED, Phase.REFUSED)
            and not state.awaits_timestamp)


def _verified(state: AgentState, event: ReleaseVerified, config: MachineConfig) -> tuple[AgentState, list[Action]]:
    m, local = event.manifest, state.local
    state = replace(state, awaits_timestamp=False)
    if state.updating:
        return state, []
    if m.sequence == local.rolled_back_sequence and m.artifact.installed_sha256 != local.installed_sha256:
        if state.reported is not None and state.reported.phase == Phase.ROLLED_BACK:
            return state, []  # said once; the retained release is heard again at every reconnect
        return _report(state, Report(Phase.ROLLED_BACK, target_version=m.version, reason_code=ReasonCode.ROLLED_BACK,
                                     reason=f"sequence {m.sequence} was rolled back here; waiting for a newer release"))
    if m.artifact.installed_sha256 == local.installed_sha256:
        # Floors move only with the timestamp role's vouching: the release role alone could otherwise
        # push last_sequence to 2^53 with a manifest of the installed bytes, and refuse every later release.
        raise_floor = event.vouched and m.sequence > local.last_sequence
        changed = raise_floor or local.pending is not None
        if changed:
            updates: dict[str, Any] = {"pending": None}
            if raise_floor:
                updates |= {"last_sequence": m.sequence, "installed_version": m.version}
            state = replace(state, local=local.model_copy(update=updates))
        last = state.reported.phase if state.reported else None
        if changed or last not in (Phase.IDLE, Phase.DONE):
            return _report(state, Report(Phase.IDLE))  # a retained DONE report (and its figures) stays in place
        return state, []
    admission = Admission(local.approved_sequence, local.approved_release_sha256) if local.approved_release_sha256 else None
    if local.pending is None and not rollout_admits(m, event.payload_sha256, config.device_id, admission):
        last = state.reported
        if last is not None and last.phase == Phase.WAITING and last.target_version == m.version:
            return state, []
        return _report(state, Report(Phase.WAITING, target_version=m.version, reason_code=ReasonCode.AWAITING_ROLLOUT,
                                     reason=f"{m.version} is rolled out in waves: waiting for an install command"))
    attempts = local.pending.attempts if local.pending is not None else 0
    pending = PendingUpdate(envelope=event.raw.decode(), phase=Phase.DOWNLOADING, attempts=attempts)
    state = replace(state, running=m, local=local.model_copy(update={"pending": pending}))
    return state, [RunUpdate(m, local.installed_sha256)]


def _refused(state: AgentState, event: ReleaseRefused) -> tuple[AgentState, list[Action]]:
    state = replace(state, awaits_timestamp=event.awaits_timestamp)
    if event.resuming:  # the pending release no longer verifies (expired, revoked): drop it
        state = replace(state, local=state.local.model_copy(update={"pending": None}))
    return _report(state, Report(Phase.REFUSED, reason=event.reason, reason_code=event.code))


def _timestamp(state: AgentState, version: int) -> tuple[AgentState, list[Action]]:
    local = state.local.model_copy(update={"timestamp_version": max(state.local.timestamp_version, version)})
    state = replace(state, local=local, frozen=False)
    if state.last_release is not None and local.pending is None and state.awaits_timestamp and not state.updating:
        return state, [Verify(state.last_release)]  # held back for want of a timestamp: maybe this one names it
    if state.reported is not None and state.reported.phase == Phase.FROZEN:
        return _report(state, Report(Phase.IDLE))
    return state, []


def _succeeded(state: AgentState, event: UpdateSucceeded) -> tuple[AgentState, list[Action]]:
    m = event.manifest
    local = state.local.model_copy(update={
        "installed_version": m.version, "installed_sha256": m.artifact.installed_sha256,
        "last_sequence": max(state.local.last_sequence, m.sequence), "pending": None,
    })
    state, done = _report(replace(state, local=local, running=None),
                          Report(Phase.DONE, target_version=m.version, progress=100, figures=event.figures))
    return state, [ClearSwitch(), KeepReleases(m.sequence), *done]


def _failed(state: AgentState, event: UpdateFailed, config: MachineConfig) -> tuple[AgentState, list[Action]]:
    m, local = event.manifest, state.local
    pending = local.pending
    attempts = (pending.attempts if pending else 0) + event.spent
    retrying = event.retryable and pending is not None and attempts < config.max_attempts
    reason = event.reason
    updates: dict[str, Any] = {}
    if event.phase == Phase.ROLLED_BACK:
        updates["rolled_back_sequence"] = m.sequence
    actions: list[Action] = []
    if retrying:
        assert pending is not None
        updates["pending"] = pending.model_copy(update={"attempts": attempts})
        reason = (f"{reason}; retry {attempts + 1} of {config.max_attempts} in {config.retry_interval:.0f} s" if event.spent
                  else f"{reason}; checking again in {config.retry_interval:.0f} s")
        actions.append(ScheduleRetry(config.retry_interval))
    else:
        updates["pending"] = None
    state = replace(state, local=local.model_copy(update=updates), running=None)
    figures = {**event.figures, **({"retrying": True} if retrying else {})}
    state, reports = _report(state, Report(event.phase, target_version=m.version, reason=reason, reason_code=event.code,
                                           figures=figures))
    return state, [*reports, ClearSwitch(), *actions]


def _reverify_last(state: AgentState) -> list[Action]:
    if state.last_release is None or state.local.pending is not None or state.updating:
        return []
    return [Verify(state.last_release)]


def _last_report(state: AgentState) -> Report:
    """The last phase reported, said again (idle before any)."""
    last = state.reported
    return Report(last.phase if last else Phase.IDLE, target_version=last.target_version if last else None)


def _report(state: AgentState, report: Report) -> tuple[AgentState, list[Action]]:
    """Report a transition. Every refusal and failure is reported, even one like the last (each is a
    message somebody sent); the states that repeat by themselves are reported once (`_verified`)."""
    return replace(state, reported=Reported(report.phase, report.target_version)), [report]
