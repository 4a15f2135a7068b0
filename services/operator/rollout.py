"""Staged rollouts as a pure state machine: the fleet as it is now in, install commands and status out.

A rollout walks the waves of its plan. Each wave is cumulative: a share of the device class in
the order of the release's rollout buckets (the signed canary devices come first, so a first wave
of at least `canary_percent` contains them), or a list of devices. In every step the engine

1. pauses the rollout when the share of failed devices among the wave's own devices exceeds
   `max_failed_percent` (failures acknowledged by a resume no longer count),
2. names the devices of the wave that need an install command (never told, or reporting
   `waiting` again after a restart or while they were offline),
3. moves to the next wave once every online device of the wave has ended (done or failed) and
   the soak time has passed since, and completes after the last wave.

An aborted or paused rollout sends nothing; a device already told to install finishes or rolls
back atomically on its own, so no device is ever left half-installed. No I/O and no clock reads:
the caller passes `now`, which keeps every rule testable.

A tick of a class of 100,000 devices passes over all of them: the bucket order, the waves and each
device's outcome are cached (the order until the class changes, an outcome until that device's
Member is replaced), so that a pass costs a dictionary look-up per device, not a hash and a
version parse.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from packaging.version import Version
from pydantic import BaseModel, ConfigDict, PrivateAttr

from schemas.models import Phase
from schemas.ops import RolloutPlan, RolloutState, RolloutStatus
from services.runtime.trust import rollout_bucket

RESEND_AFTER = timedelta(seconds=20)  # a device still `waiting` this long after its command is told again
WORKING = frozenset({Phase.DOWNLOADING, Phase.VERIFYING, Phase.PATCHING, Phase.INSTALLING, Phase.CONFIRMING})
FAILED = frozenset({Phase.FAILED, Phase.REFUSED, Phase.ROLLED_BACK})


@functools.lru_cache(maxsize=4096)
def _version(text: str) -> Version:
    return Version(text)


@dataclass(frozen=True)
class Member:
    """What the engine needs to know of one device of the class."""

    device: str
    installed_version: str | None
    phase: Phase | None
    target_version: str | None
    online: bool | None
    retrying: bool = False


class Rollout(BaseModel):
    """One class's rollout; persisted by the fleet service as JSON (internal, not on the wire)."""

    model_config = ConfigDict(extra="forbid")
    plan: RolloutPlan
    sequence: int
    release_sha256: str | None = None  # of the signed payload: install commands name the release by it
    salt: str
    state: RolloutState = RolloutState.RUNNING
    wave_index: int = 0
    wave_started: datetime
    settled_at: datetime | None = None
    commanded: dict[str, datetime] = {}
    acknowledged: list[str] = []
    reason: str = ""
    # Derived, never persisted: (the class's devices, bucket order) and device -> (its Member, outcome).
    _order: tuple[frozenset[str], list[str]] | None = PrivateAttr(default=None)
    _waves: dict[int, frozenset[str]] = PrivateAttr(default_factory=dict)
    _outcomes: dict[str, tuple[Member, str]] = PrivateAttr(default_factory=dict)

    # -- who and how far ---------------------------------------------------------------------

    def members(self, class_devices: list[str] | frozenset[str], upto: int) -> frozenset[str]:
        """Devices of waves 0..upto (cumulative)."""
        if upto < 0:
            return frozenset()
        known = frozenset(class_devices)
        if self._order is None or self._order[0] != known:
            self._order = (known, sorted(known, key=lambda d: (rollout_bucket(self.salt, d), d)))
            self._waves = {}
        if upto in self._waves:
            return self._waves[upto]
        ordered = self._order[1]
        chosen: set[str] = set()
        for wave in self.plan.waves[: upto + 1]:
            if wave.percent is not None:
                chosen |= set(ordered[: math.ceil(len(ordered) * wave.percent / 100)])
            else:
                chosen |= set(wave.devices or []) & known
        self._waves[upto] = frozenset(chosen)
        return self._waves[upto]

    def progress(self) -> tuple[object, ...]:
        """What a step may change besides `commanded` (which changes only with commands): persist on change."""
        return self.state, self.wave_index, self.wave_started, self.settled_at, self.reason, len(self.acknowledged)

    def outcome(self, m: Member) -> str:
        """done, failed, installing or waiting."""
        return self._outcomes_of({m.device: m}, (m.device,))[m.device]

    def _outcomes_of(self, fleet: Mapping[str, Member], devices: Iterable[str]) -> dict[str, str]:
        cache = self._outcomes  # bound once: pydantic serves private attributes through __getattr__ (~1 us)
        found = {}
        for device in devices:
            m = fleet[device]
            cached = cache.get(device)
            if cached is None or cached[0] is not m:
                cached = cache[device] = (m, self._outcome(m))
            found[device] = cached[1]
        return found

    def _outcome(self, m: Member) -> str:
        version = self.plan.version
        if m.installed_version is not None and _version(m.installed_version) >= _version(version):
            return "done"
        if m.target_version == version and m.phase in FAILED and not m.retrying:
            return "failed"
        if m.target_version == version and m.phase in WORKING | {Phase.FAILED}:
            return "installing"  # FAILED with a retry scheduled is still on its way
        return "waiting"

    # -- transitions -------------------------------------------------------------------------

    def pause(self, reason: str) -> None:
        if self.state != RolloutState.RUNNING:
            raise ValueError(f"the rollout is {self.state.value}, not running")
        self.state, self.reason = RolloutState.PAUSED, reason or "paused by the operator"

    def resume(self, fleet: Mapping[str, Member]) -> None:
        if self.state != RolloutState.PAUSED:
            raise ValueError(f"the rollout is {self.state.value}, not paused")
        # Resuming accepts the failures seen so far: only new ones can pause the rollout again.
        self.acknowledged = sorted({d for d, m in fleet.items() if self.outcome(m) == "failed"} | set(self.acknowledged))
        self.state, self.reason = RolloutState.RUNNING, ""

    def abort(self, reason: str) -> None:
        if self.state in (RolloutState.ABORTED, RolloutState.COMPLETED):
            raise ValueError(f"the rollout is {self.state.value} already")
        self.state, self.reason = RolloutState.ABORTED, reason or "aborted by the operator"

    def step(self, fleet: Mapping[str, Member], now: datetime) -> list[str]:
        """Advance by the rules above; returns the devices to send an install command to now."""
        if self.state not in (RolloutState.RUNNING, RolloutState.COMPLETED):
            return []
        devices = frozenset(fleet)
        current = self.members(devices, self.wave_index)
        outcomes = self._outcomes_of(fleet, current)
        if self.state == RolloutState.RUNNING:
            own = current - self.members(devices, self.wave_index - 1) or current
            acknowledged = set(self.acknowledged)
            failed = sorted(d for d in own if outcomes[d] == "failed" and d not in acknowledged)
            if own and len(failed) * 100 > self.plan.max_failed_percent * len(own):
                self.state = RolloutState.PAUSED
                self.reason = (f"wave {self.wave_index + 1}: {len(failed)} of {len(own)} devices failed "
                               f"({', '.join(failed[:5])}), above {self.plan.max_failed_percent}%")
                return []
        commands = sorted(d for d in current if self._needs_command(fleet[d], outcomes[d], now))
        for device in commands:
            self.commanded[device] = now
        if self.state == RolloutState.RUNNING:
            settled = all(outcomes[d] in ("done", "failed") or fleet[d].online is False for d in current)
            if not settled:
                self.settled_at = None
            else:
                self.settled_at = self.settled_at or now
                if now - self.settled_at >= timedelta(seconds=self.plan.soak_seconds):
                    if self.wave_index + 1 < len(self.plan.waves):
                        self.wave_index += 1
                        self.wave_started, self.settled_at = now, None
                        return commands + self.step(fleet, now)
                    self.state = RolloutState.COMPLETED
        return commands

    def _needs_command(self, m: Member, outcome: str, now: datetime) -> bool:
        if outcome != "waiting" or m.online is False:
            return False
        last = self.commanded.get(m.device)
        return last is None or (m.phase == Phase.WAITING and now - last >= RESEND_AFTER)

    # -- reporting ---------------------------------------------------------------------------

    def status(self, fleet: Mapping[str, Member], now: datetime) -> RolloutStatus:
        devices = frozenset(fleet)
        current = self.members(devices, self.wave_index)
        counts: Counter[str] = Counter()
        failed: list[str] = []
        cache = self._outcomes  # one pass over the class: its cost is the tick's at 100,000 devices
        for device, m in fleet.items():
            cached = cache.get(device)
            if cached is None or cached[0] is not m:
                cached = cache[device] = (m, self._outcome(m))
            counts[cached[1]] += 1
            if cached[1] == "failed":
                failed.append(device)
        own = current - self.members(devices, self.wave_index - 1) or current
        acknowledged = set(self.acknowledged)
        failed_own = [d for d in failed if d in own and d not in acknowledged]
        soak_until = (self.settled_at + timedelta(seconds=self.plan.soak_seconds)
                      if self.settled_at is not None and self.state == RolloutState.RUNNING else None)
        return RolloutStatus(
            device_class=self.plan.device_class, version=self.plan.version, sequence=self.sequence,
            state=self.state, wave=self.wave_index + 1, waves=len(self.plan.waves), wave_devices=len(current),
            class_devices=len(devices),
            done=counts["done"], failed=counts["failed"], in_progress=counts["installing"], waiting=counts["waiting"],
            failure_rate=round(len(failed_own) / len(own), 4) if own else 0.0,
            failed_devices=sorted(failed),
            reason=self.reason, soak_until=soak_until, updated=now,
        )
