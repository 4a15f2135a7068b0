"""The operator's store: CIDs as a Kubo node would compute them, files handed to the origin to seed."""

from __future__ import annotations

import shutil
from pathlib import Path

from services.runtime.content._embedded import EmbeddedKuboNode
from services.runtime.content._kubo_config import KuboConfig

__all__ = ["HashOnlyStore"]


class HashOnlyStore:
    """Computes CIDs exactly as a Kubo node would, and copies the files into a seeding directory.

    The operator CLI uses it so that `edgeswarm release` needs no long-running node of its own: a
    long-running `edgeswarm origin` adds every file of that directory to its node. The scratch
    node listens nowhere; it runs only because hashing in a repo with no running node stalls
    for seconds per file.
    """

    def __init__(self, scratch_repo: Path, seed_dir: Path) -> None:
        self.seed_dir = seed_dir
        self._node = EmbeddedKuboNode(KuboConfig(repo=scratch_repo, listen=False))
        self._started = False

    async def add(self, path: Path) -> str:
        if not self._started:
            await self._node.start()
            self._started = True
        cid = await self._node.add(path, only_hash=True)
        self.seed_dir.mkdir(parents=True, exist_ok=True)
        target = self.seed_dir / cid
        if not target.exists():
            shutil.copyfile(path, target)
        return cid

    async def close(self) -> None:
        if self._started:
            await self._node.stop()
            self._started = False

    async def __aenter__(self) -> HashOnlyStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
