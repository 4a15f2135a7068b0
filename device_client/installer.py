"""The `file` install handler: atomic replace of one file, the previous version kept for rollback."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from services.files import fsync_dir, sha256_file

__all__ = ["FileInstaller", "sha256_file"]


class FileInstaller:
    def __init__(self, target: Path) -> None:
        self.target = target

    @property
    def previous(self) -> Path:
        return self.target.with_name(self.target.name + ".previous")

    def install(self, new_file: Path) -> None:
        """Put `new_file` in place of the target in one rename; keep the old target as `.previous`."""
        staged = self.target.with_name(f".{self.target.name}.staged")
        shutil.copyfile(new_file, staged)
        with open(staged, "rb+") as handle:
            os.fsync(handle.fileno())
        if self.target.exists():
            shutil.copystat(self.target, staged)
            self.previous.unlink(missing_ok=True)
            os.link(self.target, self.previous)
        os.replace(staged, self.target)
        fsync_dir(self.target.parent)

    def rollback(self) -> None:
        if not self.previous.exists():
            raise FileNotFoundError(f"no previous version of {self.target} to roll back to")
        os.replace(self.previous, self.target)
        fsync_dir(self.target.parent)
