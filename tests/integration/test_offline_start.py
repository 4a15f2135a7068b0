"""Starts and stops the broker does not see (found by the swarm chaos trials, issue 15 item 4).

A device that starts while its broker cannot be reached (an uplink down, a broker away) keeps
running: its agent stays up offline, dialing the broker again, and once the broker answers it
reports and installs what is released (a device restarted behind a cut uplink used to exit and
never update). A SIGTERM during a long download stops the agent without waiting for the update."""

from __future__ import annotations

import signal
import time
from datetime import UTC, datetime

import pytest

from schemas.models import Phase
from tests.support.deadlines import scaled
from tests.support.harness import Fleet, ServiceProcess, wait_port
from tests.support.trickle_proxy import trickling_origin

pytestmark = pytest.mark.integration
IPC = "ipc-x86_64"


def test_an_agent_started_without_its_broker_stays_up_and_reports_once_the_broker_answers(fleet: Fleet) -> None:
    fleet.release(IPC, "1.0.0")
    broker = fleet.processes[0]
    broker.proc.kill()
    broker.proc.wait()
    device = fleet.add_device("ipc-offline", IPC)
    # Longer than the client's connect timeout (15 s): the agent used to exit there.
    deadline = time.monotonic() + scaled(25)
    while time.monotonic() < deadline and "carrying on offline" not in fleet.log(device.name):
        time.sleep(0.2)
    time.sleep(2)
    assert device.process.alive(), fleet.log(device.name)[-3000:]
    assert "carrying on offline" in fleet.log(device.name)
    since = datetime.now(UTC)
    fleet.processes[0] = ServiceProcess(["broker", "run", "--port", str(fleet.broker_port)], fleet.root / "broker.log",
                                        fleet.root)
    wait_port(fleet.broker_port)
    # It reports once the broker answers: frozen, since it never heard a timestamp (the embedded
    # broker keeps its retained messages in memory, so the restarted one has none until the next release).
    fleet.watcher.wait(device.name, lambda s: s.phase in (Phase.IDLE, Phase.FROZEN) and s.installed_version == "1.0.0",
                       timeout=60)
    fleet.watcher.wait_online(device.name, b"online", timeout=60)
    manifest = fleet.release(IPC, "2.0.0")
    state = fleet.watcher.wait(device.name, lambda s: s.timestamp >= since and s.phase == Phase.DONE, timeout=90)
    assert state.installed_version == "2.0.0" and device.installed_sha256() == manifest.artifact.sha256 == state.installed_sha256


def test_sigterm_during_a_long_download_stops_the_agent_at_once_and_the_download_resumes(fleet: Fleet) -> None:
    """A stop used to wait until the whole update was over (the update ran inside the message
    handler): with a slow link that is minutes, and a supervisor then kills the agent anyway."""
    fleet.release(IPC, "1.0.0")
    with trickling_origin(fleet.origin_addr, 250_000) as slow_origin:
        device = fleet.add_device("ipc-slow", IPC, origin=slow_origin)
        fleet.watcher.wait(device.name, lambda s: s.phase == Phase.IDLE and s.last_sequence == 1)
        full_only = fleet.build_only(IPC, "2.0.0").manifest.model_copy(update={"deltas": {}})  # ~6 MB: ~25 s here
        sent = datetime.now(UTC)
        fleet.vouch_and_publish(IPC, full_only)
        fleet.watcher.wait(device.name, lambda s: s.timestamp >= sent and s.phase == Phase.DOWNLOADING
                           and (s.progress or 0) > 0, timeout=60)
        assert device.process.proc is not None
        stopping = time.monotonic()
        device.process.proc.send_signal(signal.SIGTERM)
        device.process.proc.wait(scaled(15))
        assert time.monotonic() - stopping < scaled(10), "the stop waited for the download"
        assert "stopping during a download" in fleet.log(device.name)
        persisted = device.local_state()
        assert persisted["pending"]["phase"] == "downloading" and persisted["installed_version"] == "1.0.0"
        assert fleet.watcher.online[device.name] == b"offline"
        fleet.start_device(device.name)
        state = fleet.watcher.wait(device.name, lambda s: s.timestamp >= sent and s.phase == Phase.DONE, timeout=120)
        assert state.installed_version == "2.0.0" and device.installed_sha256() == full_only.artifact.sha256
