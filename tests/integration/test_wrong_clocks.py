"""Devices whose wall clock is wrong, and a clock that jumps during an update (issue 15, item 6).

The real agent runs under tests/support/cut_agent.py with `--clock FILE`: its wall clock (what the
trust rules, the stored timestamp's check at start and the reports read) is off by the seconds FILE
holds, set or jumped while it runs; monotonic timers and the IPFS node keep the real time, as on a
device whose RTC is wrong. What docs/reliability.md promises:

- ahead: every timestamp looks expired, so the device refuses them (`expired`) and reports
  `frozen`; it installs nothing, keeps its working version and keeps running; once the clock is
  right, the next timestamp lets the release through;
- behind: documents look fresh for longer: the release is accepted (the expiry bounds a freeze only
  for a clock that is right or ahead);
- a jump ahead in the middle of an update: the update verified before the jump completes; then
  the device reports `frozen` until the clock is right and a fresh timestamp arrives.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from schemas.models import DeviceState, Phase
from services.runtime.files import sha256_file
from tests.support.harness import Device, Fleet
from tests.support.power_chaos import CutAgent

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

IPC = "ipc-x86_64"
DAYS = 24 * 3600


@pytest.fixture
def fleet(fleet: Fleet) -> Fleet:
    """The conftest's fleet, with 1.0.0 released (what the devices run)."""
    fleet.release(IPC, "1.0.0")
    return fleet


def seen(fleet: Fleet, name: str, after: int, predicate: Callable[[DeviceState], bool], timeout: float = 60) -> DeviceState:
    found = fleet.watcher.first_after(name, after, predicate, timeout)
    assert found is not None, f"{name}: no such report after {after}: {fleet.watcher.history.get(name, [])[after:]}"
    return found


def start(fleet: Fleet, name: str, clock: Path, offset: float, *jump: str) -> tuple[Device, CutAgent]:
    clock.write_text(f"{offset}\n")
    device = fleet.add_device(name, IPC, start=False, retry_interval=2.0)
    return device, CutAgent(device, ["--clock", str(clock), *jump])


def test_a_clock_days_ahead_freezes_the_device_on_its_working_version_until_the_clock_is_right(
        fleet: Fleet, tmp_path: Path) -> None:
    clock = tmp_path / "clock"
    device, agent = start(fleet, "ahead", clock, 3 * DAYS)
    try:
        v1 = sha256_file(device.spec.installed_file)
        refused = seen(fleet, "ahead", 0, lambda s: s.reason_code == "expired")
        assert "timestamp" in (refused.reason or "") and refused.installed_version == "1.0.0"
        before = fleet.watcher.heard("ahead")
        fleet.release(IPC, "2.0.0")
        seen(fleet, "ahead", before, lambda s: s.reason_code == "frozen")
        time.sleep(3)  # and nothing is installed while the clock is wrong
        assert all(s.phase not in (Phase.DOWNLOADING, Phase.DONE) for s in fleet.watcher.history["ahead"])
        assert sha256_file(device.spec.installed_file) == v1 and agent.proc.poll() is None, "frozen, not crashed"
        clock.write_text("0\n")  # NTP, say; the next timestamp the operator side signs gets through
        before = fleet.watcher.heard("ahead")
        fleet.publish_timestamp()
        done = seen(fleet, "ahead", before, lambda s: s.phase == Phase.DONE)
        assert done.installed_version == "2.0.0" and sha256_file(device.spec.installed_file) == done.installed_sha256
    finally:
        agent.stop()


def test_a_clock_days_behind_accepts_what_is_signed_and_not_yet_expired_for_it(fleet: Fleet, tmp_path: Path) -> None:
    device, agent = start(fleet, "behind", tmp_path / "clock", -3 * DAYS)
    try:
        seen(fleet, "behind", 0, lambda s: s.phase == Phase.IDLE)
        fleet.release(IPC, "2.0.0")
        done = seen(fleet, "behind", 0, lambda s: s.phase == Phase.DONE)
        assert done.installed_version == "2.0.0" and sha256_file(device.spec.installed_file) == done.installed_sha256
        assert done.timestamp.timestamp() < time.time() - 2 * DAYS, "its reports carry its own clock"
        assert not [s for s in fleet.watcher.history["behind"] if s.reason_code in ("expired", "frozen")]
    finally:
        agent.stop()


def test_a_clock_that_jumps_ahead_during_an_update_finishes_it_then_freezes_and_recovers(
        fleet: Fleet, tmp_path: Path) -> None:
    clock = tmp_path / "clock"
    device, agent = start(fleet, "jumpy", clock, 0, "--jump-on-phase", "downloading", "--jump-to", str(3 * DAYS))
    try:
        seen(fleet, "jumpy", 0, lambda s: s.phase == Phase.IDLE)
        before = fleet.watcher.heard("jumpy")
        fleet.release(IPC, "2.0.0")
        done = seen(fleet, "jumpy", before, lambda s: s.phase == Phase.DONE)
        assert float(clock.read_text()) == 3 * DAYS, "the clock jumped during the update"
        assert done.installed_version == "2.0.0" and sha256_file(device.spec.installed_file) == done.installed_sha256
        frozen = seen(fleet, "jumpy", before, lambda s: s.phase == Phase.FROZEN)
        assert frozen.installed_version == "2.0.0" and "expired" in (frozen.reason or "")
        clock.write_text("0\n")
        after = fleet.watcher.heard("jumpy")
        fleet.publish_timestamp()
        idle = seen(fleet, "jumpy", after, lambda s: s.phase == Phase.IDLE)
        assert idle.installed_version == "2.0.0" and agent.proc.poll() is None
    finally:
        agent.stop()
