"""Create an ESDELTA1 patch with memory bounded by the segment sizes, not by the image size.

The new file is cut into segments of `segment_size` bytes. For each, the anchors it shares
with the old file vote for old blocks of BLOCK bytes; the best-voted blocks (plus the region
where the segment's position predicts its old bytes, which catches code whose every window
changed a little) make an old window of at most `old_budget` bytes, and bsdiff4 diffs the
segment against that window alone. bsdiff4's suffix sort costs ~16 bytes per old byte, so peak
memory is about 16 x old_budget plus one encoder (an LZ encoder's dictionary is capped, see
_lzdict.Effort.dict_max), whatever the image size: every window is chosen
before the first diff, and the anchor index is dropped then.

Where the whole allowed old range fits the budget there is nothing to choose and no index is
built; where the whole old file fits and the new file is small (SHARED_NEW_MAX), one diff of the
whole file is cut into the segments (_cut), so that the old bytes are suffix-sorted once.

Each segment then gets the smaller of two codecs (format 2, schemas/patch.py): bsdiff, or an LZ
match against the same window (LZMA2 primed with it, plain or over x86 branch-converted bytes).
bsdiff wins where code moved by a little everywhere (most patch releases of C libraries); LZ
wins where a build changed wholesale (a Rust crate rebuilt with other codegen). Trying LZ in full
costs as much as the diff, so two fast probes (preset 1, on the other core while bsdiff runs)
pick the variant, whose full encoding then starts on that core before the diff ends; once
bsdiff's own probe is known, the encoding is kept if the LZ probe came within LZ_TRY of it and
cancelled otherwise.

In-place patches constrain each segment to old bytes not yet overwritten (see
schemas.patch.PatchHeader.in_place_conflict): forward order reads only at or after the segment,
backward order only before its end.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import functools
import hashlib
import logging
import lzma
import os
import struct
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
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
from services.runtime.delta._codec import Compression, Effort, compress
from services.runtime.delta._x86 import transform, transform_extents
from services.runtime.files import sha256_file

log = logging.getLogger(__name__)

BLOCK = 256 << 10
DEFAULT_SEGMENT = 8 << 20
DEFAULT_OLD_BUDGET = 11 << 20
# Above LARGE_OLD, windows get a MiB more. On a 401 MB root filesystem the windows' reach is what the
# size hangs on (11 -> 12 MiB: 3.0% smaller), and whole-file bsdiff4 there takes far longer than any
# window's sort; on binaries of tens of MB the extra MiB gained nothing (biome: 0.08% larger) and cost
# ~9% more sort time against a create-time budget of 2x bsdiff4's. Peak memory is within 512 MiB
# with either, the LZ encoder's dictionary being capped (_lzdict.Effort.dict_max).
LARGE_OLD = 64 << 20
LARGE_OLD_BUDGET = 12 << 20
MIN_VOTES = 2
LZ_TRY = 1.03  # LZ is encoded in full when its probe is at most this times bsdiff's (see _plan) ...
LZ_TRY_SAMPLED = 1.09  # ... or this when the probes read a sample
LZ_SURE = 0.85  # ... and bsdiff is not packed at all below this
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
SHORT_MARGIN = 4 << 20  # a segment shorter than the others gets a window of its size plus this (or twice it)
PROBE_SAMPLE = 2 << 20  # bytes of a segment the LZ and bsdiff probes compare (see _probe_lz) ...
PROBE_PIECES = 4  # ... in this many pieces spread over it
SPECULATE_ABOVE = 0.12  # LZ probe / sample at which the full LZ encoding starts before the plan
EARLY_MAX = 16 << 20  # files up to this size (two segments) probe samples and may encode LZ early
SHARED_NEW_MAX = 16 << 20  # one diff of the whole file when the old file fits a window and the new one this
ALL_CODECS: tuple[Codec, ...] = ("bsdiff", "lzma-dict", "lzma-dict-x86")

Progress = Callable[[int, int], None]
Order = Literal["forward", "backward"]


@dataclass(frozen=True)
class CreateOptions:
    compression: Compression = "lzma"
    segment_size: int = DEFAULT_SEGMENT
    old_budget: int | None = None  # None: by the old file's size (window_budget)
    in_place: bool = False
    codecs: tuple[Codec, ...] = ALL_CODECS  # the ones each segment may use; bsdiff alone makes format 1

    def __post_init__(self) -> None:
        if not self.codecs or any(c not in ALL_CODECS for c in self.codecs):
            raise ValueError(f"codecs must be a non-empty subset of {', '.join(ALL_CODECS)}")
        if not 0 < self.segment_size <= MAX_SEGMENT_NEW:
            raise ValueError(f"segment size must be 1..{MAX_SEGMENT_NEW}")
        if self.old_budget is not None and not 0 < self.old_budget <= MAX_SEGMENT_OLD:
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
    if options.old_budget is None:
        options = replace(options, old_budget=window_budget(old.stat().st_size))
    index = functools.cache(functools.partial(OldIndex.of_file, old))  # built only if a window must be chosen
    orders: tuple[Order, ...] = ("forward", "backward") if options.in_place else ("forward",)
    windows = {order: _choose_windows(old, new, options, order, index) for order in orders}
    # Every window is chosen before the first diff, so the index (~50 MB for a 400 MB image) is never
    # held beside a suffix array (measured: 16 MiB less peak on the 401 MB rootfs tar, docs/deltas.md).
    index.cache_clear()
    hashes = (sha256_file(old), sha256_file(new))
    if not options.in_place:
        return _write_patch(old, new, patch, options, windows["forward"], hashes, "forward", progress)
    candidates = []
    for order in orders:
        path = patch.with_name(f"{patch.name}.{order}")
        candidates.append((_write_patch(old, new, path, options, windows[order], hashes, order, progress), path))
    (header, best), (_, other) = sorted(candidates, key=lambda c: c[1].stat().st_size)
    other.unlink()
    os.replace(best, patch)
    return header


def window_budget(old_size: int) -> int:
    """The old window's size for a segment, by the old file's size (see LARGE_OLD)."""
    return LARGE_OLD_BUDGET if old_size > LARGE_OLD else DEFAULT_OLD_BUDGET


def _budget(options: CreateOptions) -> int:
    assert options.old_budget is not None, "create_patch resolves it"
    return options.old_budget


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


@dataclass
class _Job:
    """One segment: its bytes, its old window, and the LZ work started for it on the pool."""

    start: int
    data: bytes
    extents: list[Extent]
    window: bytes
    early: bool  # a small file: probes read a sample and LZ may be encoded before the plan (see EARLY_MAX)
    probe: Future[_Probe] | None = None
    speculative: Future[_Candidate | None] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)


def _choose_windows(old: Path, new: Path, options: CreateOptions, order: Order,
                    index: Callable[[], OldIndex]) -> list[tuple[int, list[Extent]]]:
    """(segment start, old extents) for every segment, in the order they are written."""
    old_size, new_size = old.stat().st_size, new.stat().st_size
    starts = list(range(0, new_size, options.segment_size))
    if order == "backward":
        starts.reverse()
    drift = 0
    windows = []
    with open(new, "rb") as new_handle:
        for start in starts:
            length = min(options.segment_size, new_size - start)
            lo, hi = 0, old_size
            if options.in_place and order == "forward":
                lo = start
            elif options.in_place:
                hi = min(start + length, old_size)
            budget = min(_budget(options), max(length + SHORT_MARGIN, 2 * length))  # a short tail sorts less
            if hi - lo <= budget:  # the whole allowed range fits: no vote to take
                windows.append((start, [Extent(offset=lo, length=hi - lo)] if hi > lo else []))
                continue
            new_handle.seek(start)
            new_at, old_at = index().matches(new_handle.read(length), start)
            if len(new_at):
                drift = int(np.median(old_at - new_at))
            windows.append((start, choose_old_window(old_at, _predicted_offset(start, drift, old_size), length, budget, lo, hi)))
    return windows


def _write_patch(
    old: Path, new: Path, patch: Path, options: CreateOptions, windows: list[tuple[int, list[Extent]]],
    hashes: tuple[str, str], order: Order, progress: Progress | None,
) -> PatchHeader:
    old_size, new_size = old.stat().st_size, new.stat().st_size
    segments: list[Segment] = []
    payload = patch.with_name(patch.name + ".payload")
    lz_codecs = [c for c in options.codecs if c != "bsdiff"] if _lzdict.available() else []
    if not lz_codecs and "bsdiff" not in options.codecs:
        raise ValueError("the lzma-dict codecs need liblzma, which this machine lacks; allow bsdiff")
    # An old file that fits one window is the window of every segment: one suffix sort serves them all.
    shared = (not options.in_place and "bsdiff" in options.codecs and old_size <= _budget(options)
              and options.segment_size < new_size <= SHARED_NEW_MAX)
    with open(payload, "wb") as out, ThreadPoolExecutor(1) as pool:
        if shared:
            _segments_from_one_diff(old, new, options, lz_codecs, pool, out, segments, progress)
        else:
            _segments_one_by_one(old, new, options, windows, lz_codecs, pool, out, segments, progress)
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


def _segments_one_by_one(
    old: Path, new: Path, options: CreateOptions, windows: list[tuple[int, list[Extent]]],
    lz_codecs: list[Codec], pool: ThreadPoolExecutor, out: BinaryIO, segments: list[Segment], progress: Progress | None,
) -> None:
    """Each segment diffed against its own window, the pool packing the previous one beside the diff."""
    new_size = new.stat().st_size
    done = 0
    pending: _Pending | None = None
    with open(old, "rb") as old_handle, open(new, "rb") as new_handle:
        for number, (start, extents) in enumerate(windows):
            new_handle.seek(start)
            data = new_handle.read(options.segment_size)
            job = _Job(start, data, extents, _read_extents(old_handle, extents), early=new_size <= EARLY_MAX)
            # This thread diffs; the pool (one thread, in order) finishes the previous segment's
            # packing, then probes LZ for this one and, where the probe calls for it, starts its
            # full LZ encoding, all beside the diff. Never more than one suffix array and one
            # encoder at a time: see docs/deltas.md.
            if lz_codecs:
                _submit_probe(pool, job, lz_codecs)
                _submit_speculation(pool, job)
            streams = _diff(job.window, data, extents) if "bsdiff" in options.codecs else None
            if job.probe is not None:
                job.probe.result()  # the plan needs it; the previous segment's packing ran before it
            if pending is not None:
                _write_segment(_choose(*pending), out, segments)
            last = number == len(windows) - 1  # nothing left to diff beside it: packed here, on both cores
            # before a short last segment the diff beside it ends early: both cores, full effort
            split = last or number == len(windows) - 2 and new_size % options.segment_size != 0
            pending = _finish(pool, job, streams, options.compression, split=split, here=last)
            done += len(data)
            if progress:
                progress(done, new_size)
        if pending is not None:
            _write_segment(_choose(*pending), out, segments)


def _segments_from_one_diff(
    old: Path, new: Path, options: CreateOptions, lz_codecs: list[Codec], pool: ThreadPoolExecutor,
    out: BinaryIO, segments: list[Segment], progress: Progress | None,
) -> None:
    """One diff of the whole new file against the whole old file, cut into segments.

    A second segment would otherwise sort the same old bytes again (three quarters of a diff's
    time). The LZ probes and speculative encodings of every segment run beside the one diff;
    bsdiff's packings follow it on both cores at the faster effort, nothing being left to hide
    them behind (esbuild 0.24.0 -> 0.24.1: 3.4% larger than extreme mode, 0.7 s sooner).
    """
    whole_old, whole_new = old.read_bytes(), new.read_bytes()
    new_size = len(whole_new)
    extents = [Extent(offset=0, length=len(whole_old))] if whole_old else []
    starts = list(range(0, len(whole_new), options.segment_size))
    jobs = [_Job(start, whole_new[start : start + options.segment_size], extents, whole_old, early=True) for start in starts]
    if lz_codecs:
        for job in jobs:
            _submit_probe(pool, job, lz_codecs)
        for job in jobs:
            _submit_speculation(pool, job)
    control, diff, extra = bsdiff4.core.diff(whole_old, whole_new)
    del whole_new
    pieces = _cut(control, diff, extra, starts, new_size)
    del control, diff, extra
    # every plan first: a speculative encoding that bsdiff beats stops before any packing starts
    plans: list[tuple[_Job, Plan, _Streams]] = []
    for job, piece in zip(jobs, pieces):
        streams = _streams(*piece, job.data, extents)
        plan = _plan(job.probe.result() if job.probe is not None else None, streams)
        if plan == "bsdiff only":
            job.cancel.set()
        plans.append((job, plan, streams))
    del pieces
    encodings = [_lz_for(pool, job, plan) for job, plan, _ in plans]  # on the pool while this thread packs
    done = 0
    for (job, plan, streams), lz in zip(plans, encodings):
        # nothing to hide behind, as for the last segment one by one: both cores, the faster effort
        packing = _pack_segment(streams, job.data, job.start, options.compression, True, "fast") if plan != "lz only" else None
        _write_segment(_choose(packing, lz), out, segments)
        done += len(job.data)
        if progress:
            progress(done, new_size)


def _lz_for(pool: ThreadPoolExecutor, job: _Job, plan: Plan) -> Future[_Candidate | None] | None:
    """The LZ encoding the plan keeps: the speculative one, or one started now where the probe declined."""
    if plan == "bsdiff only" or job.probe is None:
        return None
    return job.speculative if job.early and _worth_speculating(job.probe.result()) else pool.submit(_encode_lz, job)


_Pending = tuple["Future[tuple[Segment, bytes]] | tuple[Segment, bytes] | None", "Future[_Candidate | None] | None"]


def _finish(pool: ThreadPoolExecutor, job: _Job, streams: _Streams | None, compression: Compression, *,
            split: bool, here: bool) -> _Pending:
    """This segment's packings: bsdiff's (here, or on the pool) and the LZ encoding started for it, per the plan."""
    plan = _plan(job.probe.result() if job.probe is not None else None, streams)
    if plan == "bsdiff only":
        job.cancel.set()  # the speculative LZ encoding stops, freeing the pool for the packing
    lz = _lz_for(pool, job, plan)
    packing: Future[tuple[Segment, bytes]] | tuple[Segment, bytes] | None = None
    if streams is not None and plan != "lz only":
        if here:
            packing = _pack_segment(streams, job.data, job.start, compression, split, effort="fast")
        else:
            packing = pool.submit(_pack_segment, streams, job.data, job.start, compression, split, "max")
    return packing, lz


@dataclass(frozen=True)
class _Streams:
    control: bytes
    diff: bytes
    extra: bytes
    extents: list[Extent]

    @property
    def new_size(self) -> int:
        return len(self.diff) + len(self.extra)  # bsdiff's add and extra bytes tile the segment


@dataclass(frozen=True)
class _Candidate:
    """A segment packed by an LZ codec, to be compared with its bsdiff packing."""

    segment: Segment
    packed: bytes


@dataclass(frozen=True)
class _Probe:
    """The LZ codec that packed a sample of the segment smallest at the fast preset, and that size."""

    codec: Codec
    size: int
    sample: list[tuple[int, int]]  # the pieces of the segment probed, [from, to) each

    @property
    def sampled(self) -> int:
        return sum(end - start for start, end in self.sample)


def _diff(old_window: bytes, data: bytes, extents: list[Extent]) -> _Streams:
    control, diff, extra = bsdiff4.core.diff(old_window, data)
    return _streams(control, diff, extra, data, extents)


def _streams(control: bytes, diff: bytes, extra: bytes, data: bytes, extents: list[Extent]) -> _Streams:
    if len(control) > MAX_CONTROL_BYTES:
        # pathological input: ship the segment's bytes as they are rather than break the format limit
        literal = bsdiff4.core.encode_int64(0) + bsdiff4.core.encode_int64(len(data)) + bsdiff4.core.encode_int64(0)
        return _Streams(literal, b"", data, [])
    return _Streams(control, diff, extra, extents)


class _Rebased:
    """bsdiff control tuples for one segment, whose patcher starts reading the old window at 0.

    Operations arrive in new-file order: `add` (n bytes of diff over the old bytes at an absolute
    old offset) and `extra` (n literal bytes). A tuple is (add, extra, seek) with the old offset
    moving by add + seek, so an add that does not continue where the pending tuple leaves off
    closes that tuple with the seek that gets there.
    """

    def __init__(self) -> None:
        self.control = bytearray()
        self.diff: list[bytes] = []
        self.extra: list[bytes] = []
        self.at = 0  # the patcher's old offset after the tuples written so far
        self.add_len = 0  # the pending tuple
        self.extra_len = 0

    def add(self, length: int, old_offset: int, diff: bytes) -> None:
        if self.extra_len or self.at + self.add_len != old_offset:
            self._close(seek_to=old_offset)
        self.add_len += length
        self.diff.append(diff)

    def literal(self, extra: bytes) -> None:
        self.extra_len += len(extra)
        self.extra.append(extra)

    def finish(self) -> tuple[bytes, bytes, bytes]:
        if self.add_len or self.extra_len:
            self._close(seek_to=self.at + self.add_len)
        return bytes(self.control), b"".join(self.diff), b"".join(self.extra)

    def _close(self, seek_to: int) -> None:
        encode = bsdiff4.core.encode_int64
        self.control += encode(self.add_len) + encode(self.extra_len) + encode(seek_to - self.at - self.add_len)
        self.at, self.add_len, self.extra_len = seek_to, 0, 0


def _tuples(control: bytes) -> np.ndarray:
    """bsdiff's control stream as rows of (add, extra, seek); each stored as sign and magnitude."""
    raw = np.frombuffer(control, dtype="<u8").reshape(-1, 3)
    magnitude = (raw & np.uint64(2**63 - 1)).astype(np.int64)
    return np.where(raw >> np.uint64(63) == 1, -magnitude, magnitude)


