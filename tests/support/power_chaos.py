"""Power cuts at random moments of a real update, with real processes (issue 15, item 1).

A `PowerLab` is one fleet (embedded broker, origin) with three classes, one per install handler:

- `file`: the full artifact (no delta), installed by one rename;
- `ab`: a delta from 1.0.0, patched to a new file, installed into the other slot;
- `command`: a delta, installed by a signed command that keeps a backup and replaces the target
  atomically, with a rollback command that puts the backup back.

The timestamp key was rotated once before any release, and every device is provisioned with the
first root: each start walks the root chain and persists root v2 and a timestamp, so cuts land on
those writes too. Each class's health check takes a moment, so the confirm phase has a width.

A trial provisions a fresh device on 1.0.0, runs the agent under tests/support/cut_agent.py, which
SIGKILLs its whole process group (agent, embedded node, install or health child) at the chosen
moment, starts it again normally on the same disk, waits until it settles, and judges the device
(tests/support/device_invariants.py). Cuts of three kinds:

- `phase`: a random delay into one phase (downloading, verifying, patching, installing, confirming,
  reporting), up to that phase's width in this lab's listing run;
- `write`: during the Kth durable write of one persisted file (state, switch journal, root,
  timestamp, held-content list): torn mid-write, before its rename, or after it;
- `in-place`: `edgeswarm delta apply --in-place` killed at a random moment of its work, then run
  again: it must resume to the exact new image.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from schemas.models import DeviceState, InstallSpec, Phase
from services.demo.processes import PARENT_ENV, terminate
from services.runtime.files import sha256_file
from tests.support.deadlines import scaled
from tests.support.device_invariants import (
    Evidence,
    Floors,
    Verdict,
    active_sha256,
    group_members,
    leftovers,
    problems,
    read_floors,
)
from tests.support.harness import Device, Fleet

TARGET = "/opt/edgeswarm/firmware.img"
HANDLERS = ("file", "ab", "command")
PHASES = ("downloading", "verifying", "patching", "installing", "confirming", "reporting")
WRITES = ("state.json", "switch.json", "root.json", "timestamp.json", "held.json")
WRITE_HOW = ("torn", "before", "after")
IN_FLIGHT = {Phase.DOWNLOADING, Phase.VERIFYING, Phase.PATCHING, Phase.INSTALLING, Phase.CONFIRMING}
REPORT_WIDTH = 0.05  # s: the report follows the settled state at once

# The command handler's install and rollback, as an integrator would sign them: keep the running
# version as a backup, then replace the target in one rename; the rollback is safe to run again.
_PUT = ("import os, shutil, sys\n"
        "def put(src, dst):\n"
        "    tmp = dst + '.part'\n"
        "    shutil.copyfile(src, tmp)\n"
        "    fd = os.open(tmp, os.O_RDONLY); os.fsync(fd); os.close(fd)\n"
        "    os.replace(tmp, dst)\n")
INSTALL_COMMAND = [sys.executable, "-c", _PUT + "put(sys.argv[2], sys.argv[2] + '.backup'); put(sys.argv[1], sys.argv[2])",
                   "{artifact}", "{target}"]
ROLLBACK_COMMAND = [sys.executable, "-c", _PUT + "os.path.exists(sys.argv[1] + '.backup') and put(sys.argv[1] + '.backup', sys.argv[1])",
                    "{target}"]
KEPT = {"file": {"firmware.img.previous"}, "ab": {"firmware.img.slot-a", "firmware.img.slot-b"},
        "command": {"firmware.img.backup"}}


@dataclass(frozen=True)
class Cut:
    kind: str  # phase | write | in-place
    handler: str
    phase: str | None = None
    delay: float = 0.0
    file: str | None = None
    nth: int = 1
    how: str | None = None

    @property
    def cell(self) -> str:
        """The row of the benchmark's table this cut counts in."""
        if self.kind == "phase":
            return f"{self.phase} ({self.handler})"
        if self.kind == "write":
            return f"write {self.file} ({self.how})"
        return "patching in place"

    def describe(self) -> str:
        if self.kind == "phase":
            return f"{self.handler}: {self.delay:.3f} s into {self.phase}"
        if self.kind == "write":
            return f"{self.handler}: {self.how} write {self.nth} of {self.file}"
        return f"delta apply --in-place, {self.delay:.3f} s into its work"


class Trial(Protocol):
    """What a trial was: a cut here, a full disk or a wrong clock (disk_clock_chaos.py)."""

    kind: str

    @property
    def cell(self) -> str: ...

    def describe(self) -> str: ...


