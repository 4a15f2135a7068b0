"""A node refuses a peer the gossip gate banned (EmbeddedKuboNode.block): real nodes on loopback.

Ignoring a flooding peer at the gossip gate is not enough: the node still reads, verifies and
remembers each of its messages. So the node refuses every connection of that peer, by peer id
through libp2p's resource manager (its address would not do: a peer picks its source address),
and never refuses itself or a configured peer such as the origin."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from services.runtime.content import EmbeddedKuboNode, KuboConfig
from services.runtime.content._kubo_config import write_repo_config

pytestmark = pytest.mark.integration


def node(tmp_path: Path, name: str, peers: list[str] | None = None, kept: list[str] | None = None) -> EmbeddedKuboNode:
    return EmbeddedKuboNode(KuboConfig(repo=tmp_path / name, swarm_port=0, routing="none", peers=peers or [],
                                       kept=kept or []))


async def connected(a: EmbeddedKuboNode, b: EmbeddedKuboNode) -> bool:
    """Whether `b` can dial `a` and stay connected for a moment (a refused connection is closed
    right after its handshake, which may first look like success to the dialer)."""
    await b.connect(a.multiaddr)
    await asyncio.sleep(0.5)
    return any(address.endswith("/" + b.peer_id) for address in a.peers())


def test_a_blocked_peer_is_cut_off_and_cannot_dial_back_until_its_block_ends(tmp_path: Path) -> None:
    previous = Path.cwd()
    os.chdir(tmp_path)  # kubo.log

    async def scenario() -> None:
        async with node(tmp_path, "origin") as origin, node(tmp_path, "hostile") as hostile, \
                node(tmp_path, "sybil") as sybil, node(tmp_path, "honest") as honest:
            async with node(tmp_path, "device", peers=[origin.multiaddr], kept=["QmTheOriginDialedAfterAGrace"]) as device:
                assert await connected(device, hostile) and await connected(device, sybil)
                assert await connected(device, honest)
                # Two at once (a flood from two identities) share one restart.
                assert device.block(hostile.peer_id, seconds=3.0) and device.block(sybil.peer_id, seconds=3.0)
                await asyncio.sleep(1.5)
                peers = device.peers()
                assert not any(p.endswith(("/" + hostile.peer_id, "/" + sybil.peer_id)) for p in peers), peers
                assert any(p.endswith("/" + origin.peer_id) for p in peers), peers  # configured peers are redialed
                assert not await connected(device, hostile), "a blocked peer dialed back in"
                assert not await connected(device, sybil), "the second blocked peer dialed back in"
                assert await connected(device, honest), "an honest peer was refused with the blocked ones"

                # Never itself, a configured peer or a kept one (the origin): whatever they send.
                assert not device.block(origin.peer_id, seconds=3.0)
                assert not device.block(device.peer_id, seconds=3.0)
                assert not device.block("QmTheOriginDialedAfterAGrace", seconds=3.0)
                limits = json.loads((tmp_path / "device" / "libp2p-resource-limit-overrides.json").read_text())
                assert set(limits["Peer"]) == {hostile.peer_id, sybil.peer_id}

                # The blocks end: the next restart after that lets those peers in again.
                await asyncio.sleep(2.0)
                assert device.block(honest.peer_id, seconds=60.0)  # (its restart: after the gap that follows two in a row)
                await asyncio.sleep(2.0)
                limits = json.loads((tmp_path / "device" / "libp2p-resource-limit-overrides.json").read_text())
                assert set(limits["Peer"]) == {honest.peer_id}
                assert await connected(device, hostile)
                assert not await connected(device, honest)

    try:
        asyncio.run(scenario())
    finally:
        os.chdir(previous)


def test_blocked_peers_and_the_origins_connection_limit_share_one_limits_file(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "config").write_text(json.dumps({"Addresses": {}, "Discovery": {"MDNS": {}}, "Swarm": {}}))
    limits = repo / "libp2p-resource-limit-overrides.json"

    write_repo_config(KuboConfig(repo=repo, max_connections=1, blocked=["12D3KooWbad"]))
    written = json.loads(limits.read_text())
    assert written["System"] == {"Conns": 1, "ConnsInbound": 1, "ConnsOutbound": 0}
    assert written["Peer"]["12D3KooWbad"]["ConnsInbound"] == "blockAll"
    assert set(written["Peer"]["12D3KooWbad"].values()) == {"blockAll"}

    write_repo_config(KuboConfig(repo=repo, blocked=["12D3KooWbad"]))
    assert set(json.loads(limits.read_text())) == {"Peer"}

    write_repo_config(KuboConfig(repo=repo))
    assert not limits.exists()


def test_messages_of_an_ignored_sender_are_dropped_before_their_data_is_read(tmp_path: Path) -> None:
    previous = Path.cwd()
    os.chdir(tmp_path)

    async def scenario() -> tuple[list[bytes], list[bytes]]:
        async with node(tmp_path, "a") as a, node(tmp_path, "b") as b:
            a.pubsub_join("t")
            b.pubsub_join("t")
            assert await b.connect(a.multiaddr)
            for _ in range(50):  # the mesh forms after the dial
                if a.pubsub_peers("t"):
                    break
                await asyncio.sleep(0.1)
            seen: dict[bool, list[bytes]] = {True: [], False: []}
            for ignoring in (True, False):
                await b.pubsub_publish("t", b"flood %d" % ignoring)
                await asyncio.sleep(0.5)
                while (message := a.pubsub_next(lambda sender: ignoring and sender == b.peer_id)) is not None:
                    seen[ignoring].append(message.data)
            return seen[True], seen[False]

    try:
        ignored, read = asyncio.run(scenario())
    finally:
        os.chdir(previous)
    assert ignored == [b""]  # a placeholder on no topic, without its data
    assert read == [b"flood 0"]