def _cut(control: bytes, diff: bytes, extra: bytes, starts: list[int], new_size: int,
         only: set[int] | None = None) -> list[tuple[bytes, bytes, bytes]]:
    """bsdiff streams as one (control, diff, extra) per piece of the new bytes starting at `starts`.

    With `only`, just those pieces are built (the others come back empty), the tuples before the
    first are skipped by their sums and the scan stops after the last.
    """
    rows = _tuples(control)
    ends = [*starts[1:], new_size]
    pieces = [_Rebased() for _ in starts]
    first = 0
    if only is not None and len(rows):
        lengths = rows[:, 0] + rows[:, 1]
        first = int(np.searchsorted(np.cumsum(lengths), starts[min(only)], side="right"))
    diff_at, extra_at, seeks = (int(total) for total in rows[:first].sum(axis=0))
    new_at, old_at = diff_at + extra_at, diff_at + seeks
    segment = bisect.bisect_right(starts, new_at) - 1
    for add, literal, seek in rows[first:].tolist():
        if only is not None and new_at >= ends[max(only)]:
            break
        while add:
            while new_at >= ends[segment]:
                segment += 1
            n = min(add, ends[segment] - new_at)
            if only is None or segment in only:
                pieces[segment].add(n, old_at, diff[diff_at : diff_at + n])
            add, new_at, old_at, diff_at = add - n, new_at + n, old_at + n, diff_at + n
        while literal:
            while new_at >= ends[segment]:
                segment += 1
            n = min(literal, ends[segment] - new_at)
            if only is None or segment in only:
                pieces[segment].literal(extra[extra_at : extra_at + n])
            literal, new_at, extra_at = literal - n, new_at + n, extra_at + n
        old_at += seek
    if only is None and (new_at != new_size or diff_at != len(diff) or extra_at != len(extra)):
        raise AssertionError("bsdiff streams do not cover the new file")
    return [piece.finish() for piece in pieces]


