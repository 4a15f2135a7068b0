"""The edgeswarm delta patch format ("ESDELTA1", header format 1 or 2): a header and independently packed segments.

    magic  b"ESDELTA1"
    u32 LE header length, at most MAX_HEADER_BYTES
    header canonical JSON (PatchHeader)
    segment payloads, in header order, each `packed_size` bytes

Each segment rebuilds `new_size` bytes of the new file at `new_offset` from the concatenation
of its `old` extents (its old window), with one of three codecs (format 2; format 1 has only
the first, and its headers carry no `codec` key):

- `bsdiff`: a bsdiff4 control/diff/extra triple, compressed with the header's `compression`;
- `lzma-dict`: raw LZMA2 whose preset dictionary is the old window (an LZ match against it);
- `lzma-dict-x86`: the same over x86 branch-converted bytes (services/runtime/delta/_x86.py):
  the window converted at its old-file addresses, the output converted back at its new ones.

An lzma-dict segment has no control or diff stream: `extra_size` is its `new_size`. Every limit below
exists so that a device can apply any patch with bounded memory and so that a hostile header
is refused before anything is allocated or written: a segment never produces more than
MAX_SEGMENT_NEW bytes, never reads more than MAX_SEGMENT_OLD bytes of the old file, and its
decompressed streams add up to exactly what it produces (plus a bounded control block).

`order` is the order segments are stored and applied in. A patch is *in-place safe* when no
segment reads old bytes that an earlier segment has already overwritten (see in_place_conflict).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from schemas.canonical import canonical_json
from schemas.models import Sha256Hex, WireModel

MAGIC = b"ESDELTA1"
MAX_HEADER_BYTES = 4 << 20
MAX_SEGMENT_NEW = 8 << 20
MAX_SEGMENT_OLD = 16 << 20
MAX_CONTROL_BYTES = 4 << 20
MAX_EXTENTS = 256
MAX_FILE_SIZE = 1 << 44  # 16 TiB: far above any image, far below integer trouble
CONTROL_TUPLE = 24
Codec = Literal["bsdiff", "lzma-dict", "lzma-dict-x86"]

Size = Annotated[int, Field(ge=0, le=MAX_FILE_SIZE)]


class Extent(WireModel):
    offset: Size
    length: Annotated[int, Field(ge=1, le=MAX_SEGMENT_OLD)]

    @property
    def end(self) -> int:
        return self.offset + self.length


class Segment(WireModel):
    new_offset: Size
    new_size: Annotated[int, Field(ge=1, le=MAX_SEGMENT_NEW)]
    new_sha256: Sha256Hex
    old: Annotated[list[Extent], Field(max_length=MAX_EXTENTS)]
    control_size: Annotated[int, Field(ge=0, le=MAX_CONTROL_BYTES)]
    diff_size: Annotated[int, Field(ge=0, le=MAX_SEGMENT_NEW)]
    extra_size: Annotated[int, Field(ge=0, le=MAX_SEGMENT_NEW)]
    packed_size: Annotated[int, Field(ge=1, le=2 * MAX_SEGMENT_NEW + MAX_CONTROL_BYTES)]
    codec: Codec = "bsdiff"

    @property
    def new_end(self) -> int:
        return self.new_offset + self.new_size

    @property
    def old_size(self) -> int:
        return sum(e.length for e in self.old)

    @property
    def unpacked_size(self) -> int:
        return self.control_size + self.diff_size + self.extra_size

    @model_validator(mode="after")
    def _consistent(self) -> Segment:
        if self.control_size % CONTROL_TUPLE:
            raise ValueError("control block is not a whole number of 24-byte tuples")
        # bsdiff copies every new byte either from the diff or from the extra stream
        if self.diff_size + self.extra_size != self.new_size:
            raise ValueError("diff and extra sizes do not add up to the segment size")
        if self.old_size > MAX_SEGMENT_OLD:
            raise ValueError(f"segment reads {self.old_size} old bytes, more than {MAX_SEGMENT_OLD}")
        if self.codec != "bsdiff" and (self.control_size or self.diff_size):
            raise ValueError(f"a {self.codec} segment has no control or diff stream")
        return self


class PatchHeader(WireModel):
    format: Literal[1, 2]
    compression: Literal["lzma", "zstd"]
    old_size: Size
    old_sha256: Sha256Hex
    new_size: Size
    new_sha256: Sha256Hex
    order: Literal["forward", "backward"]
    segments: Annotated[list[Segment], Field(max_length=MAX_FILE_SIZE // MAX_SEGMENT_NEW)]

    @model_validator(mode="after")
    def _tiles_the_new_file(self) -> PatchHeader:
        if self.format == 1 and any(s.codec != "bsdiff" for s in self.segments):
            raise ValueError("format 1 has only bsdiff segments")
        for segment in self.segments:
            for extent in segment.old:
                if extent.end > self.old_size:
                    raise ValueError(f"old extent {extent.offset}+{extent.length} lies beyond the old file ({self.old_size} bytes)")
        ascending = sorted(self.segments, key=lambda s: s.new_offset)
        stored = ascending if self.order == "forward" else ascending[::-1]
        if stored != self.segments:
            raise ValueError(f"segments are not stored in {self.order} order")
        position = 0
        for segment in ascending:
            if segment.new_offset != position:
                raise ValueError(f"segments leave a gap or overlap at offset {position}")
            position = segment.new_end
        if position != self.new_size:
            raise ValueError(f"segments cover {position} bytes, the header promises {self.new_size}")
        return self

    def to_bytes(self) -> bytes:
        """Canonical JSON without defaults: a format-1 header stays readable by format-1 readers."""
        return canonical_json(self.model_dump(mode="json", exclude_defaults=True))

    @property
    def payload_size(self) -> int:
        return sum(s.packed_size for s in self.segments)

    def in_place_conflict(self) -> str | None:
        """Why applying this patch inside the old file would destroy bytes still needed, or None.

        Segments are applied in stored order; each reads its old extents before writing its own
        output, so it may read the region it overwrites but nothing an earlier segment wrote.
        """
        written: int | None = None  # forward: bytes below it are new; backward: bytes from it on are
        for index, segment in enumerate(self.segments):
            for extent in segment.old:
                if written is not None and self.order == "forward" and extent.offset < written:
                    return f"segment {index} reads old bytes at {extent.offset} after they were overwritten"
                if written is not None and self.order == "backward" and extent.end > written:
                    return f"segment {index} reads old bytes up to {extent.end} after they were overwritten"
            written = segment.new_end if self.order == "forward" else segment.new_offset
        return None
