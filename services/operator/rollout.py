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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from packaging.version import Version
from pydantic import BaseModel, ConfigDict

from schemas.models import Phase
from schemas.ops import RolloutPlan, RolloutState, RolloutStatus
from services.runtime.trust import rollout_bucket

RESEND_AFTER = timedelta(seconds=20)  # a device still `waiting` this long after its command is told again
WORKING = frozenset({Phase.DOWNLOADING, Phase.VERIFYING, Phase.PATCHING, Phase.INSTALLING, Phase.CONFIRMING})
FAILED = frozenset({Phase.FAILED, Phase.REFUSED, Phase.ROLLED_BACK})


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

    # -- who and how far ---------------------------------------------------------------------

    def members(self, class_devices: list[str], upto: int) -> set[str]:
        """Devices of waves 0..upto (cumulative)."""
        if upto < 0:
            return set()
        ordered = sorted(class_devices, key=lambda d: (rollout_bucket(self.salt, d), d))
        known = set(class_devices)
        chosen: set[str] = set()
        for wave in self.plan.waves[: upto + 1]:
            if wave.percent is not None:
                chosen |= set(ordered[: math.ceil(len(ordered) * wave.percent / 100)])
            else:
                chosen |= set(wave.devices or []) & known
        return chosen

    def outcome(self, m: Member) -> str:
        """done, failed, installing or waiting."""
        version = self.plan.version
        if m.installed_version is not None and Version(m.installed_version) >= Version(version):
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

    def resume(self, fleet: dict[str, Member]) -> None:
        if self.state != RolloutState.PAUSED:
            raise ValueError(f"the rollout is {self.state.value}, not paused")
        # Resuming accepts the failures seen so far: only new ones can pause the rollout again.
        self.acknowledged = sorted({d for d, m in fleet.items() if self.outcome(m) == "failed"} | set(self.acknowledged))
        self.state, self.reason = RolloutState.RUNNING, ""

    def abort(self, reason: str) -> None:
        if self.state in (RolloutState.ABORTED, RolloutState.COMPLETED):
            raise ValueError(f"the rollout is {self.state.value} already")
        self.state, self.reason = RolloutState.ABORTED, reason or "aborted by the operator"

    def step(self, fleet: dict[str, Member], now: datetime) -> list[str]:
        """Advance by the rules above; returns the devices to send an install command to now."""
        if self.state not in (RolloutState.RUNNING, RolloutState.COMPLETED):
            return []
        devices = sorted(fleet)
        current = self.members(devices, self.wave_index)
        if self.state == RolloutState.RUNNING:
            own = current - self.members(devices, self.wave_index - 1) or current
            failed = sorted(d for d in own if self.outcome(fleet[d]) == "failed" and d not in self.acknowledged)
            if own and len(failed) * 100 > self.plan.max_failed_percent * len(own):
                self.state = RolloutState.PAUSED
                self.reason = (f"wave {self.wave_index + 1}: {len(failed)} of {len(own)} devices failed "
                               f"({', '.join(failed[:5])}), above {self.plan.max_failed_percent}%")
                return []
        commands = [d for d in sorted(current) if self._needs_command(fleet[d], now)]
        for device in commands:
            self.commanded[device] = now
        if self.state == RolloutState.RUNNING:
            settled = all(self.outcome(fleet[d]) in ("done", "failed") or fleet[d].online is False for d in current)
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

    def _needs_command(self, m: Member, now: datetime) -> bool:
        if self.outcome(m) != "waiting" or m.online is False:
            return False
        last = self.commanded.get(m.device)
        return last is None or (m.phase == Phase.WAITING and now - last >= RESEND_AFTER)

    # -- reporting ---------------------------------------------------------------------------

    def status(self, fleet: dict[str, Member], now: datetime) -> RolloutStatus:
        devices = sorted(fleet)
        current = self.members(devices, self.wave_index)
        outcomes = {d: self.outcome(fleet[d]) for d in devices}
        own = current - self.members(devices, self.wave_index - 1) or current
        failed_own = [d for d in own if outcomes[d] == "failed" and d not in self.acknowledged]
        soak_until = (self.settled_at + timedelta(seconds=self.plan.soak_seconds)
                      if self.settled_at is not None and self.state == RolloutState.RUNNING else None)
        return RolloutStatus(
            device_class=self.plan.device_class, version=self.plan.version, sequence=self.sequence,
            state=self.state, wave=self.wave_index + 1, waves=len(self.plan.waves), wave_devices=len(current),
            class_devices=len(devices),
            done=sum(o == "done" for o in outcomes.values()),
            failed=sum(o == "failed" for o in outcomes.values()),
            in_progress=sum(o == "installing" for o in outcomes.values()),
            waiting=sum(o == "waiting" for o in outcomes.values()),
            failure_rate=round(len(failed_own) / len(own), 4) if own else 0.0,
            failed_devices=sorted(d for d, o in outcomes.items() if o == "failed"),
            reason=self.reason, soak_until=soak_until, updated=now,
        )