def _lz_inputs(codec: Codec, window: bytes, data: bytes, extents: list[Extent], start: int) -> tuple[bytes | bytearray, bytes | bytearray]:
    return _lz_window(codec, window, extents), _lz_data(codec, data, start)


def _lz_window(codec: Codec, window: bytes, extents: list[Extent]) -> bytes | bytearray:
    if codec != "lzma-dict-x86":
        return window
    converted = bytearray(window)
    transform_extents(converted, [(e.offset, e.length) for e in extents], encode=True)
    return converted


def _lz_data(codec: Codec, data: bytes, address: int) -> bytes | bytearray:
    if codec != "lzma-dict-x86":
        return data
    converted = bytearray(data)
    transform(converted, 0, len(converted), address, encode=True)
    return converted


def _sample(size: int) -> list[tuple[int, int]]:
    """PROBE_PIECES pieces of PROBE_SAMPLE bytes in all, one in the middle of each equal part of the segment.

    Spread, because a segment's parts differ (code, tables, strings): the middle 2 MiB alone of
    ruff's third segment packed twice as well as the whole, and of its fourth turned an LZ win
    (11% smaller) into bsdiff's.
    """
    if size <= PROBE_SAMPLE:
        return [(0, size)]
    piece, part = PROBE_SAMPLE // PROBE_PIECES, size // PROBE_PIECES
    return [(i * part + (part - piece) // 2, i * part + (part - piece) // 2 + piece) for i in range(PROBE_PIECES)]


def _probe_lz(window: bytes, data: bytes, extents: list[Extent], start: int, codecs: list[Codec], sampled: bool) -> _Probe:
    """Each LZ codec at the fast preset, on the segment or on its sample, as one stream; the smallest.

    A sample on small files: there the probes run beside the only diff, and at full length their
    memory traffic slowed it by 0.3-0.8 s (about a tenth of the time). Probing the whole segment
    where the sample looked like LZ's (tried) cost a single-segment Rust file 1.7 s; the wider
    LZ_TRY_SAMPLED covers the sample's error instead. Larger files probe whole segments: on the
    401 MB rootfs tar the samples chose LZ for 9 segments instead of 14, 0.6% larger in all.
    """
    return _probe_pieces(window, data, extents, start, codecs, _sample(len(data)) if sampled else [(0, len(data))])


def _probe_pieces(window: bytes, data: bytes, extents: list[Extent], start: int, codecs: list[Codec],
                  pieces: list[tuple[int, int]]) -> _Probe:
    sizes = {codec: len(_lzdict.compress(_lz_window(codec, window, extents),
                                         b"".join(_lz_data(codec, data[lo:hi], start + lo) for lo, hi in pieces),
                                         effort=_lzdict.PROBE))
             for codec in codecs}
    best = min(codecs, key=sizes.__getitem__)
    return _Probe(best, sizes[best], pieces)


def _submit_probe(pool: ThreadPoolExecutor, job: _Job, codecs: list[Codec]) -> None:
    job.probe = pool.submit(_probe_lz, job.window, job.data, job.extents, job.start, codecs, job.early)


def _submit_speculation(pool: ThreadPoolExecutor, job: _Job) -> None:
    """Queue the full LZ encoding after the probe, before bsdiff's result says whether it is needed.

    The pool would otherwise wait for the diff. Only segments that the probe found hard to
    explain from the old window are encoded this early (see _worth_speculating); where bsdiff
    then wins, the plan cancels the encoding within a FEED of input.
    """
    job.speculative = pool.submit(_speculate, job)


def _worth_speculating(probe: _Probe) -> bool:
    """Whether the segment changed enough that LZ may win, judged from the probe alone.

    A sample its window packs to less than SPECULATE_ABOVE of its size is a small change, and
    small changes are bsdiff's: over the benchmark's 20 segments, LZ won only from 0.15 up, and
    encoding early beside the diff costs a memory-bound diff 0.2-0.5 s when it is thrown away.
    """
    return probe.size >= SPECULATE_ABOVE * probe.sampled


def _speculate(job: _Job) -> _Candidate | None:
    if not job.early or job.probe is None or job.cancel.is_set() or not _worth_speculating(job.probe.result()):  # done: in order
        return None
    return _encode_lz(job)


def _encode_lz(job: _Job) -> _Candidate | None:
    """The segment's full LZ encoding with the probe's codec; None if cancelled."""
    assert job.probe is not None
    codec = job.probe.result().codec
    try:
        packed = _lzdict.compress(*_lz_inputs(codec, job.window, job.data, job.extents, job.start), cancel=job.cancel)
    except _lzdict.Cancelled:
        return None
    segment = Segment(
        new_offset=job.start,
        new_size=len(job.data),
        new_sha256=hashlib.sha256(job.data).hexdigest(),
        old=job.extents,
        control_size=0,
        diff_size=0,
        extra_size=len(job.data),
        packed_size=len(packed),
        codec=codec,
    )
    return _Candidate(segment, packed)


Plan = Literal["bsdiff only", "both", "lz only"]


def _plan(probe: _Probe | None, streams: _Streams | None) -> Plan:
    """Which full encodings a segment gets, from the LZ probe against bsdiff's on the same sample.

    Full encoding shrinks LZ more than bsdiff (measured: LZ to 0.82-0.88 of its probe, bsdiff's
    streams to 0.88-0.94), so LZ can win from a probe up to ~7% larger; a 2 MiB sample's ratio
    was off the whole segment's by up to 0.065 (ruff's fourth segment: 1.053 on the sample, 0.99
    in full, and LZ 11% smaller in the end), so from samples LZ is encoded in full up to 1.09. Below
    LZ_SURE bsdiff cannot win and its packing is skipped.
    """
    if probe is None:
        return "bsdiff only"
    if streams is None:
        return "lz only"
    if probe.sampled == streams.new_size:
        sample = streams.control + streams.diff + streams.extra
    else:
        bounds = sorted({0, *(point for piece in probe.sample for point in piece)} - {streams.new_size})
        wanted = [bounds.index(lo) for lo, _ in probe.sample]
        pieces = _cut(streams.control, streams.diff, streams.extra, bounds, streams.new_size, only=set(wanted))
        # as packed: every control stream, then every diff stream, then every extra stream
        sample = b"".join(b"".join(pieces[index][part] for index in wanted) for part in range(3))
    bsdiff_probe = len(lzma.compress(sample, format=lzma.FORMAT_RAW,
                                     filters=[{"id": lzma.FILTER_LZMA2, "preset": _lzdict.PROBE.preset}]))
    log.debug("probes: %s %d, bsdiff %d", probe.codec, probe.size, bsdiff_probe)
    if probe.size > (LZ_TRY_SAMPLED if probe.sampled < streams.new_size else LZ_TRY) * bsdiff_probe:
        return "bsdiff only"
    return "lz only" if probe.size < LZ_SURE * bsdiff_probe else "both"


def _choose(packing: Future[tuple[Segment, bytes]] | tuple[Segment, bytes] | None,
            lz: Future[_Candidate | None] | None) -> tuple[Segment, bytes]:
    """The smaller packing; at least one exists (see _plan)."""
    bsdiff = packing.result() if isinstance(packing, Future) else packing
    candidate = lz.result() if lz is not None else None
    if candidate is not None and bsdiff is not None:
        log.debug("segment at %d: %s %d, bsdiff %d", candidate.segment.new_offset, candidate.segment.codec,
                  len(candidate.packed), len(bsdiff[1]))
    if candidate is not None and (bsdiff is None or len(candidate.packed) < len(bsdiff[1])):
        return candidate.segment, candidate.packed
    if bsdiff is None:
        raise AssertionError("a segment with neither codec")
    return bsdiff


def _pack_segment(streams: _Streams, data: bytes, start: int, compression: Compression, split: bool,
                  effort: Effort) -> tuple[Segment, bytes]:
    packed = compress(streams.control + streams.diff + streams.extra, compression, split=split, effort=effort)
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
