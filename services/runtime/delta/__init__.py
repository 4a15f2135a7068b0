"""Binary deltas in the ESDELTA1 format: windowed bsdiff4 with bounded memory on both sides.

schemas/patch.py defines the format; create.py makes patches (operator side, uses numpy);
apply.py applies them to a new file or in place (device side, no numpy).
"""

from __future__ import annotations

from pathlib import Path

from services.runtime.delta.apply import BadPatch, apply_in_place, apply_patch, patch_info

__all__ = ["BadPatch", "apply_delta", "apply_in_place", "apply_patch", "create_delta", "patch_info"]


def create_delta(old: Path, new: Path, patch: Path) -> int:
    from services.runtime.delta.create import create_patch  # numpy stays out of the device's imports

    create_patch(old, new, patch)
    return patch.stat().st_size


def apply_delta(old: Path, patch: Path, out: Path, *, expected_size: int) -> None:
    apply_patch(old, patch, out, expected_size=expected_size)
