"""A disk that fills up during an update, and one too small from the start (issue 15, item 5).

Each device lives on a tmpfs of its own (state, IPFS repository, downloads and install target on
one small file system, as on many devices). The real agent runs under tests/support/cut_agent.py,
which fills that file system (all but 256 KiB, for the small state files) the moment a phase
begins: downloading, patching or installing. Whatever the phase, the device must report `failed`
with reason `disk_full`, keep its working version byte for byte, leave no half-written file, wait
without spending attempts while there is no room, and install the release once room is freed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from schemas.models import DeviceState, InstallSpec, Phase
from services.runtime.files import sha256_file
from tests.support.full_disk import SmallDisk, half_written
from tests.support.harness import Fleet
from tests.support.power_chaos import TARGET, CutAgent

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600),
              pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs per device: run as root")]

# phase -> (handler, a write during that phase to fill the disk at: None, the phase's own start).
# The fetch is filled at held.json's write: after the check for room, just before the first block.
CASES = {"downloading": ("file", "held.json"), "patching": ("ab", None), "installing": ("file", None)}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path_factory.mktemp("disk-full"))
    try:
        fleet.start()
        for handler in ("file", "ab"):
            install = InstallSpec(handler=handler, target=TARGET)
            if handler == "ab":
                fleet.build_only("ipc-full-ab", "1.0.0", install=install)  # so 2.0.0 carries a delta
            built = fleet.release_with(f"ipc-full-{handler}", "2.0.0", install)
            assert bool(built.manifest.deltas) == (handler == "ab")
        yield fleet
    finally:
        fleet.stop()


def wait_report(fleet: Fleet, name: str, since: datetime, predicate, timeout: float = 60) -> DeviceState:  # noqa: ANN001
    return fleet.watcher.wait(name, lambda s: s.timestamp >= since and predicate(s), timeout=timeout)


@pytest.mark.parametrize("phase", list(CASES))
def test_a_disk_that_fills_during_an_update_fails_clearly_keeps_the_old_version_and_recovers(
        fleet: Fleet, phase: str, tmp_path: Path) -> None:
    handler, on_file = CASES[phase]
    name = f"full-{phase}"
    device = fleet.add_device(name, f"ipc-full-{handler}", start=False, retry_interval=2.0,
                              extra_toml=f'[install]\nallowed_handlers = ["{handler}"]\n')
    v1 = sha256_file(device.spec.installed_file)
    disk = SmallDisk(device)
    hog = device.spec.base_dir / "hog"
    started = datetime.now(UTC)
    agent = CutAgent(device, ["--events", str(tmp_path / "events.jsonl"), "--fill", str(hog), "--fill-on-phase", phase,
                              *(["--fill-on-file", on_file] if on_file else [])])
    try:
        failed = wait_report(fleet, name, started, lambda s: s.phase == Phase.FAILED)
        assert failed.reason_code == "disk_full", failed
        assert failed.installed_version == "1.0.0" and failed.retrying, failed
        assert "not enough room" not in (failed.reason or ""), "the room was there when the update began"
        assert sha256_file(device.spec.installed_file) == v1, "the working version is intact"
        assert json.loads((device.spec.state_dir / "state.json").read_text())["installed_sha256"] == v1
        assert not half_written(device), half_written(device)
        assert any("filled" in line for line in (tmp_path / "events.jsonl").read_text().splitlines())
        # No room yet: it checks again without fetching or spending an attempt, and says why.
        waiting = wait_report(fleet, name, failed.timestamp, lambda s: s.phase == Phase.FAILED and s.timestamp > failed.timestamp)
        assert waiting.reason_code == "disk_full" and "checking again" in (waiting.reason or ""), waiting
        assert "bytes free" in (waiting.reason or "") and waiting.installed_sha256 == v1
        attempts = json.loads((device.spec.state_dir / "state.json").read_text())["pending"]["attempts"]
        hog.unlink()  # room again
        done = wait_report(fleet, name, waiting.timestamp, lambda s: s.phase == Phase.DONE, timeout=60)
        assert done.installed_version == "2.0.0" and sha256_file(device.spec.installed_file) == done.installed_sha256
        assert attempts <= 1, "only the attempt that ran out of room on the way counted"
        assert not list((device.spec.state_dir / "downloads").iterdir())
    finally:
        agent.stop()
        disk.close()


def test_a_disk_too_small_from_the_start_is_said_before_anything_is_fetched(fleet: Fleet) -> None:
    """Room for the node but not for the update: refused up front (nothing fetched, no attempt
    spent), said with the figures, and installed as soon as the file system grows."""
    name = "full-small"
    device = fleet.add_device(name, "ipc-full-file", start=False, retry_interval=2.0,
                              extra_toml='[install]\nallowed_handlers = ["file"]\n')
    v1 = sha256_file(device.spec.installed_file)
    disk = SmallDisk(device)
    disk.resize(str(disk.used() + (4 << 20)))
    started = datetime.now(UTC)
    device.process.start()
    try:
        first = wait_report(fleet, name, started, lambda s: s.phase in (Phase.FAILED, Phase.DONE))
        assert first.phase == Phase.FAILED and first.reason_code == "disk_full", first
        assert "not enough room for 2.0.0" in (first.reason or "") and "checking again" in (first.reason or "")
        assert first.bytes_from_origin == first.bytes_from_peers == 0, "nothing was fetched"
        again = wait_report(fleet, name, first.timestamp, lambda s: s.phase == Phase.FAILED and s.timestamp > first.timestamp)
        assert again.reason_code == "disk_full"
        assert json.loads((device.spec.state_dir / "state.json").read_text())["pending"]["attempts"] == 0
        assert sha256_file(device.spec.installed_file) == v1 and not half_written(device)
        disk.resize("200m")
        done = wait_report(fleet, name, again.timestamp, lambda s: s.phase == Phase.DONE)
        assert done.installed_version == "2.0.0" and sha256_file(device.spec.installed_file) == done.installed_sha256
    finally:
        device.process.stop()
        disk.close()
