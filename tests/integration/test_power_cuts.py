"""Power cuts at every file move of the install, confirm and rollback paths (issue 23).

For each handler (`file`, `ab`; the `ab` install also adopts the provisioned plain file into a
slot) and each outcome of the health check (healthy, always failing), a run without a cut lists
the moves of that path (tests/support/cut_agent.py). Then, for every move N, a fresh device runs
the real agent, is SIGKILLed (with its children) just before move N, and is restarted on the same
disk; and for the cut right after the switch, the recovery itself is cut at each of its moves
before a third start. After the last start settles, whatever the cut:

- the active bytes (through the A/B link) are the old or the new version, byte for byte;
- state.json, the reported state and the active bytes name the same version;
- a version whose health check never passed is never committed (with a failing check, the device
  always ends on 1.0.0), and no switch journal is left behind;
- a switch the cut left unconfirmed is rolled back at start and then tried again (device_client/
  machine.py, `max_attempts` in all), so with a passing check the device ends on 2.0.0, confirmed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from schemas.models import DeviceState, InstallSpec, Phase
from services.demo.processes import terminate
from services.runtime.files import sha256_file
from tests.support.deadlines import scaled
from tests.support.harness import Device, Fleet
from tests.support.power_chaos import CutAgent, settle

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]  # up to 20 agent starts per test

TARGET = "/opt/edgeswarm/firmware.img"


@dataclass
class Path_:
    handler: str
    healthy: bool

    @property
    def device_class(self) -> str:
        return f"ipc-cut-{self.handler}"

    @property
    def settings(self) -> str:
        check = '["true"]' if self.healthy else '["false"]'
        return f'[install]\nallowed_handlers = ["{self.handler}"]\nhealth_command = {check}\nconfirm_deadline = 1\n'


PATHS = {f"{h}-{'healthy' if ok else 'sick'}": Path_(h, ok) for h in ("file", "ab") for ok in (True, False)}


@dataclass
class Lab:
    fleet: Fleet
    v1: str
    v2: str
    counter: int = 0


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    fleet = Fleet(tmp_path_factory.mktemp("cuts"))
    try:
        fleet.start()
        v2 = None
        for handler in ("file", "ab"):
            built = fleet.release_with(f"ipc-cut-{handler}", "2.0.0", InstallSpec(handler=handler, target=TARGET))
            v2 = built.manifest.artifact.installed_sha256
        assert v2 is not None
        yield Lab(fleet, sha256_file(fleet.image("ipc-cut-file", "1.0.0")), v2)
    finally:
        fleet.stop()


def cut_agent(device: Device, record: Path, *, cut_at: int | None, from_start: bool) -> CutAgent:
    return CutAgent(device, ["--watch", str(device.spec.installed_file.parent), "--record", str(record),
                             *(["--cut-at", str(cut_at)] if cut_at else []), *(["--from-start"] if from_start else [])])


def check(lab: Lab, path: Path_, device: Device, state: DeviceState) -> list[str]:
    """The invariants; returns what is wrong (empty: nothing)."""
    problems = []
    active = sha256_file(device.spec.installed_file)
    local = json.loads((device.spec.state_dir / "state.json").read_text())
    if active not in (lab.v1, lab.v2):
        problems.append("the active bytes are neither version")
    if not active == local["installed_sha256"] == state.installed_sha256:
        problems.append(f"active {active[:8]}, state.json {local['installed_sha256'][:8]}, reported "
                        f"{state.installed_sha256[:8]} disagree")
    if state.installed_version != ("2.0.0" if active == lab.v2 else "1.0.0"):
        problems.append(f"reports {state.installed_version} while running {'v2' if active == lab.v2 else 'v1'}")
    if not path.healthy and active != lab.v1:
        problems.append("committed a version whose health check never passed")
    if path.handler == "ab" and device.spec.installed_file.is_symlink():
        if not os.readlink(device.spec.installed_file).startswith(device.spec.installed_file.name + ".slot-"):
            problems.append("the A/B pointer is not a slot")
    if not device.process.alive():
        problems.append("the agent is not running")
    return problems


def trial(lab: Lab, path: Path_, cuts: list[int | None], record: Path) -> tuple[DeviceState, list[str]]:
    """A fresh device; one agent run per entry of `cuts` (cut before that move, None: run to the end,
    the first counting from `installing`, the others from start); then a normal start that settles."""
    lab.counter += 1
    fleet = lab.fleet
    device = fleet.add_device(f"cut-{lab.counter}", path.device_class, start=False, extra_toml=path.settings)
    for index, cut in enumerate(cuts):
        started = datetime.now(UTC)
        agent = cut_agent(device, record.with_suffix(f".{index}"), cut_at=cut, from_start=index > 0)
        try:
            if cut is None:  # a listing run: to the end, then stopped as a person would
                settle(lab.fleet, device, started, outcome=frozenset({Phase.DONE, Phase.ROLLED_BACK}))
            else:
                agent.wait_cut()
        finally:
            agent.stop()
    restarted = datetime.now(UTC)
    device.process.start()
    state = settle(lab.fleet, device, restarted)
    problems = check(lab, path, device, state)
    device.process.stop()
    return state, problems


def moves(record: Path) -> list[str]:
    return record.read_text().splitlines() if record.exists() else []


def switch_point(points: list[str]) -> int:
    """The move that switches: the first rename onto the target after the intent was journaled (an
    A/B adoption renames a link onto it before that)."""
    journaled = next(i for i, p in enumerate(points, 1) if p.endswith("-> switch.json"))
    return next(i for i, p in enumerate(points, 1) if i > journaled and p.endswith(f"-> {Path(TARGET).name}"))


@pytest.mark.parametrize("name", list(PATHS))
def test_a_cut_at_any_move_of_install_confirm_or_rollback_leaves_a_consistent_device(lab: Lab, name: str,
                                                                                    tmp_path: Path) -> None:
    path = PATHS[name]
    listing = tmp_path / "listing"
    state, problems = trial(lab, path, [None], listing)
    assert not problems, problems
    assert state.installed_version == ("2.0.0" if path.healthy else "1.0.0")
    points = moves(listing.with_suffix(".0"))
    assert len(points) >= 4, points
    failures: dict[str, list[str]] = {}
    outcomes: dict[int, str] = {}
    for n in range(1, len(points) + 1):
        state, problems = trial(lab, path, [n], tmp_path / f"cut-{n}")
        outcomes[n] = f"{state.phase.value} {state.installed_version}"
        if problems:
            failures[f"before {points[n - 1]}"] = problems
    assert not failures, json.dumps(failures, indent=1)
    print(f"{name}: {len(points)} cut points: " + ", ".join(f"{n}:{o}" for n, o in outcomes.items()))
    if not path.healthy:
        assert all(o.endswith("1.0.0") for o in outcomes.values())


@pytest.mark.parametrize("name", ["file-sick", "ab-healthy"])
def test_a_second_cut_during_recovery_still_ends_consistent(lab: Lab, name: str, tmp_path: Path) -> None:
    path = PATHS[name]
    listing = tmp_path / "listing"
    trial(lab, path, [None], listing)
    first = switch_point(moves(listing.with_suffix(".0"))) + 1  # cut right after it: the recovery must roll back
    trial(lab, path, [first, None], tmp_path / "recovery")
    recovery = moves((tmp_path / "recovery").with_suffix(".1"))
    assert recovery, "the recovery moved nothing"
    failures = {}
    for m in range(1, len(recovery) + 1):
        state, problems = trial(lab, path, [first, m], tmp_path / f"second-{m}")
        if problems:
            failures[f"recovery cut before {recovery[m - 1]}"] = problems
        elif state.installed_version != ("2.0.0" if path.healthy else "1.0.0"):
            failures[f"recovery cut before {recovery[m - 1]}"] = [f"ended on {state.installed_version}"]
    assert not failures, json.dumps(failures, indent=1)


def test_an_unconfirmed_switch_is_undone_at_start_even_when_the_broker_cannot_be_reached(lab: Lab,
                                                                                      tmp_path: Path) -> None:
    """A device that stays offline must not keep running what no health check confirmed: the
    rollback happens before the node starts or the broker is dialed (the agent then stays up,
    offline, dialing the broker). Online again, it tries the update again, and commits it only
    after its health check."""
    path = PATHS["ab-healthy"]
    trial(lab, path, [None], tmp_path / "listing")
    cut = switch_point(moves((tmp_path / "listing").with_suffix(".0"))) + 1
    lab.counter += 1
    device = lab.fleet.add_device(f"cut-{lab.counter}", path.device_class, start=False, extra_toml=path.settings)
    agent = cut_agent(device, tmp_path / "first", cut_at=cut, from_start=False)
    agent.wait_cut()
    assert sha256_file(device.spec.installed_file) == lab.v2, "the cut came after the switch"
    offline = device.process.config.with_name("offline.toml")
    offline.write_text(device.process.config.read_text().replace(f"port = {lab.fleet.broker_port}\n", "port = 9\n"))
    log = tmp_path / "offline.log"
    with open(log, "wb") as out:
        offline_agent = subprocess.Popen([sys.executable, "-m", "services.cli", "device", "run", "--config", str(offline)],
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
    try:
        # Its node is up and it waits for the broker (15 s): the rollback came before both.
        end = time.monotonic() + scaled(60)
        while "listening on" not in log.read_text() and offline_agent.poll() is None and time.monotonic() < end:
            time.sleep(0.1)
        assert offline_agent.poll() is None, log.read_text()[-3000:]
        assert sha256_file(device.spec.installed_file) == lab.v1 and not (device.spec.state_dir / "switch.json").exists()
        offline_agent.send_signal(signal.SIGTERM)
        assert offline_agent.wait(scaled(60)) == 0, log.read_text()[-3000:]
    finally:
        terminate(offline_agent)
    restarted = datetime.now(UTC)
    device.process.start()
    state = settle(lab.fleet, device, restarted)
    assert not check(lab, path, device, state) and state.installed_version == "2.0.0"
    since = [h.phase for h in lab.fleet.watcher.history[device.name] if h.timestamp >= restarted]
    assert since.index(Phase.CONFIRMING) < since.index(Phase.DONE), since
    device.process.stop()
