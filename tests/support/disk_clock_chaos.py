"""Full disks and wrong clocks as benchmark trials, on the power-cut lab's fleet (issue 15, items 5, 6).

Each trial provisions a fresh device of the lab (tests/support/power_chaos.py) and runs the real
agent under tests/support/cut_agent.py:

- `disk`: the device on a tmpfs of its own, filled (all but 256 KiB) when a random phase begins
  (downloading: at the fetch's first write, after the check for room; patching; installing), or
  too small from the start. It must report `disk_full` with its working version intact and no
  half-written file, and install 2.0.0 once room is freed;
- `clock`: the wall clock a random number of days ahead (frozen, nothing installed, then 2.0.0
  once the clock is right and a timestamp is signed), behind (2.0.0), or jumping ahead when a random
  phase begins (the update finishes, then `frozen`, then `idle` once the clock is right).

Every trial ends with the same judge as the power cuts (tests/support/device_invariants.py).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from schemas.models import DeviceState, Phase
from services.runtime.files import sha256_file
from tests.support.device_invariants import read_floors
from tests.support.full_disk import SmallDisk, half_written
from tests.support.power_chaos import CutAgent, Outcome, PowerLab, settle

DAY = 24 * 3600
# phase -> (handler, the write at which to fill: None, the phase's own start)
# (`command` is left out: the agent cannot tell why a signed command failed, so a command that runs
# out of room is an install failure, rolled back and not retried; the check for room still runs first.)
DISK_PHASES = {"downloading": ("file", "held.json"), "patching": ("ab", None), "installing": ("file", None),
               "from the start": ("file", None)}
CLOCKS = ("ahead", "behind", "jump")
JUMP_PHASES = ("downloading", "verifying", "installing", "confirming")


@dataclass(frozen=True)
class Fault:
    kind: str  # disk | clock
    what: str  # the disk's phase, or ahead | behind | jump
    days: float = 0.0
    phase: str | None = None  # a clock jump's phase

    @property
    def cell(self) -> str:
        return f"disk full: {self.what}" if self.kind == "disk" else f"clock {self.what}"

    def describe(self) -> str:
        if self.kind == "disk":
            return f"disk full {self.what}"
        if self.what == "jump":
            return f"clock jumps {self.days:+.1f} days when {self.phase} begins"
        return f"clock {self.days:+.1f} days"


def plan_faults(rng: random.Random, disk_trials: int, clock_trials: int) -> list[Fault]:
    disks = list(DISK_PHASES)
    faults = [Fault("disk", disks[i % len(disks)]) for i in range(disk_trials)]
    for i in range(clock_trials):
        what = CLOCKS[i % len(CLOCKS)]
        days = rng.uniform(1, 30) * (-1 if what == "behind" else 1)
        faults.append(Fault("clock", what, days, rng.choice(JUMP_PHASES) if what == "jump" else None))
    rng.shuffle(faults)
    return faults


def run_fault(lab: PowerLab, fault: Fault, work: Path) -> Outcome:
    return _disk(lab, fault, work) if fault.kind == "disk" else _clock(lab, fault, work)


def _finish(lab: PowerLab, fault: Fault, device, handler: str, landed: str, problems: list[str],  # noqa: ANN001
            started: float) -> Outcome:
    before = read_floors(device.spec.state_dir, device.spec.base_dir / "provisioned-root.json")
    try:
        state: DeviceState | None = settle(lab.fleet, device, datetime.fromtimestamp(0, UTC))
    except AssertionError as exc:
        state = None
        problems.append(str(exc)[:300])
    verdict = lab.judge(device, handler, before, None)  # the agent still runs (no stray check): judged, then stopped
    return Outcome(fault, landed, verdict.bricked, verdict.mixed,  # type: ignore[arg-type]
                   reached_new_version=verdict.version == "2.0.0" and state is not None,
                   problems=problems + list(verdict.problems),
                   recovery_seconds=time.monotonic() - started)


def _disk(lab: PowerLab, fault: Fault, work: Path) -> Outcome:
    handler, on_file = DISK_PHASES[fault.what]
    device = lab.add_device(handler)
    name = device.name
    v1 = sha256_file(device.spec.installed_file)
    disk = SmallDisk(device)
    hog = device.spec.base_dir / "hog"
    problems: list[str] = []
    args = ["--events", str(work / f"{name}.jsonl")]
    if fault.what == "from the start":
        disk.resize(str(disk.used() + (4 << 20)))
    else:
        args += ["--fill", str(hog), "--fill-on-phase", fault.what, *(["--fill-on-file", on_file] if on_file else [])]
    agent = CutAgent(device, args)
    try:
        failed = lab.fleet.watcher.first_after(name, 0, lambda s: s.phase in (Phase.FAILED, Phase.DONE, Phase.ROLLED_BACK))
        if failed is None or failed.reason_code != "disk_full":
            problems.append(f"not reported as disk_full: {failed}")
        elif failed.installed_sha256 != v1 or sha256_file(device.spec.installed_file) != v1:
            problems.append("the working version changed")
        leftover = half_written(device)
        if leftover:
            problems.append(f"half-written: {leftover}")
        started = time.monotonic()
        hog.unlink(missing_ok=True)
        disk.resize("200m")
        outcome = _finish(lab, fault, device, handler, fault.what, problems, started)
    finally:
        agent.stop()
        disk.close()
    return outcome


def _clock(lab: PowerLab, fault: Fault, work: Path) -> Outcome:
    handler = "file"
    device = lab.add_device(handler)
    name = device.name
    clock = work / f"{name}.clock"
    offset = 0.0 if fault.what == "jump" else fault.days * DAY
    clock.write_text(f"{offset}\n")
    args = ["--clock", str(clock)]
    if fault.what == "jump":
        args += ["--jump-on-phase", str(fault.phase), "--jump-to", str(fault.days * DAY)]
    problems: list[str] = []
    agent = CutAgent(device, args)
    try:
        if fault.what == "ahead":
            if lab.fleet.watcher.first_after(name, 0, lambda s: s.reason_code in ("expired", "frozen")) is None:
                problems.append("a clock days ahead was not refused as expired or frozen")
            time.sleep(2)
            if any(s.phase in (Phase.DOWNLOADING, Phase.DONE) for s in lab.fleet.watcher.history.get(name, [])):
                problems.append("installed while its clock said every timestamp had expired")
            clock.write_text("0\n")
            lab.fleet.publish_timestamp()
        elif fault.what == "jump":
            if lab.fleet.watcher.first_after(name, 0, lambda s: s.phase == Phase.DONE) is None:
                problems.append("the update under way when the clock jumped did not finish")
            if lab.fleet.watcher.first_after(name, 0, lambda s: s.phase == Phase.FROZEN, timeout=30) is None:
                problems.append("no frozen report after the jump")
            after = lab.fleet.watcher.heard(name)
            clock.write_text("0\n")
            lab.fleet.publish_timestamp()
            if lab.fleet.watcher.first_after(name, after, lambda s: s.phase == Phase.IDLE) is None:
                problems.append("not idle again once the clock was right")
        if agent.proc.poll() is not None:
            problems.append(f"the agent stopped ({agent.proc.returncode})")
        outcome = _finish(lab, fault, device, handler, fault.what, problems, time.monotonic())
    finally:
        agent.stop()
    return outcome
