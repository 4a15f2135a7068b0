"""Pre-shared keys for a private IPFS swarm (Kubo pnet)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

__all__ = ["generate_swarm_key", "load_swarm_key"]


def generate_swarm_key(path: Path) -> None:
    """A 256-bit pre-shared key for a private IPFS swarm, written 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(32) + "\n")


def load_swarm_key(path: Path) -> str:
    """The hex key from a file written by `generate_swarm_key` or a Kubo `swarm.key` file."""
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    key = lines[-1].lower() if lines else ""
    if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
        raise ValueError(f"{path} does not hold a 256-bit hex swarm key")
    return key
