"""No file on disk makes the agent exit at start, and no install target makes it crash (issue 20, item 3).

One device, one file at a time: stop the agent, damage a file it persisted (or its install target),
start it again. The agent must come up, say what it found, keep running the version whose bytes
are installed, and still install a genuine release at the end.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from schemas.models import InstallSpec, Phase
from services.runtime.files import sha256_file
from tests.support.harness import Device, Fleet

pytestmark = pytest.mark.integration
IPC = "ipc-x86_64"
TARGET = "/opt/edgeswarm/firmware.img"

GARBAGE = {
    "bytes": b"\x00\xff garbage \xfe",
    "empty": b"",
    "wrong-json": b'{"installed_version": 7}',
    "huge": b"[" * (2 << 20),
}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path_factory.mktemp("restarts"))
    try:
        fleet.start()
        fleet.release(IPC, "1.0.0")
        yield fleet
    finally:
        fleet.stop()


def restart(fleet: Fleet, device: Device, damage: Callable[[], None]) -> datetime:
    device.process.stop()
    damage()
    since = datetime.now(UTC)
    device.process.start()
    return since


def alive_and_intact(fleet: Fleet, device: Device, since: datetime, v1: str) -> None:
    fleet.watcher.wait(device.name, lambda s: s.timestamp >= since and s.phase == Phase.IDLE, timeout=60)
    time.sleep(1.0)  # past the start-up: still running
    assert device.process.alive(), fleet.log(device.name)[-3000:]
    assert device.installed_sha256() == v1 and fleet.watcher.states[device.name].installed_sha256 == v1


@pytest.mark.parametrize("name", ["state.json", "root.json", "timestamp.json", "held.json", "switch.json",
                                  "ipfs/config", "peers.json"])
def test_a_damaged_persisted_file_never_stops_the_agent(fleet: Fleet, name: str) -> None:
    # peers.json (the peers the rendezvous found) is read only with the rendezvous on.
    device = fleet.add_device(f"damaged-{name.replace('/', '-').replace('.', '-')}", IPC,
                              content_settings=(("rendezvous", "true"),) if name == "peers.json" else ())
    fleet.watcher.wait(device.name, lambda s: s.phase == Phase.IDLE and s.last_sequence == 1)
    v1 = device.installed_sha256()
    path = device.spec.state_dir / name
    for kind, garbage in GARBAGE.items():
        since = restart(fleet, device, lambda: path.write_bytes(garbage))  # noqa: B023 - used at once
        alive_and_intact(fleet, device, since, v1)
        if name in ("state.json", "root.json"):
            said = [s for s in fleet.watcher.history[device.name] if s.timestamp >= since]
            assert any(s.reason_code == "state_reset" for s in said), f"{kind}: the reset was not reported"
        local = device.local_state()
        assert local["installed_sha256"] == v1, kind
    if name in ("state.json", "peers.json"):
        assert (device.spec.state_dir / f"{name}.damaged").exists(), "kept for a person to read"


def test_install_targets_an_agent_must_refuse_leave_it_running_and_say_why(fleet: Fleet, tmp_path: Path) -> None:
    """A link at the `file` target, and a relative link without a slot name at an `ab` target (which
    used to raise IndexError at every start): refused with `unsafe_path`, the agent alive."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    file_device = fleet.add_device("link-target", IPC)
    ab_device = fleet.add_device("ab-odd-link", "ipc-ab", extra_toml='[install]\nallowed_handlers = ["ab"]\n')
    for device in (file_device, ab_device):
        fleet.watcher.wait(device.name, lambda s: s.phase == Phase.IDLE)
    v1 = file_device.installed_sha256()

    def link_to_victim() -> None:
        target = file_device.spec.installed_file
        os.replace(target, target.with_name("kept"))
        os.symlink(victim, target)

    def odd_ab_link() -> None:
        target = ab_device.spec.installed_file
        os.replace(target, target.with_name("firmware"))
        os.symlink("firmware", target)

    since = restart(fleet, file_device, link_to_victim)
    fleet.watcher.wait(file_device.name, lambda s: s.timestamp >= since and s.phase == Phase.IDLE, timeout=60)
    since = restart(fleet, ab_device, odd_ab_link)
    fleet.watcher.wait(ab_device.name, lambda s: s.timestamp >= since and s.phase == Phase.IDLE, timeout=60)
    fleet.release_with(IPC, "2.0.0", InstallSpec(handler="file", target=TARGET))
    state = fleet.watcher.wait(file_device.name, lambda s: s.reason_code == "unsafe_path", timeout=60)
    assert state.phase == Phase.FAILED and "not a regular file" in (state.reason or "")
    assert victim.read_bytes() == b"precious" and file_device.process.alive()
    fleet.release_with("ipc-ab", "2.0.0", InstallSpec(handler="ab", target=TARGET))
    state = fleet.watcher.wait(ab_device.name, lambda s: s.reason_code == "unsafe_path", timeout=60)
    assert "not to one of its slots" in (state.reason or "")
    for device in (file_device, ab_device):
        since = restart(fleet, device, lambda: None)
        fleet.watcher.wait(device.name, lambda s: s.timestamp >= since, timeout=60)
        time.sleep(1.0)
        assert device.process.alive(), fleet.log(device.name)[-3000:]
    assert sha256_file(ab_device.spec.installed_file.with_name("firmware")) == v1


def test_after_the_damage_a_genuine_release_still_installs(fleet: Fleet) -> None:
    device = fleet.devices["damaged-state-json"]
    built = fleet.release_with(IPC, "3.0.0", InstallSpec(handler="file", target=TARGET))
    state = fleet.watcher.wait(device.name, lambda s: s.phase == Phase.DONE and s.installed_version == "3.0.0",
                               timeout=90)
    assert state.installed_sha256 == built.manifest.artifact.sha256 == device.installed_sha256()
