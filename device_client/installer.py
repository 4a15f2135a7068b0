"""Install handlers: how a verified artifact becomes the running version, and how it is undone.

Each handler has `install(new_file)` and `rollback()`; the agent runs the health check between
the two and commits only a healthy install.

- `file`: atomic replace of one file; the previous version kept as `<target>.previous`.
- `ab`: two slots `<target>.slot-a` / `.slot-b`; `target` is a symlink to the active one (the
  bootloader's pointer). The new image goes to the inactive slot, then one rename switches.
- `command`: runs the manifest's argument vector (never a shell); its rollback vector on failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Protocol

from schemas.errors import EdgeswarmError, ReasonCode
from schemas.models import InstallSpec
from services.runtime.files import fsync_dir, sha256_file

__all__ = ["ABInstaller", "CommandInstaller", "FileInstaller", "InstallError", "Installer", "installer_for", "sha256_file"]


class InstallError(EdgeswarmError):
    code = ReasonCode.INSTALL_FAILED


class Installer(Protocol):
    target: Path

    def install(self, new_file: Path) -> None: ...

    def rollback(self) -> None: ...


def _copy_durably(source: Path, dest: Path) -> None:
    staged = dest.with_name(f".{dest.name}.staged")
    shutil.copyfile(source, staged)
    with open(staged, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(staged, dest)
    fsync_dir(dest.parent)


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


class ABInstaller:
    def __init__(self, target: Path) -> None:
        self.target = target

    def slot(self, name: str) -> Path:
        return self.target.with_name(f"{self.target.name}.slot-{name}")

    def active(self) -> str:
        self._adopt()
        return os.readlink(self.target).rsplit("-", 1)[1]

    def _adopt(self) -> None:
        """A device provisioned with a plain file: that file becomes slot a."""
        if self.target.exists() and not self.target.is_symlink():
            os.replace(self.target, self.slot("a"))
            self._point_to("a")

    def _point_to(self, name: str) -> None:
        link = self.target.with_name(f".{self.target.name}.link")
        link.unlink(missing_ok=True)
        os.symlink(self.slot(name).name, link)
        os.replace(link, self.target)  # the switch itself: one atomic rename
        fsync_dir(self.target.parent)

    def install(self, new_file: Path) -> None:
        inactive = "b" if self.active() == "a" else "a"
        _copy_durably(new_file, self.slot(inactive))
        self._point_to(inactive)

    def rollback(self) -> None:
        self._point_to("b" if self.active() == "a" else "a")


class CommandInstaller:
    def __init__(self, target: Path, spec: InstallSpec, timeout: float) -> None:
        assert spec.command is not None
        self.target = target
        self.spec = spec
        self.timeout = timeout
        self.artifact: Path | None = None

    def _argv(self, template: list[str]) -> list[str]:
        values = {"{artifact}": str(self.artifact or ""), "{target}": str(self.target)}
        argv = []
        for arg in template:
            for key, value in values.items():
                arg = arg.replace(key, value)
            argv.append(arg)
        return argv

    def _run(self, template: list[str], what: str) -> None:
        argv = self._argv(template)
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise InstallError(f"{what} {argv[0]!r} could not run: {exc}") from None
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or [""]
            raise InstallError(f"{what} {argv[0]!r} exited with {result.returncode}: {tail[0][:200]}")

    def install(self, new_file: Path) -> None:
        self.artifact = new_file
        assert self.spec.command is not None
        self._run(self.spec.command, "install command")

    def rollback(self) -> None:
        if self.spec.rollback is not None:
            self._run(self.spec.rollback, "rollback command")


def installer_for(spec: InstallSpec, target: Path, *, command_timeout: float = 600.0) -> Installer:
    if spec.handler == "ab":
        return ABInstaller(target)
    if spec.handler == "command":
        return CommandInstaller(target, spec, command_timeout)
    return FileInstaller(target)