@dataclass
class Outcome:
    cut: Trial
    landed: str  # where the cut really hit: the phase then persisted, or what the write cut says
    bricked: bool
    mixed: bool
    reached_new_version: bool
    problems: list[str]
    refetched_bytes: int = 0  # fetched again after the restart
    recovery_seconds: float = 0.0

    def as_json(self) -> dict:
        return {"cut": self.cut.describe(), "cell": self.cut.cell, "landed": self.landed, "bricked": self.bricked,
                "mixed": self.mixed, "reached_new_version": self.reached_new_version, "problems": self.problems,
                "refetched_bytes": self.refetched_bytes, "recovery_seconds": round(self.recovery_seconds, 2)}


@dataclass
class Listing:
    """What a run without a cut showed for one handler: when each phase began, how often each file was written."""

    widths: dict[str, float]
    writes: dict[str, int]


def read_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def listing_from(events: list[dict]) -> Listing:
    starts: list[tuple[str, float]] = []
    writes: dict[str, int] = {}
    for event in events:
        if "file" not in event:
            continue
        writes[event["file"]] = writes.get(event["file"], 0) + 1
        phase = event["phase"]
        if phase is None:
            continue
        if phase == "settled" and starts and starts[-1][0] != "settled":
            phase = "reporting"
        if not starts or starts[-1][0] != phase:
            starts.append((phase, event["t"]))
    widths = {phase: max(following[1] - began, 0.001) for (phase, began), following in zip(starts, starts[1:], strict=False)}
    widths["reporting"] = REPORT_WIDTH
    return Listing(widths=widths, writes=writes)


def landed(events: list[dict]) -> str:
    """The phase the last persisted state before the cut recorded (or the write cut's own words)."""
    phase = "start"
    seen_pending = False
    for event in events:
        if "cut" in event:
            return event["cut"] if event["cut"].startswith(WRITES) else phase
        if event.get("phase") is not None:
            seen_pending |= event["phase"] != "settled"
            phase = "reporting" if event["phase"] == "settled" and seen_pending else event["phase"]
    return "no cut"


def settle(fleet: Fleet, device: Device, since: datetime, timeout: float = 90,
           outcome: frozenset[Phase] = frozenset(Phase) - IN_FLIGHT) -> DeviceState:
    """The device's last report once nothing is in flight: no pending update, no switch journal."""
    end = time.monotonic() + scaled(timeout)
    state_dir = device.spec.state_dir
    while time.monotonic() < end:
        state = fleet.watcher.states.get(device.name)
        if state is not None and state.timestamp >= since and state.phase in outcome:
            try:
                local = json.loads((state_dir / "state.json").read_text())
            except (OSError, ValueError):
                local = None
            if local is not None and local["pending"] is None and not (state_dir / "switch.json").exists() \
                    and state.installed_sha256 == local["installed_sha256"]:
                time.sleep(0.5)  # and stays so
                if fleet.watcher.states[device.name] == state:
                    return state
        time.sleep(0.2)
    raise AssertionError(f"{device.name} did not settle: {fleet.watcher.states.get(device.name)}")


