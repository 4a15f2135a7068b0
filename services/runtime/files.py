"""Durable file writes: write, fsync, rename, fsync the directory. A power cut leaves old or new, never half."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

CHUNK = 1024 * 1024


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data`. Neither the temporary name nor `path` is followed if it is a link:
    the temporary file is created new (a planted link there is removed first) and the rename replaces
    whatever `path` was, so a link can never redirect the write to another file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    with open(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_capped(path: Path, max_bytes: int) -> bytes:
    """A small file's bytes. Raises ValueError if it holds more than `max_bytes` (a damaged or planted
    file is not read into memory whole); OSError as reading does."""
    with open(path, "rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{path} holds more than {max_bytes} bytes")
    return data


def set_aside(path: Path) -> Path:
    """Move a damaged file out of the way, kept for a person to read: `<name>.damaged`."""
    aside = path.with_name(path.name + ".damaged")
    os.replace(path, aside)
    return aside


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
