"""An island (issue 14, item 5; CI-sized): three devices behind a router whose firewall drops
everything towards the broker and the origin, and a fourth on that LAN with a second link out. The
island devices never reach the broker or the origin; they hear the release from the bridging device
over gossip (found by mDNS) and fetch its blocks from it. Each must install 2.0.0 byte for byte, and
its signed report of it must reach the fleet record through the bridge within 10 s (item 3). The
third reaches the broker itself through the bridge's libp2p tunnel (item 2): its report is recorded
as "tunnel via bridge" and a command reaches it."""

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
    result = run_island(tmp_path, devices=3, size=4 << 20, tunnelled=1)
    summary = {k: v for k, v in vars(result).items() if k != "logs"}
    print(json.dumps(summary))
    assert result.bridge_seconds is not None, result.logs["bridge"][-3000:]
    assert result.completed == 3, "\n\n".join(f"{n}:\n{log[-2500:]}" for n, log in result.logs.items() if n != "bridge")
    expected = hashlib.sha256((tmp_path / "fw-2.0.0.img").read_bytes()).hexdigest()
    for name in result.installed:
        installed = tmp_path / "devices" / name / "sysroot" / DEFAULT_TARGET.lstrip("/")
        assert hashlib.sha256(installed.read_bytes()).hexdigest() == expected
        log = result.logs[name]
        assert "carrying on offline" in log and "IPFS node" in log
        if name != "i03":
            assert "heard edgeswarm/lab/releases/gw from peer" in log
    # Only the bridge fetched from the origin: one copy of the artifact, and what the DAG adds.
    assert result.origin_egress <= 1.25 * result.artifact_size, summary
    # i01 and i02 never use a tunnel: their signed reports came back through the bridge, within 10 s
    # of their install (item 3).
    assert sorted(result.reported) == ["i01", "i02"], summary
    assert result.heard == {"i01": "relayed by bridge", "i02": "relayed by bridge", "i03": "tunnel via bridge"}, summary
    assert max(result.reported.values()) <= scaled(10), summary
    # i03 reached the broker through the bridge's tunnel (item 2): with its own login, its persistent
    # session took the release and a command, as if it were connected.
    assert "reaching the broker through peer bridge" in result.logs["i03"]
    assert "carrying a peer's connection to the broker" in result.logs["bridge"]
    assert result.commanded == {"i03": True}, result.logs["i03"][-3000:]
