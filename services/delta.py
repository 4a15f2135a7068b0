"""Binary deltas with bsdiff4 (whole-file for now), with the patch header checked before applying.

bsdiff4 allocates the new file's size as read from the patch header; a hostile header could ask
for terabytes. `apply_delta` therefore checks the header against the size the signed manifest
promises before bsdiff4 sees the patch.
"""

from __future__ import annotations

import struct
from pathlib import Path

import bsdiff4

MAGIC = b"BSDIFF40"


class BadPatch(ValueError):
    code = "bad_patch"


def create_delta(old: Path, new: Path, patch: Path) -> int:
    bsdiff4.file_diff(str(old), str(new), str(patch))
    return patch.stat().st_size


def patch_header(patch: Path) -> tuple[int, int, int]:
    """(control length, diff length, new size) from a BSDIFF40 header."""
    with open(patch, "rb") as handle:
        header = handle.read(32)
    if len(header) < 32 or header[:8] != MAGIC:
        raise BadPatch("not a bsdiff4 patch (bad magic or truncated header)")
    values = []
    for (raw,) in struct.iter_unpack("<Q", header[8:32]):
        # bsdiff's offtin: sign-magnitude 64-bit integers
        value = raw & 0x7FFF_FFFF_FFFF_FFFF
        if raw >> 63:
            raise BadPatch("negative length in patch header")
        values.append(value)
    return values[0], values[1], values[2]


def apply_delta(old: Path, patch: Path, out: Path, *, expected_size: int) -> None:
    control_len, diff_len, new_size = patch_header(patch)
    if new_size != expected_size:
        raise BadPatch(f"patch produces {new_size} bytes, the manifest promises {expected_size}")
    if 32 + control_len + diff_len > patch.stat().st_size:
        raise BadPatch("patch header lengths exceed the patch size")
    try:
        bsdiff4.file_patch(str(old), str(out), str(patch))
    except Exception as exc:  # bsdiff4 raises ValueError or bz2 errors on corrupt streams
        out.unlink(missing_ok=True)
        raise BadPatch(f"corrupt patch: {exc}") from None
