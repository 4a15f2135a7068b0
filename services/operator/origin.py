"""The origin: the operator's IPFS node, serving every file a release put in <home>/seed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from schemas import topics
from services.operator.home import OperatorHome
from services.runtime.addresses import WILDCARDS, host_addresses, local_address
from services.runtime.content import EmbeddedKuboNode, KuboConfig, load_swarm_key
from services.runtime.files import atomic_write
from services.runtime.peer_channel import GossipChannel
from services.runtime.settings import OperatorSettings

__all__ = ["dialable_addresses", "home_documents", "origin_config", "serve_origin"]

Documents = Callable[[], list[tuple[str, bytes]]]

log = logging.getLogger(__name__)


def origin_config(settings: OperatorSettings, home: OperatorHome) -> KuboConfig:
    """The origin node's settings; its swarm key is the fleet's (`keys swarm-key`) unless settings name one.

    Raises:
        ValueError: the swarm key file does not hold a key.
    """
    key_file = settings.content.swarm_key_file or home.swarm_key_file
    return KuboConfig(repo=home.path / "origin" / "ipfs", listen_host=settings.content.listen_host,
                      swarm_port=settings.content.swarm_port, peers=list(settings.content.peers),
                      append_announce=list(settings.content.announce),
                      swarm_key=load_swarm_key(key_file) if key_file.exists() else None,
                      routing=settings.content.routing, max_connections=settings.content.max_connections)


def dialable_addresses(config: KuboConfig, peer_id: str, broker_host: str, *,
                       fib_trie: Path = Path("/proc/net/fib_trie")) -> list[str]:
    """Where devices can dial the origin, best first: its announced addresses (a port forward), then
    the address it listens on; bound to every interface (a host's `0.0.0.0` is nobody's address), the
    one this host reaches the broker from, and its other addresses (the broker may be this host)."""
    hosts = [config.listen_host]
    if config.listen_host in WILDCARDS:
        try:
            towards_broker = [local_address(broker_host)]
        except OSError:
            towards_broker = []
        hosts = [h for h in dict.fromkeys([*towards_broker, *host_addresses(fib_trie)]) if not h.startswith("127.")]
        hosts = hosts or ["127.0.0.1"]
    return [f"{a}/p2p/{peer_id}" for a in [*config.append_announce, *(f"/ip4/{h}/tcp/{config.swarm_port}" for h in hosts)]]


def home_documents(home: OperatorHome, fleet: str) -> Documents:
    """The signed documents the origin gossips, read from the operator's home each time: the root
    chain, the timestamp and each class's latest release (MQTT topic, bytes)."""
    def documents() -> list[tuple[str, bytes]]:
        found = [(topics.root_topic(fleet, version), raw) for version, raw in home.root_chain()]
        if home.timestamp_file.exists():
            found.append((topics.timestamp_topic(fleet), home.timestamp_file.read_bytes()))
        for device_class in home.device_classes():
            if (latest := home.latest_manifest(device_class)) is not None:
                found.append((topics.release_topic(fleet, device_class), latest))
        return found
    return documents


async def serve_origin(config: KuboConfig, seed_dir: Path, address_file: Path, stop: asyncio.Event,
                       *, broker_host: str = "127.0.0.1", poll_seconds: float = 2.0,
                       documents: Documents | None = None, fleet: str | None = None,
                       gossip_interval: float = 60.0) -> None:
    """Run the origin node until `stop`: add each new file of `seed_dir` (the release command copies
    artifacts and deltas there) and keep serving it. The addresses devices can dial it at go to
    `address_file`, one per line, best first (devices' `[content] origin` and `peers`). With
    `documents` (and its `fleet`), it also gossips the fleet's signed documents to the peers it
    serves: devices that reach the origin but not the broker still hear releases.

    Raises:
        RuntimeError: the node could not start, or IPFS could not add a file.
    """
    async with EmbeddedKuboNode(config) as node, contextlib.AsyncExitStack() as stack:
        gossip = None
        if documents is not None and fleet is not None:
            gossip = await stack.enter_async_context(GossipChannel(node, fleet=fleet, interval=gossip_interval))
        addresses = dialable_addresses(config, node.peer_id, broker_host)
        log.info("origin node %s, dialable at %s", node.peer_id, " ".join(addresses))
        atomic_write(address_file, "".join(a + "\n" for a in addresses).encode())
        seeded: set[str] = set()
        while not stop.is_set():
            if gossip is not None and documents is not None:
                try:
                    for topic, raw in documents():
                        gossip.carry(topic, raw)  # (only what changed is published)
                except (OSError, ValueError) as exc:  # a release or key rotation half-written: next poll
                    log.info("could not read the signed documents to gossip: %s", exc)
            seed_dir.mkdir(parents=True, exist_ok=True)
            for path in sorted(seed_dir.iterdir()):
                if path.name not in seeded:
                    cid = await node.add(path)
                    seeded.add(path.name)
                    log.info("serving %s (%d bytes)", cid, path.stat().st_size)
            try:
                await asyncio.wait_for(stop.wait(), timeout=poll_seconds)
            except TimeoutError:
                pass
