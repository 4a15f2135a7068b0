"""Create an ESDELTA1 patch with memory bounded by the segment sizes, not by the image size.

The new file is cut into segments of `segment_size` bytes. For each, the anchors it shares
with the old file vote for old blocks of BLOCK bytes; the best-voted blocks (plus the region
where the segment's position predicts its old bytes, which catches code whose every window
changed a little) make an old window of at most `old_budget` bytes, and bsdiff4 diffs the
segment against that window alone. bsdiff4's suffix sort costs ~16 bytes per old byte, so peak
memory is about 16 x old_budget + the anchor index, whatever the image size.

Each segment then gets the smaller of two codecs (format 2, schemas/patch.py): bsdiff, or an LZ
match against the same window (LZMA2 primed with it, plain or over x86 branch-converted bytes).
bsdiff wins where code moved by a little everywhere (most patch releases of C libraries); LZ
wins where a build changed wholesale (a Rust crate rebuilt with other codegen). Trying LZ in full
costs as much as the diff, so two fast probes (preset 1, on the other core while bsdiff runs)
pick the variant, and the full encoding runs only when the probe comes within LZ_TRY of
bsdiff's own probe.

In-place patches constrain each segment to old bytes not yet overwritten (see
schemas.patch.PatchHeader.in_place_conflict): forward order reads only at or after the segment,
backward order only before its end.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import logging
import lzma
import os
import struct
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import bsdiff4.core
import numpy as np

from schemas.patch import (
    MAGIC,
    MAX_CONTROL_BYTES,
    MAX_SEGMENT_NEW,
    MAX_SEGMENT_OLD,
    Codec,
    Extent,
    PatchHeader,
    Segment,
)
from services.runtime.delta import _lzdict
from services.runtime.delta._anchors import OldIndex
from services.runtime.delta._codec import Compression, compress
from services.runtime.delta._x86 import transform, transform_extents
from services.runtime.files import sha256_file

log = logging.getLogger(__name__)

BLOCK = 256 << 10
DEFAULT_SEGMENT = 8 << 20
DEFAULT_OLD_BUDGET = 11 << 20
MIN_VOTES = 2
LZ_TRY = 1.03  # full LZ runs when its probe is at most this times bsdiff's probe (see _plan)
LZ_SURE = 0.85  # ... and bsdiff is not packed at all below this
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
SHORT_MARGIN = 4 << 20  # a segment shorter than the others gets a window of its size plus this (or twice it)
ALL_CODECS: tuple[Codec, ...] = ("bsdiff", "lzma-dict", "lzma-dict-x86")

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class CreateOptions:
    compression: Compression = "lzma"
    segment_size: int = DEFAULT_SEGMENT
    old_budget: int = DEFAULT_OLD_BUDGET
    in_place: bool = False
    codecs: tuple[Codec, ...] = ALL_CODECS  # the ones each segment may use; bsdiff alone makes format 1

    def __post_init__(self) -> None:
        if not self.codecs or any(c not in ALL_CODECS for c in self.codecs):
            raise ValueError(f"codecs must be a non-empty subset of {', '.join(ALL_CODECS)}")
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
    _release_big_buffers_on_free()
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


def _release_big_buffers_on_free() -> None:
    """Map every buffer of 1 MiB or more on its own, so that freeing it returns it to the system.

    bsdiff's suffix array, liblzma's match finders and the xz encoders are freed after each
    segment, but glibc raises its mmap threshold after such frees and serves the next ones from
    per-thread arenas that keep their peak: measured, 613 MB peak RSS instead of 514 MB for a
    28 MB binary. Fixing the threshold keeps creation under its 512 MiB bound. Only the operator
    side runs this (creation), and only glibc has mallopt.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass


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
    lz_codecs = [c for c in options.codecs if c != "bsdiff"] if _lzdict.available() else []
    if not lz_codecs and "bsdiff" not in options.codecs:
        raise ValueError("the lzma-dict codecs need liblzma, which this machine lacks; allow bsdiff")
    drift = 0
    done = 0
    pending: tuple[Future[tuple[Segment, bytes]] | None, Future[_Candidate] | _Candidate | None] | None = None
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
            budget = min(options.old_budget, max(len(data) + SHORT_MARGIN, 2 * len(data)))  # a short tail sorts less
            extents = choose_old_window(old_at, _predicted_offset(start, drift, old_size), len(data), budget, lo, hi)
            window = _read_extents(old_handle, extents)
            # This thread diffs; the pool (one thread, in order) finishes the previous segment's
            # packings, then probes LZ for this one beside the diff, then packs this one beside the
            # next diff. Never more than one suffix array and one encoder at a time: see docs/deltas.md.
            probe = pool.submit(_probe_lz, window, data, extents, start, lz_codecs) if lz_codecs else None
            streams = _diff(window, data, extents) if "bsdiff" in options.codecs else None
            plan = _plan(probe.result() if probe else None, streams)
            if pending is not None:
                _write_segment(_choose(*pending), out, segments)  # done: it ran before this probe
            last = start == starts[-1]  # nothing left to diff beside it: both cores, less effort
            # before a short last segment the diff beside it ends early: both cores, full effort
            split = last or starts.index(start) == len(starts) - 2 and new_size % options.segment_size != 0
            packing = (pool.submit(_pack_segment, streams, data, start, options.compression, split, last)
                       if streams is not None and plan != "lz only" else None)
            lz: Future[_Candidate] | _Candidate | None = None
            if probe is not None and plan != "bsdiff only":
                codec = probe.result()[0]
                # the last one here, beside its packing: nothing else is left for this thread
                lz = _lz_candidate(codec, window, data, extents, start) if last else pool.submit(_lz_candidate, codec, window, data, extents, start)
            pending = (packing, lz)
            done += len(data)
            if progress:
                progress(done, new_size)
        if pending is not None:
            _write_segment(_choose(*pending), out, segments)
    header = PatchHeader(
        format=1 if all(s.codec == "bsdiff" for s in segments) else 2,
        compression=options.compression,
        old_size=old_size,
        old_sha256=hashes[0],
        new_size=new_size,
        new_sha256=hashes[1],
        order=order,
        segments=segments,
    )
    raw = header.to_bytes()
    with open(patch, "wb") as out, open(payload, "rb") as body:
        out.write(MAGIC + struct.pack("<I", len(raw)) + raw)
        while block := body.read(1 << 20):
            out.write(block)
    payload.unlink()
    chosen = {c: sum(1 for s in segments if s.codec == c) for c in ALL_CODECS}
    log.info("patch %s: %d segments (%s), %d bytes for a %d-byte file", patch, len(segments),
             ", ".join(f"{n} {c}" for c, n in chosen.items() if n), patch.stat().st_size, new_size)
    return header


