"""Signed documents for unit tests of the trust rules: real keys, real signatures, no I/O."""

from __future__ import annotations

import hashlib

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from schemas.models import (
    Artifact, Delta, InstallSpec, PayloadType, ReleaseManifest, ReleasePointer, Role, RoleKeys, RootMetadata,
    TimestampMetadata,
)
from services.runtime.keys import SigningKey, sign_envelope
from services.runtime.trust import decode_envelope, payload_bytes

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
TARGET = "/opt/edgeswarm/firmware.img"
SHA_V1 = "1" * 64
SHA_V2 = "2" * 64


@dataclass
class Keyring:
    root: list[SigningKey] = field(default_factory=lambda: [SigningKey.generate("root") for _ in range(3)])
    release: list[SigningKey] = field(default_factory=lambda: [SigningKey.generate("release") for _ in range(3)])
    timestamp: list[SigningKey] = field(default_factory=lambda: [SigningKey.generate("timestamp")])

    def root_metadata(self, *, version: int = 1, fleet: str = "f1", root_threshold: int = 2,
                      release_threshold: int = 2, expires: datetime | None = None) -> RootMetadata:
        roles = {Role.ROOT: self.root, Role.RELEASE: self.release, Role.TIMESTAMP: self.timestamp}
        thresholds = {Role.ROOT: root_threshold, Role.RELEASE: release_threshold, Role.TIMESTAMP: 1}
        return RootMetadata(
            fleet=fleet, version=version, expires=expires or NOW + timedelta(days=365),
            keys={k.keyid: k.public_key() for ks in roles.values() for k in ks},
            roles={r: RoleKeys(keyids=[k.keyid for k in ks], threshold=thresholds[r]) for r, ks in roles.items()},
        )


def sign_root(root: RootMetadata, signers: list[SigningKey]) -> bytes:
    return sign_envelope(PayloadType.ROOT, root.canonical_bytes(), signers).canonical_bytes()


def manifest(**changes: object) -> ReleaseManifest:
    base = ReleaseManifest(
        fleet="f1", device_class="ipc", version="2.0.0", sequence=2, issued=NOW - timedelta(hours=1),
        expires=NOW + timedelta(days=30),
        artifact=Artifact(cid="Qm" + "a" * 44, sha256=SHA_V2, size=1000),
        deltas={SHA_V1: Delta(cid="Qm" + "b" * 44, sha256="3" * 64, size=100, base_version="1.0.0")},
        install=InstallSpec(target=TARGET),
    )
    return base.model_copy(update=changes)


def sign_release(m: ReleaseManifest, signers: list[SigningKey]) -> bytes:
    return sign_envelope(PayloadType.RELEASE, m.canonical_bytes(), signers).canonical_bytes()


def timestamp(
    keys: Keyring, releases: dict[str, tuple[int, bytes]], *, version: int = 1, fleet: str = "f1",
    root_version: int = 1, expires: datetime | None = None,
) -> TimestampMetadata:
    """A timestamp naming, per class, (sequence, signed release envelope)."""
    pointers = {
        cls: ReleasePointer(sequence=seq, sha256=hashlib.sha256(payload_bytes(decode_envelope(env))).hexdigest())
        for cls, (seq, env) in releases.items()
    }
    return TimestampMetadata(fleet=fleet, version=version, expires=expires or NOW + timedelta(hours=4),
                             root_version=root_version, releases=pointers)


def sign_timestamp(ts: TimestampMetadata, signers: list[SigningKey]) -> bytes:
    return sign_envelope(PayloadType.TIMESTAMP, ts.canonical_bytes(), signers).canonical_bytes()
