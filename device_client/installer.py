"""Install handlers: how a verified artifact becomes the running version, and how it is undone.

- `file`: atomic replace of one file; the previous version kept as `<target>.previous` (a hard link
  to the old file, made before the switch).
- `ab`: two slots `<target>.slot-a` / `.slot-b`; `target` is a relative symlink to the active one
  (the bootloader's pointer). The new image goes to the inactive slot, then one rename switches.
- `command`: runs the manifest's argument vector (never a shell); its rollback vector to undo.

Each handler has `prepare()` (what a rollback must return to, recorded in the switch journal
before anything moves: see device_client/switch.py), `install(new_file)` and
`rollback(back_to, old_sha256)`. A rollback is an undo, not a flip: it makes the bytes whose hash
is `old_sha256` active again and does nothing if they already are, so it can run any number of
times (after a power cut during the rollback itself, for one).

Every name the handlers write is taken relative to the target's directory, opened once, and no
link there is followed: a planted link at the staging name is removed, not written through; a
target that is a link (`file`) or a link to anything but its own slot (`ab`) is refused; the
directory must belong to this user or root and be writable by nobody else.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from pathlib import Path
from typing import Protocol

from schemas.errors import EdgeswarmError, ReasonCode
from schemas.models import InstallSpec
from services.runtime.files import CHUNK, sha256_file

__all__ = [
    "ABInstaller", "CommandInstaller", "FileInstaller", "InstallError", "Installer", "UnsafePath",
    "check_install_directory", "installer_for", "sha256_file",
]


class InstallError(EdgeswarmError):
    code = ReasonCode.INSTALL_FAILED


class UnsafePath(InstallError):
    """A path the handler would write through is a link, or a directory others may write to."""

    code = ReasonCode.UNSAFE_PATH


class Installer(Protocol):
    target: Path

    def prepare(self) -> str | None: ...

    def install(self, new_file: Path) -> None: ...

    def rollback(self, back_to: str | None, old_sha256: str) -> None: ...

    def active_sha256(self) -> str | None: ...


def check_install_directory(path: Path) -> None:
    """The directory of an install target must be a directory owned by this user or root, writable by
    no one else: anyone who may create names there could swap a slot under the agent.

    Raises:
        UnsafePath: it is not, or it does not exist.
    """
    try:
        info = os.stat(path)
    except OSError as exc:
        raise UnsafePath(f"install directory {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafePath(f"install directory {path} is not a directory")
    if info.st_uid not in (os.geteuid(), 0):
        raise UnsafePath(f"install directory {path} belongs to uid {info.st_uid}, not to this agent or root")
    if info.st_mode & 0o022:
        raise UnsafePath(f"install directory {path} is writable by group or others (mode {info.st_mode & 0o777:o})")


class _Directory:
    """One directory, opened once; every operation is relative to it and follows no link."""

    def __init__(self, path: Path) -> None:
        check_install_directory(path)
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def __enter__(self) -> _Directory:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)

    def lstat(self, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def is_file(self, name: str) -> bool:
        info = self.lstat(name)
        return info is not None and stat.S_ISREG(info.st_mode)

    def sha256(self, name: str) -> str | None:
        """The hash of a regular file `name`; None if it is missing or anything else."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=self.fd)
        except (FileNotFoundError, OSError):
            return None
        with open(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                return None
            digest = hashlib.sha256()
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    def unlink(self, name: str) -> None:
        try:
            os.unlink(name, dir_fd=self.fd)  # removes a link itself, never what it points to
        except FileNotFoundError:
            pass

    def write_copy(self, name: str, source: Path, mode: int) -> None:
        """`name` as a new regular file holding `source`'s bytes, on disk before this returns."""
        self.unlink(name)
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=self.fd)
        try:
            with open(fd, "wb") as out, open(source, "rb") as src:
                while chunk := src.read(CHUNK):
                    out.write(chunk)
                out.flush()
                os.fchmod(out.fileno(), mode)
                os.fsync(out.fileno())
        except BaseException:
            self.unlink(name)  # a full disk, say: no partial copy left to fill it further
            raise

    def replace(self, source: str, dest: str) -> None:
        os.replace(source, dest, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def link(self, source: str, dest: str) -> None:
        os.link(source, dest, src_dir_fd=self.fd, dst_dir_fd=self.fd, follow_symlinks=False)

    def symlink(self, value: str, name: str) -> None:
        os.symlink(value, name, dir_fd=self.fd)

    def readlink(self, name: str) -> str:
        return os.readlink(name, dir_fd=self.fd)

    def sync(self) -> None:
        os.fsync(self.fd)


_DEFAULT_MODE = 0o644


class FileInstaller:
    def __init__(self, target: Path) -> None:
        self.target = target
        self.name = target.name

    @property
    def previous(self) -> Path:
        return self.target.with_name(self.name + ".previous")

    def _regular_target(self, d: _Directory) -> os.stat_result | None:
        info = d.lstat(self.name)
        if info is not None and not stat.S_ISREG(info.st_mode):
            raise UnsafePath(f"install target {self.target} is not a regular file (a link or a device?): refusing to "
                             "write through it")
        return info

    def prepare(self) -> str | None:
        with _Directory(self.target.parent) as d:
            self._regular_target(d)
        return None  # the old version is kept as `.previous`, whose hash the rollback checks

    def install(self, new_file: Path) -> None:
        """Put `new_file` in place of the target in one rename; keep the old target as `.previous`."""
        staged, previous = f".{self.name}.staged", self.previous.name
        with _Directory(self.target.parent) as d:
            info = self._regular_target(d)
            d.write_copy(staged, new_file, stat.S_IMODE(info.st_mode) if info else _DEFAULT_MODE)
            if info is not None:
                d.unlink(previous)
                d.link(self.name, previous)
            d.replace(staged, self.name)  # the switch: one atomic rename
            d.sync()

    def rollback(self, back_to: str | None, old_sha256: str) -> None:
        with _Directory(self.target.parent) as d:
            if d.sha256(self.name) == old_sha256:
                return  # already back (a second run after a cut, or the switch never happened)
            if d.sha256(self.previous.name) != old_sha256:
                raise InstallError(f"no previous version of {self.target} to roll back to: {self.previous.name} "
                                   "is missing or holds other bytes")
            d.replace(self.previous.name, self.name)
            d.sync()

    def active_sha256(self) -> str | None:
        with _Directory(self.target.parent) as d:
            return d.sha256(self.name)


class ABInstaller:
    def __init__(self, target: Path) -> None:
        self.target = target
        self.name = target.name

    def slot(self, name: str) -> Path:
        return self.target.with_name(self._slot(name))

    def _slot(self, name: str) -> str:
        return f"{self.name}.slot-{name}"

    def active(self) -> str | None:
        """The active slot ("a" or "b"), or None while the target is still a plain file."""
        with _Directory(self.target.parent) as d:
            return self._active(d)

    def _active(self, d: _Directory) -> str | None:
        info = d.lstat(self.name)
        if info is None:
            # A device that lost its pointer (an older agent cut while adopting the running file):
            # the slot holding the adopted file is what ran.
            if d.is_file(self._slot("a")):
                self._point_to(d, "a")
                return "a"
            raise InstallError(f"install target {self.target} is missing and has no slots")
        if stat.S_ISREG(info.st_mode):
            return None
        if not stat.S_ISLNK(info.st_mode):
            raise UnsafePath(f"install target {self.target} is neither a file nor a link to one of its slots")
        value = d.readlink(self.name)
        for slot in ("a", "b"):
            if value == self._slot(slot):
                if not d.is_file(value):
                    raise UnsafePath(f"slot {value} of {self.target} is not a regular file")
                return slot
        raise UnsafePath(f"install target {self.target} links to {value!r}, not to one of its slots")

    def _adopt(self, d: _Directory) -> str:
        """A device provisioned with a plain file: that file becomes slot a. Every step leaves the
        target in place with the same bytes (a second name for the file, then the link replaces
        the plain name in one rename), so a cut anywhere needs no journal and the next run repeats it."""
        d.unlink(self._slot("a"))
        d.link(self.name, self._slot("a"))
        d.sync()
        self._point_to(d, "a")
        return "a"

    def _point_to(self, d: _Directory, slot: str) -> None:
        link = f".{self.name}.link"
        d.unlink(link)
        d.symlink(self._slot(slot), link)
        d.replace(link, self.name)  # the switch itself: one atomic rename
        d.sync()

    def prepare(self) -> str | None:
        """The slot active now (adopting a plain target first): where a rollback returns to."""
        with _Directory(self.target.parent) as d:
            return self._active(d) or self._adopt(d)

    def install(self, new_file: Path) -> None:
        with _Directory(self.target.parent) as d:
            active = self._active(d) or self._adopt(d)
            inactive = "b" if active == "a" else "a"
            staged = f".{self._slot(inactive)}.staged"
            mode = d.lstat(self._slot(active))
            d.write_copy(staged, new_file, stat.S_IMODE(mode.st_mode) if mode else _DEFAULT_MODE)
            d.replace(staged, self._slot(inactive))
            d.sync()
            self._point_to(d, inactive)

    def rollback(self, back_to: str | None, old_sha256: str) -> None:
        """Point back at the slot recorded before the switch, or (with none recorded) at the slot
        holding `old_sha256`; never simply at "the other one"."""
        with _Directory(self.target.parent) as d:
            active = self._active(d)
            if active is None:
                if d.sha256(self.name) == old_sha256:
                    return  # never adopted: the plain file is the old version
                raise InstallError(f"install target {self.target} is a plain file that does not hold the old version")
            candidates = [back_to] if back_to in ("a", "b") else []
            candidates += [s for s in ("a", "b") if s not in candidates]
            for slot in candidates:
                if d.sha256(self._slot(slot)) == old_sha256:
                    if slot != active:
                        self._point_to(d, slot)
                    return
            raise InstallError(f"no slot of {self.target} holds the old version to roll back to")

    def active_sha256(self) -> str | None:
        with _Directory(self.target.parent) as d:
            active = self._active(d)
            return d.sha256(self.name if active is None else self._slot(active))


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

    def prepare(self) -> str | None:
        return None

    def install(self, new_file: Path) -> None:
        self.artifact = new_file
        assert self.spec.command is not None
        self._run(self.spec.command, "install command")

    def rollback(self, back_to: str | None, old_sha256: str) -> None:
        """Runs the rollback vector, which must be safe to run more than once and after an install
        that did not run or ran only in part (the agent runs it again after a cut)."""
        if self.spec.rollback is not None:
            self._run(self.spec.rollback, "rollback command")

    def active_sha256(self) -> str | None:
        try:
            return sha256_file(self.target) if self.target.is_file() else None
        except OSError:
            return None


def installer_for(spec: InstallSpec, target: Path, *, command_timeout: float = 600.0) -> Installer:
    if spec.handler == "ab":
        return ABInstaller(target)
    if spec.handler == "command":
        return CommandInstaller(target, spec, command_timeout)
    return FileInstaller(target)