@dataclass(frozen=True)
class _Streams:
    control: bytes
    diff: bytes
    extra: bytes
    extents: list[Extent]


@dataclass(frozen=True)
class _Candidate:
    """A segment packed by an LZ codec, to be compared with its bsdiff packing."""

    segment: Segment
    packed: bytes


def _diff(old_window: bytes, data: bytes, extents: list[Extent]) -> _Streams:
    control, diff, extra = bsdiff4.core.diff(old_window, data)
    if len(control) > MAX_CONTROL_BYTES:
        # pathological input: ship the segment's bytes as they are rather than break the format limit
        literal = bsdiff4.core.encode_int64(0) + bsdiff4.core.encode_int64(len(data)) + bsdiff4.core.encode_int64(0)
        return _Streams(literal, b"", data, [])
    return _Streams(control, diff, extra, extents)


def _lz_inputs(codec: Codec, window: bytes, data: bytes, extents: list[Extent], start: int) -> tuple[bytes | bytearray, bytes | bytearray]:
    if codec != "lzma-dict-x86":
        return window, data
    converted_window, converted_data = bytearray(window), bytearray(data)
    transform_extents(converted_window, [(e.offset, e.length) for e in extents], encode=True)
    transform(converted_data, 0, len(converted_data), start, encode=True)
    return converted_window, converted_data


def _probe_lz(window: bytes, data: bytes, extents: list[Extent], start: int, codecs: list[Codec]) -> tuple[Codec, int]:
    """The LZ codec that packs this segment smallest at the fast preset, and that size."""
    sizes = {codec: len(_lzdict.compress(*_lz_inputs(codec, window, data, extents, start), effort=_lzdict.PROBE))
             for codec in codecs}
    best = min(sizes, key=sizes.__getitem__)
    return best, sizes[best]


Plan = Literal["bsdiff only", "both", "lz only"]


def _plan(probe: tuple[Codec, int] | None, streams: _Streams | None) -> Plan:
    """Which full encodings a segment gets, from the LZ probe against bsdiff's at the same fast preset.

    Full encoding shrinks LZ more than bsdiff (measured: LZ to 0.82-0.88 of its probe, bsdiff's
    streams to 0.88-0.94), so LZ can win from a probe up to ~7% larger: at most LZ_TRY times
    bsdiff's probe it is worth encoding in full, and below LZ_SURE bsdiff cannot win and its
    packing is skipped (it would only slow the LZ encoding beside it).
    """
    if probe is None:
        return "bsdiff only"
    if streams is None:
        return "lz only"
    codec, probe_size = probe
    bsdiff_probe = len(lzma.compress(streams.control + streams.diff + streams.extra, format=lzma.FORMAT_RAW,
                                     filters=[{"id": lzma.FILTER_LZMA2, "preset": _lzdict.PROBE.preset}]))
    log.debug("probes: %s %d, bsdiff %d", codec, probe_size, bsdiff_probe)
    if probe_size > LZ_TRY * bsdiff_probe:
        return "bsdiff only"
    return "lz only" if probe_size < LZ_SURE * bsdiff_probe else "both"


def _lz_candidate(codec: Codec, window: bytes, data: bytes, extents: list[Extent], start: int) -> _Candidate:
    packed = _lzdict.compress(*_lz_inputs(codec, window, data, extents, start))
    segment = Segment(
        new_offset=start,
        new_size=len(data),
        new_sha256=hashlib.sha256(data).hexdigest(),
        old=extents,
        control_size=0,
        diff_size=0,
        extra_size=len(data),
        packed_size=len(packed),
        codec=codec,
    )
    return _Candidate(segment, packed)


def _choose(packing: Future[tuple[Segment, bytes]] | None, lz: Future[_Candidate] | _Candidate | None) -> tuple[Segment, bytes]:
    """The smaller packing; at least one exists (see _plan)."""
    bsdiff = packing.result() if packing is not None else None
    candidate = lz.result() if isinstance(lz, Future) else lz
    if candidate is not None and bsdiff is not None:
        log.debug("segment at %d: %s %d, bsdiff %d", candidate.segment.new_offset, candidate.segment.codec,
                  len(candidate.packed), len(bsdiff[1]))
    if candidate is not None and (bsdiff is None or len(candidate.packed) < len(bsdiff[1])):
        return candidate.segment, candidate.packed
    if bsdiff is None:
        raise AssertionError("a segment with neither codec")
    return bsdiff


def _pack_segment(streams: _Streams, data: bytes, start: int, compression: Compression, split: bool,
                  last: bool) -> tuple[Segment, bytes]:
    packed = compress(streams.control + streams.diff + streams.extra, compression, split=split,
                      effort="fast" if last else "max")
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
