"""The pure parts of peer-to-peer: the router from the route table, announcements, the grace spread."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pydantic
import pytest

from schemas.models import PeerAnnouncement
from services.runtime.natpmp import gateway
from services.runtime.traffic import on_link

ROUTES = """Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t0000630A\t0165650A\t0003\t0\t0\t0\t00FFFFFF\t0\t0\t0
eth0\t0065650A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
"""
PEER = "QmYNZfidxL4NArud6KudXv52JEwqd78Gnob9WhvB6i1TKL"


def test_the_router_is_the_default_gateway_else_any_gateway(tmp_path: Path) -> None:
    table = tmp_path / "route"
    table.write_text(ROUTES)
    assert gateway(table) == "10.101.101.1"  # the lab's devices have only a route to the WAN via their router
    table.write_text(ROUTES + "eth1\t00000000\t0101A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n")
    assert gateway(table) == "192.168.1.1"  # a default route wins
    table.write_text(ROUTES.splitlines()[0] + "\neth0\t0065650A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n")
    assert gateway(table) is None


def announcement(**changes: object) -> PeerAnnouncement:
    fields: dict[str, object] = {"device": "d1", "device_class": "gw", "peer_id": PEER,
                                 "addrs": [f"/ip4/10.99.0.11/tcp/4002/p2p/{PEER}"], "timestamp": datetime.now(UTC)}
    return PeerAnnouncement.model_validate({**fields, **changes})


def test_announcements_carry_only_dialable_tcp_addresses() -> None:
    assert announcement().addrs[0].startswith("/ip4/10.99.0.11/tcp/4002")
    for bad in (["/dns4/evil.example/tcp/1/p2p/" + PEER], ["/ip4/10.0.0.1/udp/1/quic/p2p/" + PEER], [],
                [f"/ip4/10.0.0.{i}/tcp/1/p2p/{PEER}" for i in range(9)], ["/ip4/10.0.0.1/tcp/1"]):
        with pytest.raises(pydantic.ValidationError):
            announcement(addrs=bad)


def test_loopback_and_routed_addresses_are_not_lan_peers() -> None:
    assert on_link("127.0.0.1") is False
    assert on_link("not-an-address") is False


def test_peers_that_delivered_get_more_patience_before_the_origin() -> None:
    from device_client.updater import origin_patience

    assert origin_patience(2.0, 60.0, peers_delivered=False) == 2.0  # nobody has anything yet: ask the origin soon
    assert origin_patience(2.0, 60.0, peers_delivered=True) == 30.0  # a seeding peer's restart is not a reason
    assert origin_patience(40.0, 60.0, peers_delivered=True) == 40.0  # never less than the configured grace
