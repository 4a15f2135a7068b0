"""Room for one update on the device's file systems, checked before anything is fetched.

An update needs, at its peak, on the file system of the downloads (the IPFS repository lives
beside them in the state directory): the fetched blocks, the verified file made of them, the
patched result when a delta travels, the plaintext when it is encrypted; and, on the install
target's file system, one more copy of the new version (staged for `file`, the other slot for
`ab`). A device that lacks that room says so (`disk_full`) and waits, instead of failing halfway
through and leaving half a file behind.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from schemas.models import Artifact, Delta, ReleaseManifest

MARGIN = 1 << 20  # file system metadata, the IPFS repository's own writes, state files


@dataclass(frozen=True)
class Shortfall:
    path: Path
    free: int
    needed: int

    def __str__(self) -> str:
        return f"{self.path} has {self.free:,} bytes free, this update needs {self.needed:,} there"


def _fetched(item: Artifact | Delta, dest: Path, partial: int) -> int:
    """The blocks and the file made of them, less what an interrupted fetch already wrote to `dest`."""
    plain = item.encryption.plain_size if item.encryption else 0
    return 2 * item.size - min(partial, item.size) + plain


def room_needed(m: ReleaseManifest, installed_sha256: str, download_dir: Path, target: Path,
                partial: dict[Path, int]) -> list[tuple[Path, int]]:
    """(a path on each file system involved, bytes needed there) for installing `m` over
    `installed_sha256`; `partial` holds the sizes of download files already on disk."""
    delta = m.deltas.get(installed_sha256)
    if delta is not None:
        dest = download_dir / f"{delta.sha256}.delta"
        fetch = _fetched(delta, dest, partial.get(dest, 0)) + m.artifact.installed_size
    else:
        dest = download_dir / f"{m.artifact.sha256}.full"
        fetch = _fetched(m.artifact, dest, partial.get(dest, 0))
    return [(download_dir, fetch + MARGIN), (target.parent, m.artifact.installed_size + MARGIN)]


def shortfalls(needs: list[tuple[Path, int]]) -> list[Shortfall]:
    """The file systems without the room `needs` asks for (needs on one file system add up)."""
    by_device: dict[int, tuple[Path, int]] = {}
    for path, needed in needs:
        device = os.stat(path).st_dev
        first, total = by_device.get(device, (path, 0))
        by_device[device] = (first, total + needed)
    short = []
    for path, needed in by_device.values():
        info = os.statvfs(path)
        free = info.f_bavail * info.f_frsize
        if free < needed:
            short.append(Shortfall(path, free, needed))
    return short
