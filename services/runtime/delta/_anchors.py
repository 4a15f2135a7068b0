"""Content-defined anchors: where a window of the new file probably came from in the old file.

A polynomial rolling hash of every 32-byte window is computed with numpy (vectorised, so a
360 MB image is hashed in seconds), and only windows whose mixed hash has its low bits clear
become anchors. Both files choose anchors by content, not position, so the same bytes give the
same anchors wherever they moved. The old file's anchors are kept as two sorted arrays (hash,
offset), about 16 bytes per anchor; the sampling rate grows with the file so the index stays
below MAX_ANCHORS whatever the image size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

WINDOW = 32
CHUNK = 1 << 20
MAX_ANCHORS = 4_000_000
_MULTIPLIER = np.uint64(0x100000001B3)  # odd, so it has an inverse modulo 2**64
_INVERSE = np.uint64(pow(0x100000001B3, -1, 1 << 64))


def _powers(base: np.uint64, count: int) -> np.ndarray:
    powers = np.full(count, base, dtype=np.uint64)
    powers[0] = 1
    with np.errstate(over="ignore"):
        return np.cumprod(powers, dtype=np.uint64)


_POW = _powers(_MULTIPLIER, CHUNK + WINDOW)
_INV = _powers(_INVERSE, CHUNK + WINDOW)


def window_hashes(data: bytes | memoryview) -> np.ndarray:
    """Hash of every WINDOW-byte window of `data` (len(data) - WINDOW + 1 values), mod 2**64."""
    n = len(data)
    if n < WINDOW:
        return np.empty(0, dtype=np.uint64)
    if n > CHUNK + WINDOW:
        raise ValueError("window_hashes takes at most CHUNK + WINDOW bytes")
    values = np.frombuffer(data, dtype=np.uint8).astype(np.uint64) + np.uint64(1)
    with np.errstate(over="ignore"):
        prefix = np.zeros(n + 1, dtype=np.uint64)
        np.cumsum(values * _INV[:n], dtype=np.uint64, out=prefix[1:])
        # sum over t in [i, i+W) of b[t] * m^(i+W-1-t): shift the prefix difference back up
        h = (prefix[WINDOW:] - prefix[:-WINDOW]) * _POW[WINDOW - 1 : n]
        h ^= h >> np.uint64(31)
        h *= np.uint64(0x9E3779B97F4A7C15)
        h ^= h >> np.uint64(29)
    return h


def sampling_mask(old_size: int) -> np.uint64:
    spacing = 32
    while old_size // spacing > MAX_ANCHORS:
        spacing *= 2
    return np.uint64(spacing - 1)


def anchors_of(data: bytes | memoryview, base: int, mask: np.uint64) -> tuple[np.ndarray, np.ndarray]:
    """(hashes, absolute offsets) of the anchors among windows starting in data, CHUNK at a time."""
    hashes, offsets = [], []
    for start in range(0, max(len(data) - WINDOW + 1, 0), CHUNK):
        h = window_hashes(data[start : start + CHUNK + WINDOW - 1])
        picked = np.flatnonzero((h & mask) == 0)
        hashes.append(h[picked])
        offsets.append(picked.astype(np.int64) + (base + start))
    if not hashes:
        return np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.int64)
    return np.concatenate(hashes), np.concatenate(offsets)


@dataclass(frozen=True)
class OldIndex:
    """Sorted anchor hashes of the old file with the first offset each was seen at."""

    hashes: np.ndarray
    offsets: np.ndarray
    mask: np.uint64
    size: int

    @classmethod
    def build(cls, handle: BinaryIO, size: int) -> OldIndex:
        mask = sampling_mask(size)
        hashes, offsets = [], []
        position = 0
        tail = b""
        while True:
            block = handle.read(8 * CHUNK)
            if not block:
                break
            data = tail + block
            h, o = anchors_of(data, position - len(tail), mask)
            hashes.append(h)
            offsets.append(o)
            # the last WINDOW-1 bytes start windows that need the next block to finish
            tail = data[-(WINDOW - 1) :]
            position += len(block)
        if not hashes:
            return cls(np.empty(0, np.uint64), np.empty(0, np.int64), mask, size)
        all_h, all_o = np.concatenate(hashes), np.concatenate(offsets)
        unique, first = np.unique(all_h, return_index=True)
        return cls(unique, all_o[first], mask, size)

    @classmethod
    def of_file(cls, path: Path) -> OldIndex:
        with open(path, "rb") as handle:
            return cls.build(handle, path.stat().st_size)

    def matches(self, data: bytes | memoryview, base: int) -> tuple[np.ndarray, np.ndarray]:
        """(new offsets, old offsets) of anchors in data that also occur in the old file."""
        h, new_offsets = anchors_of(data, base, self.mask)
        if not len(self.hashes) or not len(h):
            return np.empty(0, np.int64), np.empty(0, np.int64)
        where = np.searchsorted(self.hashes, h)
        where[where == len(self.hashes)] = 0
        found = self.hashes[where] == h
        return new_offsets[found], self.offsets[where[found]]
