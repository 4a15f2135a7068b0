"""An island (issue 14, item 5; CI-sized): three devices behind a router whose firewall drops
everything towards the broker and the origin, and a fourth on that LAN with a second link out. The
island devices never reach the broker or the origin; they hear the release from the bridging device
over gossip (found by mDNS) and fetch its blocks from it. Each must install 2.0.0 byte for byte, and
its signed report of it must reach the fleet record through the bridge within 10 s (item 3)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from services.demo.provision import DEFAULT_TARGET
from tests.support import netlab
from tests.support.deadlines import scaled
from tests.support.island import run_island

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(netlab.available() is not None, reason=f"NAT lab unavailable: {netlab.available()}"),
]


def test_devices_behind_a_firewall_that_blocks_broker_and_origin_update_through_one_bridging_device(
        tmp_path: Path) -> None:
    result = run_island(tmp_path, devices=3, size=4 << 20)
    summary = {k: v for k, v in vars(result).items() if k != "logs"}
    print(json.dumps(summary))
    assert result.bridge_seconds is not None, result.logs["bridge"][-3000:]
    assert result.completed == 3, "\n\n".join(f"{n}:\n{log[-2500:]}" for n, log in result.logs.items() if n != "bridge")
    expected = hashlib.sha256((tmp_path / "fw-2.0.0.img").read_bytes()).hexdigest()
    for name in result.installed:
        installed = tmp_path / "devices" / name / "sysroot" / DEFAULT_TARGET.lstrip("/")
        assert hashlib.sha256(installed.read_bytes()).hexdigest() == expected
        log = result.logs[name]
        assert "carrying on offline" in log and "heard edgeswarm/lab/releases/gw from peer" in log
        assert "IPFS node" in log
    # Only the bridge fetched from the origin: one copy of the artifact, and what the DAG adds.
    assert result.origin_egress <= 1.25 * result.artifact_size, summary
    # Every island device's signed report came back through the bridge, within 10 s of its install.
    assert sorted(result.reported) == sorted(result.installed), summary
    assert set(result.heard.values()) == {"relayed by bridge"}, summary
    assert max(result.reported.values()) <= scaled(10), summary
