"""Apply ESDELTA1 patches one segment at a time: to a new file, or inside the old file with a journal.

Working memory is one segment's worth (old window <= 16 MiB, streams and output <= 8 MiB each
plus a bounded control block), whatever the image size. Everything read from the patch is
checked before it is used: the header against the format limits and the patch's own size,
every stream against its promised length, every segment's output against its sha256, and the
result against the new file's sha256. A refused patch leaves the old file untouched.

In-place application (for devices without room for two images) follows the journal protocol
in docs/deltas.md: a segment's output is staged and fsynced before it overwrites anything, so
a power cut at any point resumes where it stopped and finishes with the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import BinaryIO

import bsdiff4.core
from pydantic import ValidationError

from schemas.canonical import MalformedDocument
from schemas.errors import EdgeswarmError, ReasonCode
from schemas.patch import MAGIC, MAX_HEADER_BYTES, PatchHeader, Segment
from services.runtime.delta._codec import CorruptStream, decompress
from services.runtime.delta._lzdict import LzDictError
from services.runtime.delta._lzdict import decompress as lzdict_decompress
from services.runtime.delta._x86 import transform, transform_extents
from services.runtime.files import atomic_write, sha256_file

Progress = Callable[[int, int], None]
StepHook = Callable[[str, int], None]
PREFIX = len(MAGIC) + 4


class BadPatch(EdgeswarmError, ValueError):
    code = ReasonCode.BAD_PATCH


def read_header(handle: BinaryIO, patch_size: int) -> tuple[PatchHeader, int]:
    """The validated header and the offset of the first segment's payload."""
    prefix = handle.read(PREFIX)
    if len(prefix) < PREFIX or prefix[: len(MAGIC)] != MAGIC:
        raise BadPatch("not an edgeswarm delta (bad magic or truncated header)")
    (length,) = struct.unpack("<I", prefix[len(MAGIC) :])
    if length > MAX_HEADER_BYTES:
        raise BadPatch(f"patch header claims {length} bytes, more than the {MAX_HEADER_BYTES} allowed")
    raw = handle.read(length)
    if len(raw) != length:
        raise BadPatch("patch is truncated inside its header")
    try:
        header = PatchHeader.from_bytes(raw, max_bytes=MAX_HEADER_BYTES)
    except MalformedDocument as exc:
        raise BadPatch(f"patch header is not valid JSON: {exc}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "header"
        raise BadPatch(f"patch header is invalid at {where}: {first['msg']}") from None
    if PREFIX + length + header.payload_size != patch_size:
        raise BadPatch(f"patch is {patch_size} bytes, its header accounts for {PREFIX + length + header.payload_size}: truncated or padded")
    return header, PREFIX + length


def patch_info(patch: Path) -> PatchHeader:
    with open(patch, "rb") as handle:
        return read_header(handle, patch.stat().st_size)[0]


def _check_old(header: PatchHeader, old: Path) -> None:
    size = old.stat().st_size
    if size != header.old_size:
        raise BadPatch(f"the patch is for a {header.old_size}-byte file, this one has {size} bytes")
    if sha256_file(old) != header.old_sha256:
        raise BadPatch(f"the patch is for the file with sha256 {header.old_sha256[:16]}..., not this one")


def _old_window(handle: BinaryIO, segment: Segment) -> bytes | bytearray:
    """The segment's old extents in one buffer: bytes for bsdiff4 (it takes nothing else), a
    bytearray for the lzma-dict codecs (lzma-dict-x86 converts it in place)."""
    window = bytearray(segment.old_size)
    view = memoryview(window)
    position = 0
    for extent in segment.old:
        handle.seek(extent.offset)
        got = handle.readinto(view[position : position + extent.length])
        if got != extent.length:
            raise BadPatch(f"old file ends before extent {extent.offset}+{extent.length}")
        position += extent.length
    view.release()
    if segment.codec == "bsdiff":
        return bytes(window)  # the bytearray is dropped on return: one window held at a time
    return window


def rebuild_segment(header: PatchHeader, index: int, packed: bytes, old_window: bytes | bytearray) -> bytes | bytearray:
    segment = header.segments[index]
    if len(packed) != segment.packed_size:
        raise BadPatch(f"segment {index} is truncated")
    try:
        data = _decode(header, segment, packed, old_window)
    except (CorruptStream, LzDictError, ValueError) as exc:
        raise BadPatch(f"segment {index}: {exc}") from None
    if hashlib.sha256(data).hexdigest() != segment.new_sha256:
        raise BadPatch(f"segment {index} does not rebuild the bytes its header promises")
    return data


def _decode(header: PatchHeader, segment: Segment, packed: bytes, old_window: bytes | bytearray) -> bytes | bytearray:
    if segment.codec == "bsdiff":
        control, diff, extra = decompress(packed, header.compression, (segment.control_size, segment.diff_size, segment.extra_size))
        return bsdiff4.core.patch(old_window, segment.new_size, control, diff, extra)
    x86 = segment.codec == "lzma-dict-x86"
    if x86:
        window = old_window if isinstance(old_window, bytearray) else bytearray(old_window)
        transform_extents(window, [(e.offset, e.length) for e in segment.old], encode=True)
        old_window = window
    data = lzdict_decompress(old_window, packed, segment.new_size)
    if x86:
        transform(data, 0, len(data), segment.new_offset, encode=False)
    return data


def _segments(header: PatchHeader, patch: BinaryIO, payload_at: int, old: BinaryIO, indices: Iterable[int]) -> Iterator[tuple[int, bytes]]:
    starts = list(accumulate((s.packed_size for s in header.segments), initial=payload_at))
    for index in indices:
        segment = header.segments[index]
        patch.seek(starts[index])
        packed = patch.read(segment.packed_size)
        yield index, rebuild_segment(header, index, packed, _old_window(old, segment))


def _rehearse(header: PatchHeader, patch: BinaryIO, payload_at: int, old: BinaryIO) -> None:
    """Rebuild every segment without writing, in file order, and check the whole result's sha256.

    The old file is intact during a rehearsal, so any order is valid; file order lets the
    result be hashed as it streams past.
    """
    digest = hashlib.sha256()
    in_file_order = sorted(range(len(header.segments)), key=lambda i: header.segments[i].new_offset)
    for _, data in _segments(header, patch, payload_at, old, in_file_order):
        digest.update(data)
    if digest.hexdigest() != header.new_sha256:
        raise BadPatch("the segments do not rebuild the file whose sha256 the patch promises")


def apply_patch(old: Path, patch: Path, out: Path, *, expected_size: int | None = None, progress: Progress | None = None) -> PatchHeader:
    """Write the new file to `out` (through out.part, renamed only once its sha256 is right)."""
    with open(patch, "rb") as handle:
        header, payload_at = read_header(handle, patch.stat().st_size)
        if expected_size is not None and header.new_size != expected_size:
            raise BadPatch(f"patch produces {header.new_size} bytes, {expected_size} were promised")
        _check_old(header, old)
        part = out.with_name(out.name + ".part")
        try:
            done = 0
            with open(old, "rb") as old_handle, open(part, "wb") as result:
                for index, data in _segments(header, handle, payload_at, old_handle, range(len(header.segments))):
                    result.seek(header.segments[index].new_offset)
                    result.write(data)
                    done += len(data)
                    if progress:
                        progress(done, header.new_size)
                result.truncate(header.new_size)
            if sha256_file(part) != header.new_sha256:
                raise BadPatch("the rebuilt file does not have the sha256 the patch promises")
            os.replace(part, out)
        finally:
            part.unlink(missing_ok=True)
    return header


@dataclass(frozen=True)
class Journal:
    """Progress of an in-place application, kept beside the target file."""

    patch_sha256: str
    next: int
    staged: bool

    @staticmethod
    def path(target: Path) -> Path:
        return target.with_name(target.name + ".esdjournal")

    @staticmethod
    def stage_path(target: Path) -> Path:
        return target.with_name(target.name + ".esdstage")

    @classmethod
    def load(cls, target: Path) -> Journal | None:
        try:
            raw = json.loads(cls.path(target).read_bytes())
            return cls(patch_sha256=str(raw["patch_sha256"]), next=int(raw["next"]), staged=bool(raw["staged"]))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            raise BadPatch(f"in-place journal {cls.path(target)} is unreadable ({exc}); the target may be half-patched") from None

    def save(self, target: Path) -> None:
        record = {"patch_sha256": self.patch_sha256, "next": self.next, "staged": self.staged}
        atomic_write(self.path(target), json.dumps(record).encode())


def _is_new(header: PatchHeader, target: Path) -> bool:
    return target.stat().st_size == header.new_size and sha256_file(target) == header.new_sha256


def _write_durably(handle: BinaryIO, offset: int, data: bytes, step: StepHook | None, index: int) -> None:
    # written in two halves so that tests can cut the power between them
    half = len(data) // 2
    handle.seek(offset)
    handle.write(data[:half])
    if step:
        step("half-written", index)
    handle.write(data[half:])
    handle.flush()
    os.fsync(handle.fileno())


def apply_in_place(target: Path, patch: Path, *, progress: Progress | None = None, step: StepHook | None = None) -> PatchHeader:
    """Turn `target` into the new file inside the same file; resumable after a crash at any point.

    A fresh application first rehearses: it rebuilds every segment in memory and checks the
    whole result's sha256 without writing, so a bad patch is refused while the target is still
    the intact old file. A target that already is the new file is left alone: a caller cut off
    after the application finished, but before it noted so, may simply run it again.
    `step(name, segment)` is called at every point a crash could matter (used by tests).
    """
    patch_sha256 = sha256_file(patch)
    journal = Journal.load(target)
    if journal is not None and journal.patch_sha256 != patch_sha256:
        raise BadPatch(f"{Journal.path(target)} belongs to another patch; finish that one first (its sha256 is {journal.patch_sha256[:16]}...)")
    with open(patch, "rb") as handle:
        header, payload_at = read_header(handle, patch.stat().st_size)
        conflict = header.in_place_conflict()
        if conflict:
            raise BadPatch(f"this patch cannot be applied in place: {conflict} (create it with --in-place)")
        if journal is None and _is_new(header, target):
            return header
        if journal is None:
            _check_old(header, target)
            with open(target, "rb") as old_handle:
                _rehearse(header, handle, payload_at, old_handle)
            journal = Journal(patch_sha256, 0, False)
            journal.save(target)
        stage = Journal.stage_path(target)
        with open(target, "r+b") as file:
            if journal.staged:
                data = stage.read_bytes()
                if hashlib.sha256(data).hexdigest() != header.segments[journal.next].new_sha256:
                    raise BadPatch(f"staged copy of segment {journal.next} is damaged; the target is half-patched")
                _write_durably(file, header.segments[journal.next].new_offset, data, None, journal.next)
                journal = Journal(patch_sha256, journal.next + 1, False)
                journal.save(target)
            done = sum(s.new_size for s in header.segments[: journal.next])
            for index, data in _segments(header, handle, payload_at, file, range(journal.next, len(header.segments))):
                if step:
                    step("rebuilt", index)
                with open(stage, "wb") as staged:
                    staged.write(data)
                    staged.flush()
                    os.fsync(staged.fileno())
                Journal(patch_sha256, index, True).save(target)
                if step:
                    step("staged", index)
                _write_durably(file, header.segments[index].new_offset, data, step, index)
                if step:
                    step("written", index)
                Journal(patch_sha256, index + 1, False).save(target)
                done += len(data)
                if progress:
                    progress(done, header.new_size)
            file.truncate(header.new_size)
            file.flush()
            os.fsync(file.fileno())
    if sha256_file(target) != header.new_sha256:
        raise BadPatch("the file patched in place does not have the sha256 the patch promises")
    stage.unlink(missing_ok=True)
    Journal.path(target).unlink(missing_ok=True)
    return header
