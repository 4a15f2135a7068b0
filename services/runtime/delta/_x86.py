"""x86 branch conversion: rel32 call and jump targets rewritten as absolute addresses, and back.

When a release inserts or removes code, every call whose distance to its target changed differs
in its 4 offset bytes although it still calls the same function; written as absolute addresses
the calls to a function that did not move stay byte-identical, and an LZ coder finds longer
matches against the old file. xz's BCJ filter does the same for one stream; this version runs
on a window of the old file and on a segment of the new one, each with its own file address.

Decoding visits the same positions as encoding and keeps every byte it does not own: an opcode byte
(E8 call, E9 jmp) claims the next 4 bytes whether or not it converts them, so the positions a
scan visits depend only on bytes no conversion changes; only offsets whose top byte is 00 or FF
(targets within 16 MiB) are converted, into a value whose top byte is 00 or FF again, so the
decoder makes the same choice. Pure Python over regex matches: devices apply it without numpy.
"""

from __future__ import annotations

import re

_OPCODE = re.compile(rb"[\xe8\xe9]")
_LOW25 = (1 << 25) - 1
_SIGN = 1 << 24


def transform(buf: bytearray, start: int, stop: int, address: int, *, encode: bool) -> None:
    """Convert buf[start:stop] in place; `address` is the file offset of buf[start]."""
    end = stop - 4
    claimed = start
    for match in _OPCODE.finditer(buf, start, max(start, end)):
        at = match.start()
        if at < claimed:
            continue
        claimed = at + 5
        top = buf[at + 4]
        if top != 0 and top != 0xFF:
            continue
        offset = int.from_bytes(buf[at + 1 : at + 5], "little")
        after = address + (at - start) + 5
        value = (offset + after if encode else offset - after) & _LOW25
        if value & _SIGN:
            value |= 0xFE000000
        buf[at + 1 : at + 5] = value.to_bytes(4, "little")


def transform_extents(window: bytearray, extents: list[tuple[int, int]], *, encode: bool) -> None:
    """Convert a window made of old-file extents, (offset, length) each, in place."""
    position = 0
    for offset, length in extents:
        transform(window, position, position + length, offset, encode=encode)
        position += length
