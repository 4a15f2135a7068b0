"""Keeps what the device fetched so peers can pull it, within the disk the operator allows.

Every item is recorded (`held.json` in the state directory) before it is fetched, so that blocks
of a fetch that never completed are found and swept later too; an item is pinned once its signed
hash checked out (the Updater). After each installed release `retention.releases_to_drop` decides
what goes.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from device_client.retention import HeldRelease, releases_to_drop
from services.runtime.content import ContentStore
from services.runtime.files import atomic_write, read_capped, set_aside

log = logging.getLogger(__name__)

MAX_RECORD_BYTES = 4 << 20


class HeldContent(BaseModel):
    model_config = ConfigDict(extra="forbid")
    releases: list[HeldRelease] = []


class ContentKeeper:
    def __init__(self, path: Path, *, keep_releases: int, budget_bytes: int | None) -> None:
        self.path = path
        self.keep_releases = keep_releases
        self.budget_bytes = budget_bytes

    def load(self) -> HeldContent:
        """What is held; a damaged record is set aside (its blocks are then only swept by Kubo's GC)."""
        try:
            return HeldContent.model_validate_json(read_capped(self.path, MAX_RECORD_BYTES))
        except FileNotFoundError:
            return HeldContent()
        except (OSError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
            log.error("%s is damaged (%s); starting a new record of held content", self.path, str(exc)[:200])
            set_aside(self.path)
            return HeldContent()

    def hold(self, sequence: int, version: str, cid: str, size: int) -> None:
        """Record that `cid` of this release is about to land in the blockstore."""
        held = self.load()
        others = [r for r in held.releases if r.sequence != sequence]
        mine = next((r for r in held.releases if r.sequence == sequence), None)
        if mine is not None and cid in mine.cids:
            return
        cids = (*mine.cids, cid) if mine else (cid,)
        grown = HeldRelease(sequence=sequence, version=version, cids=cids, size=(mine.size if mine else 0) + size)
        self._save(HeldContent(releases=[*others, grown]))

    async def settle(self, store: ContentStore, *, installed_sequence: int) -> list[HeldRelease]:
        """Drop what the rule lets go (unpinned, blocks swept); returns the dropped releases."""
        held = self.load()
        drop = releases_to_drop(held.releases, installed_sequence=installed_sequence,
                                keep_releases=self.keep_releases, budget_bytes=self.budget_bytes)
        if not drop:
            return []
        keep = [r for r in held.releases if r not in drop]
        keep_cids = [c for r in keep for c in r.cids]
        # A release re-published with the same bytes has the same CID: it stays pinned for the kept one.
        drop_cids = [c for r in drop for c in r.cids if c not in keep_cids]
        freed = await store.release(drop_cids, keep_cids)
        # Saved only once the blocks are gone: a cut before this sweeps the same releases again.
        self._save(HeldContent(releases=keep))
        log.info("no longer serving %s: %d bytes freed; serving %s",
                 ", ".join(r.version for r in drop), freed, ", ".join(r.version for r in keep) or "nothing")
        return drop

    def _save(self, held: HeldContent) -> None:
        atomic_write(self.path, held.model_dump_json(indent=2).encode())