class CutAgent:
    """The real agent under tests/support/cut_agent.py, in its own process group, stopped by its PID."""

    def __init__(self, device: Device, cut_args: list[str]) -> None:
        args = [sys.executable, "-m", "tests.support.cut_agent", *cut_args,
                "--", "device", "run", "--config", str(device.process.config)]
        with open(device.spec.base_dir / "agent.log", "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, PARENT_ENV: str(os.getpid())}, start_new_session=True)

    def wait_cut(self, timeout: float = 90) -> None:
        try:
            self.proc.wait(scaled(timeout))
        except subprocess.TimeoutExpired:
            terminate(self.proc)
            raise AssertionError("the agent never reached the cut point") from None
        assert self.proc.returncode == -signal.SIGKILL, f"the agent exited with {self.proc.returncode}, not by the cut"

    def stop(self) -> None:
        terminate(self.proc)


@dataclass
class PowerLab:
    fleet: Fleet
    first_root: Path
    signed: dict[str, str]  # installed sha256 -> version
    patch: Path  # 1.0.0 -> 2.0.0, made for patching in place
    travels: dict[str, int]  # handler -> bytes fetched by an update from 1.0.0 (the artifact, or the delta)
    listings: dict[str, Listing] = field(default_factory=dict)
    in_place_width: float = 0.0
    counter: int = 0

    @property
    def v2(self) -> str:
        return next(sha for sha, version in self.signed.items() if version == "2.0.0")

    def device_class(self, handler: str) -> str:
        return f"ipc-chaos-{handler}"

    def add_device(self, handler: str) -> Device:
        self.counter += 1
        settings = ('[install]\nallowed_handlers = ["%s"]\nhealth_command = ["sleep", "0.3"]\nconfirm_deadline = 20\n'
                    % handler)
        device = self.fleet.add_device(f"cut-{self.counter}", self.device_class(handler), start=False, extra_toml=settings)
        shutil.copyfile(self.first_root, device.spec.base_dir / "provisioned-root.json")
        return device

    def learn(self, work: Path) -> None:
        """One run per handler without a cut: the phases' widths and the writes' counts."""
        for handler in HANDLERS:
            device = self.add_device(handler)
            events = work / f"listing-{handler}.jsonl"
            started = datetime.now(UTC)
            agent = CutAgent(device, ["--events", str(events)])
            try:
                state = settle(self.fleet, device, started, outcome=frozenset({Phase.DONE}))
            finally:
                agent.stop()
            assert state.installed_version == "2.0.0", state
            self.listings[handler] = listing_from(read_events(events))
            shutil.rmtree(device.spec.base_dir, ignore_errors=True)
        self.in_place_width = self._patch_in_place(work / "in-place-listing.img", None)[1]

    # -- trials ------------------------------------------------------------------------------

    @staticmethod
    def cells() -> list[tuple[str, str | None, str | None]]:
        """(kind, phase or file, way of cutting): one row of the benchmark's table each."""
        cells: list[tuple[str, str | None, str | None]] = [("phase", p, None) for p in PHASES]
        cells += [("write", f, how) for f in WRITES for how in WRITE_HOW]
        return cells + [("in-place", None, None)]

    def plan(self, rng: random.Random, trials: int) -> list[Cut]:
        """`trials` cuts spread over every cell (each phase with each handler that has it, each file
        cut each way, patching in place), the moment random within the cell: a shuffled round-robin,
        so `len(cells)` trials or more touch every cell, and fewer touch as many as they can."""
        cells: list[tuple[str, str, str | None, str | None]] = [
            (kind, handler, what, how) for kind, what, how in self.cells()
            for handler in (HANDLERS if kind == "phase" else (rng.choice(HANDLERS),))
            if not (what == "patching" and handler == "file")]
        rng.shuffle(cells)
        cuts = []
        for index in range(trials):
            kind, handler, what, how = cells[index % len(cells)]
            listing = self.listings[handler]
            if kind == "phase":
                assert what is not None
                cuts.append(Cut(kind, handler, phase=what, delay=rng.uniform(0, listing.widths[what])))
            elif kind == "write":
                assert what is not None
                cuts.append(Cut(kind, handler, file=what, nth=rng.randint(1, max(listing.writes.get(what, 0), 1)), how=how))
            else:
                cuts.append(Cut(kind, handler, delay=rng.uniform(0, self.in_place_width)))
        return cuts

    @property
    def cell_count(self) -> int:
        """Trials that touch every cell once (phases count once per handler)."""
        return sum(len(HANDLERS) - (what == "patching") if kind == "phase" else 1 for kind, what, _ in self.cells())

    def run(self, cut: Cut, work: Path, seed: int) -> Outcome:
        if cut.kind == "in-place":
            return self._in_place_trial(cut, work)
        device = self.add_device(cut.handler)
        events = work / f"{device.name}.jsonl"
        args = ["--events", str(events), "--seed", str(seed)]
        if cut.kind == "phase":
            args += ["--cut-phase", str(cut.phase), "--cut-delay", f"{cut.delay:.4f}"]
        else:
            args += ["--cut-file", str(cut.file), "--cut-nth", str(cut.nth), "--cut-how", str(cut.how)]
        agent = CutAgent(device, args)
        failure: list[str] = []
        try:
            agent.wait_cut()
        except AssertionError as exc:  # the cut point never came: counted, and the device still judged
            failure.append(f"no cut: {exc}")
        finally:
            agent.stop()
        where = landed(read_events(events))
        before = read_floors(device.spec.state_dir, device.spec.base_dir / "provisioned-root.json")
        restarted = datetime.now(UTC)
        clock = time.monotonic()
        device.process.start()
        try:
            state: DeviceState | None = settle(self.fleet, device, restarted)
            recovery = time.monotonic() - clock
        except AssertionError as exc:
            state, recovery = None, time.monotonic() - clock
            failure.append(str(exc)[:300])
        pgid = device.process.pid
        device.process.stop()
        verdict = self.judge(device, cut.handler, before, pgid)
        outcome = Outcome(cut, where, verdict.bricked, verdict.mixed, verdict.version == "2.0.0" and state is not None,
                          failure + list(verdict.problems), recovery_seconds=recovery,
                          refetched_bytes=(state.bytes_from_origin + state.bytes_from_peers) if state else 0)
        if not outcome.problems:
            shutil.rmtree(device.spec.base_dir, ignore_errors=True)  # kept for a person to read otherwise
        return outcome

    def judge(self, device: Device, handler: str, before: Floors, pgid: int | None) -> Verdict:
        spec = device.spec
        try:
            persisted = json.loads((spec.state_dir / "state.json").read_text())
        except (OSError, ValueError):
            persisted = None
        evidence = Evidence(
            active_sha256=active_sha256(spec.installed_file), persisted=persisted,
            reported=self.fleet.watcher.states.get(device.name),
            floors=read_floors(spec.state_dir, spec.base_dir / "provisioned-root.json"),
            leftovers=leftovers(spec.state_dir, spec.installed_file.parent, spec.installed_file, KEPT[handler]),
            stray_pids=group_members(pgid) if pgid else [])
        return problems(evidence, self.signed, before)

    # -- patching in place -------------------------------------------------------------------

    def _patch_in_place(self, image: Path, delay: float | None) -> tuple[bool, float]:
        """`edgeswarm delta apply --in-place` on a copy of 1.0.0, cut `delay` s after its journal
        appears (None: not cut). Returns (cut while the journal existed, seconds the journal existed)."""
        shutil.copyfile(self.fleet.image(self.device_class("file"), "1.0.0"), image)
        journal = image.with_name(image.name + ".esdjournal")
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", "delta", "apply", "--in-place", str(image),
                                 str(self.patch), "--json"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            end = time.monotonic() + scaled(60)
            while not journal.exists() and proc.poll() is None:
                assert time.monotonic() < end, "delta apply --in-place never started"
                time.sleep(0.002)
            began = time.monotonic()
            if delay is None:
                while journal.exists():
                    time.sleep(0.002)
                width = time.monotonic() - began
                proc.wait(scaled(60))
                assert proc.returncode == 0, "delta apply --in-place failed without a cut"
                return False, width
            time.sleep(delay)
            mid = journal.exists()
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return mid, time.monotonic() - began
        finally:
            terminate(proc)

    def _in_place_trial(self, cut: Cut, work: Path) -> Outcome:
        self.counter += 1
        image = work / f"in-place-{self.counter}.img"
        mid, _ = self._patch_in_place(image, cut.delay)
        clock = time.monotonic()
        again = subprocess.run([sys.executable, "-m", "services.cli", "delta", "apply", "--in-place", str(image),
                                str(self.patch), "--json"], capture_output=True, text=True, timeout=scaled(120),
                               stdin=subprocess.DEVNULL)
        recovery = time.monotonic() - clock
        found = [] if again.returncode == 0 else [f"the resumed apply failed: {again.stderr.strip()[-300:]}"]
        result = active_sha256(image)
        if result != self.v2:
            found.append("the image patched in place is not the new version")
        stray = [p.name for p in (image.with_name(image.name + ".esdjournal"), image.with_name(image.name + ".esdstage"))
                 if p.exists()]
        found += [f"left behind: {name}" for name in stray]
        outcome = Outcome(cut, "mid-patch" if mid else "before or after the patch", bricked=result != self.v2,
                          mixed=result not in self.signed, reached_new_version=result == self.v2, problems=found,
                          recovery_seconds=recovery)
        image.unlink(missing_ok=True)
        return outcome


@contextmanager
def power_lab(root: Path) -> Iterator[PowerLab]:
    """The fleet, its releases and the listing runs; everything stopped on the way out."""
    fleet = Fleet(root)
    try:
        fleet.start()
        first_root = root / "root-v1.json"
        shutil.copyfile(fleet.home.root_file, first_root)
        fleet.cli("keys", "rotate", "timestamp", "--config", str(fleet.operator_config))
        fleet.cli("root", "publish", "--config", str(fleet.operator_config))
        signed: dict[str, str] = {}
        travels: dict[str, int] = {}
        for handler in HANDLERS:
            device_class = f"ipc-chaos-{handler}"
            install = InstallSpec(handler=handler, target=TARGET, **(
                {"command": INSTALL_COMMAND, "rollback": ROLLBACK_COMMAND} if handler == "command" else {}))
            if handler != "file":  # file: no delta, the full artifact travels
                fleet.build_only(device_class, "1.0.0", install=install)
            built = fleet.release_with(device_class, "2.0.0", install)
            assert (handler == "file") == (not built.manifest.deltas), f"{handler}: deltas {list(built.manifest.deltas)}"
            signed[built.manifest.artifact.installed_sha256] = "2.0.0"
            travels[handler] = sum(d.size for d in built.manifest.deltas.values()) or built.manifest.artifact.size
            signed[sha256_file(fleet.image(device_class, "1.0.0"))] = "1.0.0"
        patch = root / "in-place.esd"
        fleet.cli("delta", "create", str(fleet.image("ipc-chaos-file", "1.0.0")), str(fleet.image("ipc-chaos-file", "2.0.0")),
                  "-o", str(patch), "--in-place")
        work = root / "work"
        work.mkdir()
        lab = PowerLab(fleet, first_root, signed, patch, travels)
        lab.learn(work)
        yield lab
    finally:
        fleet.stop()
