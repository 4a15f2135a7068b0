"""The origin: the operator's IPFS node, serving every file a release put in <home>/seed."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from services.operator.home import OperatorHome
from services.runtime.content import EmbeddedKuboNode, KuboConfig, load_swarm_key
from services.runtime.files import atomic_write
from services.runtime.settings import OperatorSettings

__all__ = ["origin_config", "serve_origin"]

log = logging.getLogger(__name__)


def origin_config(settings: OperatorSettings, home: OperatorHome) -> KuboConfig:
    """The origin node's settings; its swarm key is the fleet's (`keys swarm-key`) unless settings name one.

    Raises:
        ValueError: the swarm key file does not hold a key.
    """
    key_file = settings.content.swarm_key_file or home.swarm_key_file
    return KuboConfig(repo=home.path / "origin" / "ipfs", listen_host=settings.content.listen_host,
                      swarm_port=settings.content.swarm_port, peers=list(settings.content.peers),
                      swarm_key=load_swarm_key(key_file) if key_file.exists() else None,
                      routing=settings.content.routing, max_connections=settings.content.max_connections)


async def serve_origin(config: KuboConfig, seed_dir: Path, address_file: Path, stop: asyncio.Event,
                       *, poll_seconds: float = 2.0) -> None:
    """Run the origin node until `stop`: add each new file of `seed_dir` (the release command copies
    artifacts and deltas there) and keep serving it. The node's address goes to `address_file`, where
    provisioning scripts and tests read it.

    Raises:
        RuntimeError: the node could not start, or IPFS could not add a file.
    """
    async with EmbeddedKuboNode(config) as node:
        log.info("origin node %s", node.multiaddr)
        atomic_write(address_file, (node.multiaddr + "\n").encode())
        seeded: set[str] = set()
        while not stop.is_set():
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
