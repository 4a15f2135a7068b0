"""The fleet's register of device identity keys: which Ed25519 key signs each device's reports.

A device's key pair is made when it is provisioned (`edgeswarm device config`); the private half
goes into its bundle, the public half is registered here, one file per device
(<home>/identities/<device>.pub, the key as JSON). The fleet service reads it to accept reports
that peers carry (services.operator.report_trust); a key is never learned from the broker or
from a report, so a relay cannot introduce one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pydantic

from schemas import topics
from schemas.canonical import MalformedDocument
from schemas.errors import EdgeswarmError
from schemas.models import PublicKey
from services.runtime.files import atomic_write
from services.runtime.keys import SigningKey

__all__ = ["DeviceIdentities", "IdentityConflict", "provision_identity"]

MAX_KEY_FILE_BYTES = 1024


class IdentityConflict(EdgeswarmError):
    """The device has another key registered already (re-provisioning must say so: --new-identity)."""


@dataclass
class _Cached:
    stamp: tuple[int, int]
    key: PublicKey | None


class DeviceIdentities:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._cache: dict[str, _Cached] = {}

    def path(self, device: str) -> Path:
        return self.directory / f"{topics.check_identifier(device, 'device')}.pub"

    def register(self, device: str, key: PublicKey, *, replace: bool = False) -> Path:
        """Register `key` as the one that signs `device`'s reports.

        Raises:
            IdentityConflict: another key is registered for the device and `replace` is False.
        """
        path = self.path(device)
        current = self.public_key(device)
        if current is not None and current != key and not replace:
            raise IdentityConflict(f"{device} has another identity key registered ({path}); replacing it makes "
                                   "reports signed by the old key unacceptable")
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write(path, key.canonical_bytes() + b"\n")
        return path

    def public_key(self, device: str) -> PublicKey | None:
        """The key registered for `device`; None when none is, or its file is unreadable (said in the log
        by the caller's refusal: an unreadable key accepts nothing). Re-read when the file changes."""
        path = self.path(device)
        try:
            info = os.stat(path)
        except OSError:
            self._cache.pop(device, None)
            return None
        stamp = (info.st_mtime_ns, info.st_size)
        cached = self._cache.get(device)
        if cached is not None and cached.stamp == stamp:
            return cached.key
        try:
            key: PublicKey | None = PublicKey.from_bytes(path.read_bytes(), max_bytes=MAX_KEY_FILE_BYTES)
        except (OSError, MalformedDocument, pydantic.ValidationError):
            key = None
        if len(self._cache) >= 100_000:
            self._cache.clear()
        self._cache[device] = _Cached(stamp, key)
        return key


def provision_identity(key_file: Path, device: str, identities: DeviceIdentities, *, replace: bool = False) -> SigningKey:
    """The device's identity key at `key_file` (made there, 0600, unless one is there already: a bundle
    written again keeps its key), registered for `device`.

    Raises:
        IdentityConflict: another key is registered for the device and `replace` is False.
        ValueError: `key_file` exists but holds no key.
    """
    if key_file.exists():
        try:
            key = SigningKey.load(key_file)
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"{key_file} exists but is not an identity key ({exc}): move it away first") from None
    else:
        key = SigningKey.generate("device")
        key_file.parent.mkdir(parents=True, exist_ok=True)
        key.save(key_file)
    identities.register(device, key.public_key(), replace=replace)
    return key
