"""The device's update state machine (device_client.machine), without I/O.

One test per decision, then hypothesis over arbitrary event sequences for the rules that must
hold whatever arrives: no update without a verified release, one update at a time, bounded
retries, floors that only a root revocation lowers, and states that repeat by themselves (idle,
waiting, rolled back, frozen) reported once.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from device_client import machine as m
from device_client.local_state import LocalState, PendingUpdate
from device_client.switch import SwitchRecord, SwitchStep
from schemas.errors import ReasonCode
from schemas.models import Artifact, InstallSpec, Phase, ReleaseManifest, Role, RolloutRule
from services.runtime.trust import Admission
from tests.support.factories import manifest

SHA_V1 = "1" * 64
CONFIG = m.MachineConfig(device_id="dev-1", max_attempts=3, retry_interval=30.0)


def release(sequence: int, version: str, sha: str, *, staged: bool = False) -> ReleaseManifest:
    artifact = Artifact(cid="Qm" + "a" * 44, sha256=sha, size=1000)
    rollout = RolloutRule(canary_percent=0, salt="0123456789abcdef") if staged else None
    return manifest(sequence=sequence, version=version, artifact=artifact, rollout=rollout)


V2 = release(2, "2.0.0", "2" * 64)
V3 = release(3, "3.0.0", "3" * 64)
V1_AGAIN = release(1, "1.0.0", SHA_V1)
STAGED = release(4, "4.0.0", "4" * 64, staged=True)
RAW_BY_VERSION = {"2.0.0": b"raw-v2", "3.0.0": b"raw-v3", "1.0.0": b"raw-v1", "4.0.0": b"raw-v4"}


def raw(r: ReleaseManifest) -> bytes:
    return RAW_BY_VERSION[r.version]


def fresh(**local: object) -> m.AgentState:
    return m.AgentState(local=LocalState(installed_version="1.0.0", installed_sha256=SHA_V1, **local))


def run(state: m.AgentState, *events: m.Event) -> tuple[m.AgentState, list[m.Action]]:
    actions: list[m.Action] = []
    for event in events:
        state, new = m.step(state, event, CONFIG)
        actions.extend(new)
    return state, actions


def reports(actions: list[m.Action]) -> list[m.Report]:
    return [a for a in actions if isinstance(a, m.Report)]


def digest(r: ReleaseManifest) -> str:
    return hashlib.sha256(raw(r)).hexdigest()


def verified(r: ReleaseManifest, resuming: bool = False, vouched: bool = True) -> m.ReleaseVerified:
    return m.ReleaseVerified(r, raw(r), digest(r), resuming=resuming, vouched=vouched)


def switch(r: ReleaseManifest, step: SwitchStep = SwitchStep.SWITCHING, handler: str = "ab") -> SwitchRecord:
    install = InstallSpec(handler=handler, target=r.install.target, command=["cp"] if handler == "command" else None)
    return SwitchRecord(sequence=r.sequence, version=r.version, install=install, old_sha256=SHA_V1,
                        new_sha256=r.artifact.installed_sha256, back_to="a", step=step,
                        reason="health check failed" if step != SwitchStep.SWITCHING else None,
                        reason_code="health_check_failed" if step != SwitchStep.SWITCHING else None)


# -- one decision each ----------------------------------------------------------------------------


def test_start_reports_idle_and_resumes_a_pending_update_by_verifying_it_again() -> None:
    pending = PendingUpdate(envelope="raw-v2", phase=Phase.DOWNLOADING)
    _, actions = run(fresh(pending=pending), m.Started())
    assert actions == [m.Report(Phase.IDLE), m.Verify(b"raw-v2", resuming=True)]


def test_start_in_confirming_without_a_journal_rolls_back_to_the_installed_bytes_and_tries_again() -> None:
    pending = PendingUpdate(envelope="raw-v2", phase=Phase.CONFIRMING)
    state, actions = run(fresh(pending=pending), m.Started())
    assert actions == [m.RollBack(None, "raw-v2")], "nothing is reported before the old version is back"
    state, actions = run(state, m.RolledBack(switch(V2)))
    assert state.local.installed_version == "1.0.0" and state.local.rolled_back_sequence == 0
    assert state.local.pending == PendingUpdate(envelope="raw-v2", phase=Phase.DOWNLOADING, attempts=1)
    said = reports(actions)[0]
    assert said.reason_code == ReasonCode.UNCONFIRMED_RESTART and said.figures == {"retrying": True}
    assert "retry 2 of 3" in (said.reason or "")
    assert actions[-2:] == [m.ClearSwitch(), m.Verify(b"raw-v2", resuming=True)]


def test_an_update_cut_before_its_check_every_time_is_given_up_after_max_attempts() -> None:
    """Like a boot counter: a version that kills the device during its own health check is not
    retried for ever; the third unconfirmed restart leaves the device on its working version."""
    state = fresh(pending=PendingUpdate(envelope="raw-v2", phase=Phase.CONFIRMING))
    for attempt in range(1, 4):
        state = replace(state, local=state.local.model_copy(update={
            "pending": state.local.pending.model_copy(update={"phase": Phase.CONFIRMING})}))
        state, _ = run(state, m.Started(switch=switch(V2), active_sha256=V2.artifact.installed_sha256))
        state, actions = run(state, m.RolledBack(switch(V2)))
        if attempt < 3:
            assert state.local.pending is not None and state.local.pending.attempts == attempt
            assert m.Verify(b"raw-v2", resuming=True) in actions
    assert state.local.pending is None and state.local.rolled_back_sequence == 2
    assert not [a for a in actions if isinstance(a, m.Verify)] and actions[-1] == m.ClearSwitch()
    assert reports(actions)[0].figures == {} and "retry" not in (reports(actions)[0].reason or "")


def test_a_switch_that_moved_is_rolled_back_at_start_whatever_phase_state_json_recorded() -> None:
    """The cut between the switch and saving `confirming`: the target holds the new bytes, state.json
    still says installing. The new version was never confirmed healthy: it is not committed."""
    for phase in (Phase.INSTALLING, Phase.CONFIRMING):
        pending = PendingUpdate(envelope="raw-v2", phase=phase)
        started = m.Started(switch=switch(V2), active_sha256=V2.artifact.installed_sha256)
        state, actions = run(fresh(pending=pending), started)
        assert actions == [m.RollBack(switch(V2))] and state.rolling_back
        state, actions = run(state, m.RolledBack(switch(V2)))
        assert state.local.installed_sha256 == SHA_V1 and state.local.pending.attempts == 1
        assert [r.phase for r in reports(actions)] == [Phase.ROLLED_BACK]
        assert actions[-2:] == [m.ClearSwitch(), m.Verify(b"raw-v2", resuming=True)], "tried again, from the start"


def test_a_switch_that_moved_nothing_is_forgotten_and_the_install_resumes() -> None:
    pending = PendingUpdate(envelope="raw-v2", phase=Phase.INSTALLING)
    _, actions = run(fresh(pending=pending), m.Started(switch=switch(V2), active_sha256=SHA_V1))
    assert actions == [m.ClearSwitch(), m.Report(Phase.IDLE), m.Verify(b"raw-v2", resuming=True)]


def test_a_rollback_cut_short_is_finished_at_start_with_its_reason() -> None:
    record = switch(V2, SwitchStep.ROLLING_BACK)
    pending = PendingUpdate(envelope="raw-v2", phase=Phase.CONFIRMING)
    for active in (SHA_V1, V2.artifact.installed_sha256, None):  # before, after the link moved, unreadable
        state, actions = run(fresh(pending=pending), m.Started(switch=record, active_sha256=active))
        assert actions == [m.RollBack(record)]
        state, actions = run(state, m.RolledBack(record))
        assert reports(actions)[0].reason_code == ReasonCode.HEALTH_CHECK_FAILED
        assert state.local.rolled_back_sequence == 2 and state.local.installed_sha256 == SHA_V1


def test_the_rollback_of_an_unconfirmed_restart_cut_short_is_finished_and_the_update_tried_again() -> None:
    record = switch(V2, SwitchStep.ROLLING_BACK).model_copy(update={
        "reason": "unconfirmed restart", "reason_code": ReasonCode.UNCONFIRMED_RESTART})
    state, actions = run(fresh(pending=PendingUpdate(envelope="raw-v2", phase=Phase.CONFIRMING)),
                         m.Started(switch=record, active_sha256=V2.artifact.installed_sha256))
    assert actions == [m.RollBack(record)]
    state, actions = run(state, m.RolledBack(record))
    assert reports(actions)[0].reason_code == ReasonCode.UNCONFIRMED_RESTART and state.local.rolled_back_sequence == 0
    assert actions[-1] == m.Verify(b"raw-v2", resuming=True)


def test_a_rollback_that_fails_keeps_its_journal_for_the_next_start() -> None:
    state, _ = run(fresh(pending=PendingUpdate(envelope="raw-v2", phase=Phase.CONFIRMING)),
                   m.Started(switch=switch(V2), active_sha256=None))
    _, actions = run(state, m.RolledBack(switch(V2), problem="disk error"))
    assert m.ClearSwitch() not in actions and "disk error" in (reports(actions)[0].reason or "")


def test_a_committed_switch_whose_journal_outlived_the_commit_is_forgotten() -> None:
    state = m.AgentState(local=LocalState(installed_version="2.0.0", installed_sha256=V2.artifact.installed_sha256))
    _, actions = run(state, m.Started(switch=switch(V2), active_sha256=V2.artifact.installed_sha256))
    assert actions == [m.ClearSwitch(), m.Report(Phase.IDLE)]


def test_problems_found_at_start_are_reported_before_anything_else() -> None:
    _, actions = run(fresh(), m.Started(problems=((ReasonCode.STATE_RESET, "state.json rebuilt"),)))
    assert [(r.phase, r.reason_code) for r in reports(actions)] == [(Phase.FAILED, ReasonCode.STATE_RESET),
                                                                    (Phase.IDLE, None)]


def test_a_heard_release_is_verified_before_anything_else() -> None:
    state, actions = run(fresh(), m.ReleaseHeard(b"raw-v2"))
    assert actions == [m.Verify(b"raw-v2")] and state.last_release == b"raw-v2"


def test_a_verified_release_runs_the_update_and_persists_it_as_pending_first() -> None:
    state, actions = run(fresh(), verified(V2))
    assert actions == [m.RunUpdate(V2, SHA_V1)]
    assert state.local.pending is not None and state.local.pending.envelope == "raw-v2"
    assert state.running == V2


def test_phases_are_recorded_and_reported_and_success_commits_the_new_version() -> None:
    state, _ = run(fresh(), verified(V2))
    state, actions = run(state, m.PhaseEntered(Phase.INSTALLING, "2.0.0", 95))
    assert state.local.pending is not None and state.local.pending.phase == Phase.INSTALLING
    assert reports(actions) == [m.Report(Phase.INSTALLING, target_version="2.0.0", progress=95)]
    state, actions = run(state, m.UpdateSucceeded(V2, figures={"used_delta": True}))
    assert (state.local.installed_version, state.local.installed_sha256, state.local.last_sequence) == ("2.0.0", "2" * 64, 2)
    assert state.local.pending is None and state.running is None
    assert reports(actions)[0].phase == Phase.DONE and reports(actions)[0].figures == {"used_delta": True}
    assert actions.index(m.KeepReleases(2)) < actions.index(reports(actions)[0]), "serving settled before DONE is said"
    assert actions[0] == m.ClearSwitch(), "the journal goes once state.json holds the commit"


def test_a_refused_subscription_is_said_beside_the_phase_and_cleared_when_granted() -> None:
    """The broker refusing a subscription is no update outcome: an update under way goes on, the phase
    the fleet service counts stays, and the reason says what the device may not hear."""
    state, _ = run(fresh(), verified(V2), m.PhaseEntered(Phase.DOWNLOADING, "2.0.0", 10))
    after, actions = run(state, m.SubscriptionsRefused("the broker refused the subscription to f1/cmd (Not authorized)"))
    assert after == state
    assert actions == [m.Report(Phase.DOWNLOADING, target_version="2.0.0", reason_code=ReasonCode.BROKER_ERROR,
                                reason="the broker refused the subscription to f1/cmd (Not authorized)")]
    after, actions = run(state, m.SubscriptionsGranted())
    assert after == state and actions == [m.Report(Phase.DOWNLOADING, target_version="2.0.0")]
    _, actions = run(fresh(), m.SubscriptionsRefused("refused"))
    assert [(r.phase, r.reason_code) for r in reports(actions)] == [(Phase.IDLE, ReasonCode.BROKER_ERROR)]


def test_a_fetch_failure_is_retried_a_bounded_number_of_times_then_given_up() -> None:
    state, _ = run(fresh(), verified(V2))
    retries = 0
    for _ in range(10):
        state, actions = run(state, m.UpdateFailed(V2, ReasonCode.SLOW_RETRIEVAL, "stalled", retryable=True))
        if not any(isinstance(a, m.ScheduleRetry) for a in actions):
            break
        retries += 1
        state, actions = run(state, m.RetryDue())
        assert actions == [m.Verify(b"raw-v2", resuming=True)]
        state, _ = run(state, verified(V2, resuming=True))
    assert retries == CONFIG.max_attempts - 1
    assert state.local.pending is None and reports(actions)[0].phase == Phase.FAILED


def test_waiting_for_room_on_the_disk_spends_no_attempt_and_goes_on_until_there_is_room() -> None:
    """Nothing was fetched or written: the device checks again every retry_interval, for ever,
    and an attempt that then fails on the way still counts (and is still bounded)."""
    state, _ = run(fresh(), verified(V2))
    for _ in range(3 * CONFIG.max_attempts):
        state, actions = run(state, m.UpdateFailed(V2, ReasonCode.DISK_FULL, "no room", retryable=True, spent=False))
        said = reports(actions)[0]
        assert said.reason_code == ReasonCode.DISK_FULL and "checking again" in (said.reason or "")
        assert m.ScheduleRetry(CONFIG.retry_interval) in actions and state.local.pending.attempts == 0
        state, _ = run(state, m.RetryDue(), verified(V2, resuming=True))
    state, actions = run(state, m.UpdateFailed(V2, ReasonCode.DISK_FULL, "ran out", retryable=True))
    assert state.local.pending.attempts == 1 and "retry 2 of" in (reports(actions)[0].reason or "")


def test_a_rolled_back_release_is_not_retried_and_said_once() -> None:
    state, _ = run(fresh(), verified(V2))
    state, _ = run(state, m.UpdateFailed(V2, ReasonCode.HEALTH_CHECK_FAILED, "unhealthy", phase=Phase.ROLLED_BACK))
    assert state.local.rolled_back_sequence == 2
    state, actions = run(state, verified(V2), verified(V2))
    assert not any(isinstance(a, m.RunUpdate) for a in actions)
    assert len(reports(actions)) == 0  # the failure report already said ROLLED_BACK
    state, actions = run(state, verified(V3))
    assert actions == [m.RunUpdate(V3, SHA_V1)]


def test_a_staged_release_waits_for_its_admission_and_says_so_once() -> None:
    state, actions = run(fresh(), m.ReleaseHeard(raw(STAGED)), verified(STAGED), verified(STAGED))
    waiting = [r for r in reports(actions) if r.phase == Phase.WAITING]
    assert len(waiting) == 1 and waiting[0].reason_code == ReasonCode.AWAITING_ROLLOUT
    assert not any(isinstance(a, m.RunUpdate) for a in actions)
    state, actions = run(state, m.AdmissionReceived(Admission(4, digest(STAGED))))
    assert actions == [m.Verify(raw(STAGED))] and state.local.approved_sequence == 4
    _, actions = run(state, verified(STAGED))
    assert isinstance(actions[0], m.RunUpdate)


def test_an_admission_admits_only_the_release_it_names_by_hash() -> None:
    """An install command for a forged (or any other) release with the same sequence admits nothing."""
    state, _ = run(fresh(), m.ReleaseHeard(raw(STAGED)), m.AdmissionReceived(Admission(4, "f" * 64)))
    _, actions = run(state, verified(STAGED))
    assert not any(isinstance(a, m.RunUpdate) for a in actions)
    assert [r.phase for r in reports(actions)] == [Phase.WAITING]


def test_the_installed_release_heard_again_says_idle_once() -> None:
    state, actions = run(fresh(), verified(V1_AGAIN))
    assert reports(actions) == [m.Report(Phase.IDLE)] and state.local.last_sequence == 1
    _, actions = run(state, verified(V1_AGAIN))
    assert actions == []


def test_a_release_of_the_installed_bytes_moves_no_floor_without_a_timestamp() -> None:
    """The release role alone (no timestamp names it) cannot push the sequence floor up."""
    huge = release(2**53, "1.0.0", SHA_V1)
    state, actions = run(fresh(), m.ReleaseVerified(huge, b"raw-huge", "e" * 64, vouched=False))
    assert state.local.last_sequence == 0 and reports(actions) == [m.Report(Phase.IDLE)]
    state, _ = run(state, m.ReleaseVerified(huge, b"raw-huge", "e" * 64, vouched=True))
    assert state.local.last_sequence == 2**53


def test_every_refusal_is_reported_even_when_it_repeats() -> None:
    refused = m.ReleaseRefused(ReasonCode.BAD_SIGNATURE, "bad signature")
    _, actions = run(fresh(), refused, refused)
    assert [r.reason_code for r in reports(actions)] == [ReasonCode.BAD_SIGNATURE] * 2


def test_a_pending_release_that_no_longer_verifies_is_dropped() -> None:
    pending = PendingUpdate(envelope="raw-v2", phase=Phase.DOWNLOADING, attempts=1)
    state, _ = run(fresh(pending=pending), m.ReleaseRefused(ReasonCode.EXPIRED, "expired", resuming=True))
    assert state.local.pending is None


def test_a_release_held_for_a_timestamp_is_verified_again_when_one_arrives() -> None:
    state, _ = run(fresh(), m.ReleaseHeard(b"raw-v2"), m.ReleaseRefused(ReasonCode.TIMESTAMP_MISMATCH, "not named",
                                                                           awaits_timestamp=True))
    state, actions = run(state, m.TimestampAccepted(5))
    assert actions == [m.Verify(b"raw-v2")] and state.local.timestamp_version == 5


def test_frozen_is_reported_once_and_cleared_by_a_fresh_timestamp() -> None:
    lost = m.FreshnessLost(ReasonCode.FROZEN, "no fresh timestamp")
    state, actions = run(fresh(), lost, lost)
    assert [r.phase for r in reports(actions)] == [Phase.FROZEN]
    state, actions = run(state, m.TimestampAccepted(1))
    assert reports(actions) == [m.Report(Phase.IDLE)] and not state.frozen


def test_freshness_is_not_judged_while_an_update_is_pending() -> None:
    state, _ = run(fresh(), verified(V2))
    _, actions = run(state, m.FreshnessLost(ReasonCode.FROZEN, "no fresh timestamp"))
    assert actions == []


def test_a_root_that_revokes_a_role_drops_the_floor_that_role_raised() -> None:
    state = fresh(last_sequence=9, timestamp_version=7)
    state, _ = run(state, m.RootAccepted(2, frozenset({Role.RELEASE})))
    assert (state.local.last_sequence, state.local.timestamp_version) == (0, 7)
    state, _ = run(state, m.RootAccepted(3, frozenset({Role.TIMESTAMP})))
    assert state.local.timestamp_version == 0


def test_outcomes_of_an_update_not_under_way_change_nothing() -> None:
    state = fresh()
    after, actions = run(state, m.UpdateSucceeded(V2), m.UpdateFailed(V2, ReasonCode.IO_ERROR, "x"),
                         m.PhaseEntered(Phase.INSTALLING, "2.0.0", 95), m.RolledBack(switch(V2)))
    assert after == state and actions == []


# -- properties over arbitrary event sequences ----------------------------------------------------

MANIFESTS = [V2, V3, V1_AGAIN, STAGED]
manifests = st.sampled_from(MANIFESTS)
codes = st.sampled_from(list(ReasonCode))
records = st.builds(switch, manifests, st.sampled_from(list(SwitchStep)), st.sampled_from(["file", "ab", "command"]))
starts = st.one_of(
    st.just(m.Started()),
    st.builds(m.Started, switch=records, active_sha256=st.sampled_from([SHA_V1, "2" * 64, None])),
    st.just(m.Started(switch_unreadable=True)),
)
events = st.one_of(
    starts,
    manifests.map(lambda r: m.ReleaseHeard(raw(r))),
    st.builds(verified, manifests, st.booleans(), st.booleans()),
    st.builds(m.ReleaseRefused, codes, st.just("refused"), st.booleans(), st.booleans()),
    st.builds(m.TrustDocumentRefused, codes, st.just("refused")),
    st.builds(m.TimestampAccepted, st.integers(0, 20)),
    st.builds(m.RootAccepted, st.integers(2, 9), st.frozensets(st.sampled_from([Role.RELEASE, Role.TIMESTAMP]))),
    st.builds(m.FreshnessLost, st.just(ReasonCode.FROZEN), st.just("stale")),
    st.builds(m.AdmissionReceived, st.builds(Admission, st.integers(1, 5),
                                             st.sampled_from([digest(STAGED), digest(V2), "f" * 64]))),
    st.just(m.CheckRequested()),
    st.just(m.StatusRequested()),
    st.builds(m.PhaseEntered, st.sampled_from([Phase.DOWNLOADING, Phase.VERIFYING, Phase.PATCHING, Phase.INSTALLING,
                                               Phase.CONFIRMING]), manifests.map(lambda r: r.version), st.integers(0, 100)),
    st.builds(m.UpdateSucceeded, manifests),
    st.builds(m.UpdateFailed, manifests, codes, st.just("failed"),
              st.sampled_from([Phase.FAILED, Phase.REFUSED, Phase.ROLLED_BACK]), st.booleans()),
    st.just(m.RetryDue()),
    st.builds(m.RolledBack, records, st.sampled_from([None, "disk error"])),
    st.just(m.InternalError("bug")),
    st.just(m.SubscriptionsRefused("refused")),
    st.just(m.SubscriptionsGranted()),
)
pendings = st.one_of(st.none(), st.builds(PendingUpdate, envelope=st.sampled_from(["raw-v2", "raw-v3"]),
                                          phase=st.sampled_from([Phase.DOWNLOADING, Phase.INSTALLING,
                                                                 Phase.CONFIRMING]),
                                          attempts=st.integers(0, 2)))


@settings(max_examples=400, deadline=None)
@given(pending=pendings, sequence=st.lists(events, max_size=40))
def test_rules_that_hold_for_every_sequence_of_events(pending: PendingUpdate | None, sequence: list[m.Event]) -> None:
    state = fresh(pending=pending, last_sequence=1, timestamp_version=1)
    retries_since_start = 0
    for event in sequence:
        before = state
        state, actions = m.step(state, event, CONFIG)
        assert m.step(before, event, CONFIG) == (state, actions), "step is a function of its inputs"
        runs = [a for a in actions if isinstance(a, m.RunUpdate)]
        # Never installs without a verified manifest, and one update at a time.
        for action in runs:
            assert isinstance(event, m.ReleaseVerified) and action.manifest == event.manifest
            assert not before.updating
            assert action.installed_sha256 == before.local.installed_sha256
        if runs:
            assert state.local.pending is not None and state.local.pending.envelope == raw(runs[0].manifest).decode()
        # A staged release nobody admitted (by sequence and hash) does not start by itself.
        if runs and runs[0].manifest.rollout is not None and before.local.pending is None:
            assert before.local.approved_sequence == runs[0].manifest.sequence
            assert before.local.approved_release_sha256 == digest(runs[0].manifest)
        # A switch found at start that moved something is rolled back before anything else happens.
        if isinstance(event, m.Started) and event.switch is not None and not before.updating and (
                event.switch.step != SwitchStep.SWITCHING or event.active_sha256 != before.local.installed_sha256):
            if event.switch.install.handler != "command" or before.local.pending is not None \
                    or event.switch.step != SwitchStep.SWITCHING:
                assert actions == [*(a for a in actions if isinstance(a, m.Report) and a.phase == Phase.FAILED),
                                   m.RollBack(event.switch)]
        # The installed version changes only by the success of the update under way.
        if state.local.installed_sha256 != before.local.installed_sha256:
            assert isinstance(event, m.UpdateSucceeded) and event.manifest == before.running
            assert state.local.installed_sha256 == event.manifest.artifact.installed_sha256
        # The sequence floor rises only by a committed update or a release a timestamp vouches for.
        if state.local.last_sequence > before.local.last_sequence:
            assert isinstance(event, m.UpdateSucceeded) or (isinstance(event, m.ReleaseVerified) and event.vouched)
        # Floors go down only by a root revoking the role that raised them.
        if state.local.last_sequence < before.local.last_sequence:
            assert isinstance(event, m.RootAccepted) and Role.RELEASE in event.revoked_roles
        if state.local.timestamp_version < before.local.timestamp_version:
            assert isinstance(event, m.RootAccepted) and Role.TIMESTAMP in event.revoked_roles
        # What the broker grants or refuses is said, and changes nothing the machine decides.
        if isinstance(event, (m.SubscriptionsRefused, m.SubscriptionsGranted)):
            assert state == before and [type(a) for a in actions] == [m.Report]
        # Retries are bounded by max_attempts.
        if any(isinstance(a, m.ScheduleRetry) for a in actions):
            retries_since_start += 1
            assert state.local.pending is not None and state.local.pending.attempts < CONFIG.max_attempts
        if isinstance(event, (m.UpdateSucceeded, m.UpdateFailed)) and before.running == event.manifest:
            assert state.running is None
            retried = any(isinstance(a, m.ScheduleRetry) for a in actions)
            assert (state.local.pending is not None) == retried
    assert retries_since_start <= len(sequence)


@settings(max_examples=300, deadline=None)
@given(prefix=st.lists(events, max_size=25), again=st.sampled_from([*(verified(r) for r in MANIFESTS),
                                                                     m.FreshnessLost(ReasonCode.FROZEN, "stale")]))
def test_states_that_repeat_by_themselves_are_reported_once(prefix: list[m.Event], again: m.Event) -> None:
    """A retained release heard again (every reconnect) or a freshness check repeated adds no report."""
    state = fresh()
    for event in prefix:
        state, _ = m.step(state, event, CONFIG)
    state, first = m.step(state, again, CONFIG)
    if any(isinstance(a, m.RunUpdate) for a in first):
        return  # it started an update: the next hearing meets a busy machine, covered above
    _, second = m.step(state, again, CONFIG)
    assert reports(second) == [], f"said again: {reports(second)} after {reports(first)}"


def test_the_machine_is_deterministic_over_a_whole_update() -> None:
    sequence: list[m.Event] = [m.Started(), m.ReleaseHeard(b"raw-v2"), verified(V2),
                               m.PhaseEntered(Phase.DOWNLOADING, "2.0.0", 0), m.UpdateSucceeded(V2)]
    first = run(fresh(), *sequence)
    assert first == run(fresh(), *sequence)
    assert first[0].local.installed_version == "2.0.0"


def test_the_same_release_heard_again_after_it_failed_starts_no_second_attempt_but_after_idle_is_judged_again() -> None:
    """Heard from a peer and then from the broker (or again at a reconnect): a release that just failed
    for good is not tried twice; one judged idle before a timestamp vouched for it is judged again,
    so that the timestamp's vouching raises the floor."""
    state, _ = run(fresh(), m.ReleaseHeard(raw(V2)), verified(V2))
    state, actions = run(state, m.UpdateFailed(V2, ReasonCode.HASH_MISMATCH, "delta lies", phase=Phase.REFUSED))
    assert reports(actions)[-1].phase == Phase.REFUSED
    state, actions = run(state, m.ReleaseHeard(raw(V2)))
    assert actions == []
    state, actions = run(state, m.ReleaseHeard(raw(V3)))
    assert actions == [m.Verify(raw(V3))]

    idle, _ = run(fresh(), m.ReleaseHeard(raw(V1_AGAIN)), verified(V1_AGAIN, vouched=False))
    _, actions = run(idle, m.ReleaseHeard(raw(V1_AGAIN)))
    assert actions == [m.Verify(raw(V1_AGAIN))]
