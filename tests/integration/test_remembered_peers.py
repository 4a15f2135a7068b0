"""A device that starts without its broker dials the peers its last rendezvous found, and reaches the
broker through one of them (issue 14, item 2: peers "known from the last rendezvous, which it
persists"). Real agents, broker and nodes on loopback; no mDNS, and the cut-off device is configured
with no peers at all, so the remembered one is the only peer it can know of."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from schemas.models import Phase
from services.demo.processes import terminate
from tests.support.deadlines import wait_until
from tests.support.harness import Fleet
from tests.support.ports import free_port

pytestmark = pytest.mark.integration
IPC = "ipc-x86_64"
RENDEZVOUS = (("rendezvous", "true"),)


def forwarder(port: int, to_port: int) -> subprocess.Popen[bytes]:
    """A plain TCP forwarder on `port` to the broker: the device's uplink, which the test cuts."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.trickle_proxy", "--port", str(port), "--to",
                             f"127.0.0.1:{to_port}", "--rate", "1e9"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, start_new_session=True,
                            cwd=Path(__file__).parents[2])
    assert proc.stdout is not None and proc.stdout.readline().split()[0] == b"ready"
    return proc


def test_a_device_started_without_its_broker_reaches_it_through_a_peer_remembered_from_the_rendezvous(
        tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    uplink: subprocess.Popen[bytes] | None = None
    try:
        fleet.start()
        fleet.release(IPC, "1.0.0")
        gateway = fleet.add_device("gateway", IPC, content_settings=RENDEZVOUS)
        port = free_port()
        uplink = forwarder(port, fleet.broker_port)
        roamer = fleet.add_device("roamer", IPC, broker=(port, None), peers=(), content_settings=RENDEZVOUS,
                                  mqtt_extra=(("tunnel_after", "3"),))
        gateway_id = fleet.node_address(gateway.name).rsplit("/", 1)[1]
        memory = roamer.spec.state_dir / "peers.json"
        wait_until(lambda: memory.exists() and gateway_id in memory.read_text(), 40,
                   "the roamer to remember the gateway from the rendezvous", lambda: fleet.log(roamer.name))
        fleet.watcher.wait(roamer.name, lambda s: s.phase == Phase.IDLE and s.tunnel_via is None)

        # The roamer goes down, and comes back where its broker is out of reach.
        roamer.process.stop()
        terminate(uplink)
        uplink = None
        before = fleet.watcher.heard(roamer.name)
        fleet.start_device(roamer.name)
        state = fleet.watcher.first_after(roamer.name, before, lambda s: s.tunnel_via == gateway.name, timeout=60)
        log = fleet.log(roamer.name)
        assert state is not None, log[-4000:]
        assert "dialing 1 peer(s) remembered from the last run" in log
        assert f"remembered peer {json.loads(memory.read_text())['peers'][0]} connected" in log
        assert state.installed_version == "1.0.0"

        # Its session works through the tunnel: the next release reaches it and it installs it.
        manifest = fleet.release(IPC, "2.0.0")
        fleet.watcher.wait(roamer.name, lambda s: s.phase == Phase.DONE and s.installed_version == "2.0.0", timeout=120)
        assert roamer.installed_sha256() == manifest.artifact.sha256
    finally:
        if uplink is not None:
            terminate(uplink)
        fleet.stop()
