"""A device on a small file system of its own, for the full-disk faults (issue 15, item 5)."""

from __future__ import annotations

import os
import shutil
import subprocess

from tests.support.harness import Device


class SmallDisk:
    """A device's whole directory on a tmpfs of its own, unmounted on the way out."""

    def __init__(self, device: Device, size: str = "200m") -> None:
        self.base = device.spec.base_dir
        saved = self.base.with_name(self.base.name + ".provisioned")
        shutil.move(self.base, saved)
        self.base.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(self.base)], check=True)
        shutil.copytree(saved, self.base, dirs_exist_ok=True, symlinks=True)
        shutil.rmtree(saved)

    def resize(self, size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.base)], check=True)

    def used(self) -> int:
        info = os.statvfs(self.base)
        return (info.f_blocks - info.f_bfree) * info.f_frsize

    def close(self) -> None:
        subprocess.run(["umount", str(self.base)], check=True)


def half_written(device: Device) -> list[str]:
    """Partial files: a patched result, a staged copy, a temporary state file (a verified download
    kept for the retry is not one)."""
    spec = device.spec
    found = [p.name for p in (spec.state_dir / "downloads").iterdir() if not p.name.endswith((".delta", ".full"))]
    found += [p.name for p in spec.installed_file.parent.iterdir() if p.name.startswith(".")]
    found += [p.name for p in spec.state_dir.iterdir() if p.name.endswith(".tmp")]
    return found
