"""Create an ESDELTA1 patch with memory bounded by the segment sizes, not by the image size.

The new file is cut into segments of `segment_size` bytes. For each, the anchors it shares
with the old file vote for old blocks of BLOCK bytes; the best-voted blocks (plus the region
where the segment's position predicts its old bytes, which catches code whose every window
changed a little) make an old window of at most `old_budget` bytes, and bsdiff4 diffs the
segment against that window alone. bsdiff4's suffix sort costs ~16 bytes per old byte, so peak
memory is about 16 x old_budget + the anchor index, whatever the image size.

In-place patches constrain each segment to old bytes not yet overwritten (see
schemas.patch.PatchHeader.in_place_conflict): forward order reads only at or after the segment,
backward order only before its end.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import bsdiff4.core
import numpy as np

from schemas.canonical import canonical_json
from schemas.patch import MAGIC, MAX_CONTROL_BYTES, MAX_SEGMENT_NEW, MAX_SEGMENT_OLD, Extent, PatchHeader, Segment
from services.runtime.delta._anchors import OldIndex
from services.runtime.delta._codec import Compression, compress
from services.runtime.files import sha256_file

log = logging.getLogger(__name__)

BLOCK = 256 << 10
DEFAULT_SEGMENT = 8 << 20
DEFAULT_OLD_BUDGET = 12 << 20
MIN_VOTES = 2

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class CreateOptions:
    compression: Compression = "lzma"
    segment_size: int = DEFAULT_SEGMENT
    old_budget: int = DEFAULT_OLD_BUDGET
    in_place: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.segment_size <= MAX_SEGMENT_NEW:
            raise ValueError(f"segment size must be 1..{MAX_SEGMENT_NEW}")
        if not 0 < self.old_budget <= MAX_SEGMENT_OLD:
            raise ValueError(f"old window budget must be 1..{MAX_SEGMENT_OLD}")


def _blocks_to_extents(blocks: list[int], lo: int, hi: int) -> list[Extent]:
    """Merge chosen block numbers into extents, clipped to the allowed old range [lo, hi)."""
    spans: list[tuple[int, int]] = []
    for block in sorted(set(blocks)):
        start, end = max(block * BLOCK, lo), min((block + 1) * BLOCK, hi)
        if start >= end:
            continue
        if spans and spans[-1][1] == start:
            spans[-1] = (spans[-1][0], end)
        else:
            spans.append((start, end))
    return [Extent(offset=start, length=end - start) for start, end in spans]


def choose_old_window(
    votes: np.ndarray, predicted: int, new_size: int, budget: int, lo: int, hi: int
) -> list[Extent]:
    """Old extents for one segment: blocks its anchors voted for, then the region its position predicts.

    Votes come first because they are evidence; the predicted region (nearest blocks first)
    fills the rest of the budget, which matters for code where a few changed bytes in every
    32-byte window leave few exact anchors but bsdiff still finds approximate matches.
    """
    first, last = lo // BLOCK, (hi - 1) // BLOCK
    if hi <= lo:
        return []
    cap = budget // BLOCK
    chosen: dict[int, None] = {}
    if len(votes):
        blocks, counts = np.unique(votes // BLOCK, return_counts=True)
        for index in np.argsort(-counts, kind="stable"):
            if counts[index] < MIN_VOTES or len(chosen) >= cap:
                break
            block = int(blocks[index])
            if first <= block <= last:
                chosen[block] = None
    centre_lo, centre_hi = predicted // BLOCK, (predicted + new_size - 1) // BLOCK
    nearby = sorted(range(first, last + 1) if last - first < 4 * cap else range(max(first, centre_lo - cap), min(last, centre_hi + cap) + 1),
                    key=lambda b: max(centre_lo - b, b - centre_hi, 0))
    for block in nearby:
        if len(chosen) >= cap:
            break
        chosen[block] = None
    return _blocks_to_extents(list(chosen), lo, hi)


def _read_extents(handle, extents: list[Extent]) -> bytes:
    parts = []
    for extent in extents:
        handle.seek(extent.offset)
        parts.append(handle.read(extent.length))
    return b"".join(parts)


def _predicted_offset(new_offset: int, drift: int, old_size: int) -> int:
    return min(max(new_offset + drift, 0), max(old_size - 1, 0))


def create_patch(old: Path, new: Path, patch: Path, options: CreateOptions = CreateOptions(), progress: Progress | None = None) -> PatchHeader:
    """Write a patch turning `old` into `new`; in-place patches try both orders and keep the smaller.

    Which order loses less depends on where every segment's bytes came from (duplicated content
    fools any cheap guess), so in-place creation pays twice the time to ship the smaller patch.
    """
    index = OldIndex.of_file(old)
    hashes = (sha256_file(old), sha256_file(new))
    if not options.in_place:
        return _write_patch(old, new, patch, options, index, hashes, "forward", progress)
    candidates = []
    for order in ("forward", "backward"):
        path = patch.with_name(f"{patch.name}.{order}")
        candidates.append((_write_patch(old, new, path, options, index, hashes, order, progress), path))
    (header, best), (_, other) = sorted(candidates, key=lambda c: c[1].stat().st_size)
    other.unlink()
    os.replace(best, patch)
    return header


def _write_patch(
    old: Path, new: Path, patch: Path, options: CreateOptions, index: OldIndex, hashes: tuple[str, str],
    order: Literal["forward", "backward"], progress: Progress | None,
) -> PatchHeader:
    old_size, new_size = old.stat().st_size, new.stat().st_size
    segments: list[Segment] = []
    payload = patch.with_name(patch.name + ".payload")
    starts = list(range(0, new_size, options.segment_size))
    if order == "backward":
        starts.reverse()
    drift = 0
    done = 0
    pending: Future[tuple[Segment, bytes]] | None = None
    with open(old, "rb") as old_handle, open(new, "rb") as new_handle, open(payload, "wb") as out, ThreadPoolExecutor(1) as pool:
        for start in starts:
            new_handle.seek(start)
            data = new_handle.read(options.segment_size)
            new_at, old_at = index.matches(data, start)
            if len(new_at):
                drift = int(np.median(old_at - new_at))
            lo, hi = 0, old_size
            if options.in_place and order == "forward":
                lo = start
            elif options.in_place:
                hi = min(start + len(data), old_size)
            extents = choose_old_window(old_at, _predicted_offset(start, drift, old_size), len(data), options.old_budget, lo, hi)
            streams = _diff(_read_extents(old_handle, extents), data, extents)
            # compressing segment i (lzma and zstd release the GIL) overlaps with diffing segment i+1
            if pending is not None:
                _write_segment(pending.result(), out, segments)
            last = start == starts[-1]  # nothing left to diff beside it: compress on both cores
            pending = pool.submit(_pack_segment, streams, data, start, options.compression, last)
            done += len(data)
            if progress:
                progress(done, new_size)
        if pending is not None:
            _write_segment(pending.result(), out, segments)
    header = PatchHeader(
        format=1,
        compression=options.compression,
        old_size=old_size,
        old_sha256=hashes[0],
        new_size=new_size,
        new_sha256=hashes[1],
        order=order,
        segments=segments,
    )
    raw = canonical_json(header.model_dump(mode="json"))
    with open(patch, "wb") as out, open(payload, "rb") as body:
        out.write(MAGIC + struct.pack("<I", len(raw)) + raw)
        while block := body.read(1 << 20):
            out.write(block)
    payload.unlink()
    log.info("patch %s: %d segments, %d bytes for a %d-byte file", patch, len(segments), patch.stat().st_size, new_size)
    return header


@dataclass(frozen=True)
class _Streams:
    control: bytes
    diff: bytes
    extra: bytes
    extents: list[Extent]


def _diff(old_window: bytes, data: bytes, extents: list[Extent]) -> _Streams:
    control, diff, extra = bsdiff4.core.diff(old_window, data)
    if len(control) > MAX_CONTROL_BYTES:
        # pathological input: ship the segment's bytes as they are rather than break the format limit
        literal = bsdiff4.core.encode_int64(0) + bsdiff4.core.encode_int64(len(data)) + bsdiff4.core.encode_int64(0)
        return _Streams(literal, b"", data, [])
    return _Streams(control, diff, extra, extents)


def _pack_segment(streams: _Streams, data: bytes, start: int, compression: Compression, split: bool) -> tuple[Segment, bytes]:
    # The last segment's compression cannot hide behind a diff: both cores, and less effort.
    packed = compress(streams.control + streams.diff + streams.extra, compression, split=split,
                      effort="fast" if split else "max")
    segment = Segment(
        new_offset=start,
        new_size=len(data),
        new_sha256=hashlib.sha256(data).hexdigest(),
        old=streams.extents,
        control_size=len(streams.control),
        diff_size=len(streams.diff),
        extra_size=len(streams.extra),
        packed_size=len(packed),
    )
    return segment, packed


def _write_segment(result: tuple[Segment, bytes], out: BinaryIO, segments: list[Segment]) -> None:
    segment, packed = result
    out.write(packed)
    segments.append(segment)
