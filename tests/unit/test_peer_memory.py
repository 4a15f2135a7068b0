"""The peers a device remembers from its last rendezvous (device_client.peer_memory), and the
rendezvous dialing them at start (device_client.rendezvous.Rendezvous.dial_remembered)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_client.peer_memory import RememberedPeers
from device_client.rendezvous import Rendezvous

A = "/ip4/192.168.7.20/tcp/4001/p2p/QmRuVASPUnz5nThBw5zv2BXqxGqcwgQxNMQhcwHouCxT8K"
A_MOVED = "/ip4/10.0.3.9/tcp/4101/p2p/QmRuVASPUnz5nThBw5zv2BXqxGqcwgQxNMQhcwHouCxT8K"
B = "/dns4/gw-7.plant.invalid/tcp/4001/p2p/12D3KooWH65ZT24roCtyrMXRShFyM47hcyKVFcRsk7rQMdm9k4xd"


def peer(n: int) -> str:
    return f"/ip4/10.0.0.{n}/tcp/4001/p2p/Qm{'abcdefghijkmnopqrstuvwxyz'[n % 25] * 44}"


def test_connected_peers_are_remembered_newest_first_one_address_per_peer_and_bounded(tmp_path: Path) -> None:
    memory = RememberedPeers(tmp_path / "peers.json", limit=4)
    memory.remember(A)
    memory.remember(B)
    memory.remember(A_MOVED)  # the same peer at a new address replaces the old one
    assert RememberedPeers(tmp_path / "peers.json").load() == [A_MOVED, B]
    for n in range(10):
        memory.remember(peer(n))
    assert RememberedPeers(tmp_path / "peers.json").load() == [peer(n) for n in (9, 8, 7, 6)]


@pytest.mark.parametrize("address", ["", "/ip4/1.2.3.4/tcp/4001", "/ip4/1.2.3.4/udp/4001/quic/p2p/QmRuVASPUnz5nThBw5zv2BXqxGqcwgQxNMQhcwHouCxT8K",
                                     "/ip4/1.2.3.4/tcp/4001/p2p/Qm0OIl" + "x" * 40, "/ip4/../tcp/1/p2p/" + "Q" * 46 + "/../x",
                                     "/unix/run/x/tcp/1/p2p/QmRuVASPUnz5nThBw5zv2BXqxGqcwgQxNMQhcwHouCxT8K"])
def test_an_address_that_is_no_dialable_peer_is_never_remembered(tmp_path: Path, address: str) -> None:
    memory = RememberedPeers(tmp_path / "peers.json")
    memory.remember(address)
    assert memory.load() == [] and not (tmp_path / "peers.json").exists()


@pytest.mark.parametrize("content", [
    b"", b"\xff\xfe\x00garbage", b"not json", b"[1, 2, 3]", b'{"peers": "x"}', b"[" * 100_000,
    b'{"peers": [' + b'"' + b"a" * 70_000 + b'"]}',  # larger than any real list of 16
])
def test_a_damaged_file_is_set_aside_and_nothing_is_remembered(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "peers.json"
    path.write_bytes(content)
    memory = RememberedPeers(path)
    assert memory.load() == []
    assert (tmp_path / "peers.json.damaged").read_bytes() == content and not path.exists()
    memory.remember(A)  # and the next connection starts a good one
    assert json.loads(path.read_text()) == {"peers": [A]}


def test_entries_that_are_no_addresses_are_skipped_and_the_rest_kept(tmp_path: Path) -> None:
    path = tmp_path / "peers.json"
    path.write_text(json.dumps({"peers": [1, None, {"a": A}, "/ip4/x", A, A_MOVED, B, *[peer(n) for n in range(30)]]}))
    loaded = RememberedPeers(path, limit=16).load()
    assert loaded[:2] == [A, B] and len(loaded) == 16  # A_MOVED: a second address of A's peer


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.one_of(st.binary(max_size=512), st.text(max_size=512).map(str.encode),
                         st.lists(st.one_of(st.text(max_size=80), st.integers(), st.none()), max_size=20)
                         .map(lambda items: json.dumps({"peers": items}).encode())))
def test_whatever_the_file_holds_loading_never_fails_and_yields_only_dialable_addresses(
        tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "peers.json"
    path.write_bytes(content)
    for address in RememberedPeers(path).load():
        assert "/tcp/" in address and "/p2p/" in address
    path.unlink(missing_ok=True)
    (tmp_path / "peers.json.damaged").unlink(missing_ok=True)


def test_a_file_that_cannot_be_written_leaves_the_peers_remembered_for_this_run(tmp_path: Path) -> None:
    memory = RememberedPeers(tmp_path / "missing-dir" / "peers.json")
    memory.remember(A)
    assert memory.load() == [A]


class FakeStore:
    """Only `connect`: which addresses answer is the test's choice."""

    def __init__(self, reachable: set[str]) -> None:
        self.reachable = reachable
        self.dialed: list[str] = []

    async def connect(self, multiaddr: str) -> bool:
        self.dialed.append(multiaddr)
        await asyncio.sleep(0)
        return multiaddr in self.reachable


def test_remembered_peers_are_dialed_at_start_and_count_as_connected(tmp_path: Path) -> None:
    memory = RememberedPeers(tmp_path / "peers.json")
    memory.remember(B)
    memory.remember(A)
    store = FakeStore({A})

    async def scenario() -> dict[str, str]:
        rendezvous = Rendezvous(None, store, fleet="f", device="d1", device_class="c",  # type: ignore[arg-type]
                                max_message_bytes=65536, max_peers=8, memory=RememberedPeers(tmp_path / "peers.json"))
        rendezvous.dial_remembered()
        for _ in range(10):
            await asyncio.sleep(0)
        return rendezvous.dialed

    dialed = asyncio.run(scenario())
    assert sorted(store.dialed) == sorted([A, B])
    assert dialed == {A.rsplit("/", 1)[1]: "connected", B.rsplit("/", 1)[1]: "unreachable"}
