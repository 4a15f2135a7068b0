"""The trust rules: which signed documents a device accepts. Pure: no I/O, no clock reads.

Like python-tuf's TrustedMetadataSet, `TrustedSet` holds what a device currently trusts (its root)
and has one method per kind of document. Each takes raw bytes received from an untrusted channel
plus the reference time `now` from the caller, and either returns the accepted document or raises
a `TrustError` subclass naming the attack. Every refusal carries `code`, the machine-readable
reason a device reports on its state topic.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import datetime

import pydantic
from packaging.version import Version

from schemas.canonical import MalformedDocument, canonical_json, strict_loads
from schemas.models import PayloadType, ReleaseManifest, Role, RootMetadata, SignedEnvelope
from services.keys import verify_signature

DEFAULT_MAX_DOCUMENT_BYTES = 64 * 1024


class TrustError(Exception):
    code = "untrusted"


class MalformedMetadata(TrustError):
    code = "malformed"


class WrongType(TrustError):
    code = "wrong_type"


class UnsignedMetadata(TrustError):
    """Not enough valid signatures from the keys of the role."""

    code = "threshold_not_met"


class BadSignature(UnsignedMetadata):
    code = "bad_signature"


class UnknownKey(UnsignedMetadata):
    code = "unknown_key"


class ThresholdNotMet(UnsignedMetadata):
    code = "threshold_not_met"


class WrongFleet(TrustError):
    code = "wrong_fleet"


class WrongClass(TrustError):
    code = "wrong_class"


class WrongTarget(TrustError):
    code = "wrong_target"


class Rollback(TrustError):
    code = "rollback"


class RootChainGap(TrustError):
    code = "root_chain_gap"


class Expired(TrustError):
    code = "expired"


def decode_envelope(raw: bytes, *, max_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES) -> SignedEnvelope:
    try:
        return SignedEnvelope.from_bytes(raw, max_bytes=max_bytes)
    except MalformedDocument as exc:
        raise MalformedMetadata(str(exc)) from None
    except pydantic.ValidationError as exc:
        raise MalformedMetadata(f"not a signed envelope: {_first_error(exc)}") from None


def _first_error(exc: pydantic.ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "document"
    return f"{where}: {err['msg']}"


def _payload_bytes(envelope: SignedEnvelope) -> bytes:
    try:
        return base64.b64decode(envelope.payload, validate=True)
    except binascii.Error:
        raise MalformedMetadata("payload is not valid base64") from None


def verify_role(envelope: SignedEnvelope, root: RootMetadata, role: Role) -> bytes:
    """Return the payload when at least `threshold` distinct keys of `role` signed it."""
    payload = _payload_bytes(envelope)
    spec = root.roles.get(role)
    if spec is None:
        raise ThresholdNotMet(f"root v{root.version} names no keys for role {role.value}")
    role_keys = set(spec.keyids)
    valid: set[str] = set()
    bad: set[str] = set()
    unknown: set[str] = set()
    for signature in envelope.signatures:
        if signature.keyid not in role_keys or signature.keyid not in root.keys:
            unknown.add(signature.keyid)
        elif verify_signature(root.keys[signature.keyid], signature, envelope.payload_type.value, payload):
            valid.add(signature.keyid)  # a set: the same key signing twice counts once
        else:
            bad.add(signature.keyid)
    if len(valid) >= spec.threshold:
        return payload
    summary = f"{len(valid)} valid signature(s) of role {role.value}, threshold {spec.threshold}"
    if bad:
        raise BadSignature(f"invalid signature from key {sorted(bad)[0][:12]}: {summary}")
    if unknown and not valid:
        raise UnknownKey(f"signed by key {sorted(unknown)[0][:12]} not trusted for {role.value}: {summary}")
    raise ThresholdNotMet(summary)


def _parse_payload(payload: bytes, model: type[pydantic.BaseModel], max_bytes: int) -> pydantic.BaseModel:
    try:
        obj = strict_loads(payload, max_bytes=max_bytes)
    except MalformedDocument as exc:
        raise MalformedMetadata(str(exc)) from None
    if canonical_json(obj) != payload:
        raise MalformedMetadata("signed payload is not canonical JSON")
    try:
        return model.model_validate_json(payload)
    except pydantic.ValidationError as exc:
        raise MalformedMetadata(f"invalid {model.__name__}: {_first_error(exc)}") from None


def _expect_type(envelope: SignedEnvelope, payload_type: PayloadType) -> None:
    if envelope.payload_type != payload_type:
        raise WrongType(f"expected {payload_type.value}, got {envelope.payload_type.value}")


@dataclass(frozen=True)
class DeviceRecord:
    """What the device currently runs, as the trust rules need it."""

    installed_version: str
    installed_sha256: str
    last_sequence: int


class TrustedSet:
    """The metadata a device trusts for one fleet and device class."""

    def __init__(
        self,
        root: RootMetadata,
        *,
        device_class: str,
        install_target: str,
        max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES,
    ) -> None:
        self.root = root
        self.device_class = device_class
        self.install_target = install_target
        self.max_document_bytes = max_document_bytes

    @staticmethod
    def load_initial_root(raw: bytes, *, max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES) -> RootMetadata:
        """Verify a provisioned root against itself (its own root role, its own threshold)."""
        envelope = decode_envelope(raw, max_bytes=max_document_bytes)
        _expect_type(envelope, PayloadType.ROOT)
        payload = _payload_bytes(envelope)
        root = _parse_payload(payload, RootMetadata, max_document_bytes)
        assert isinstance(root, RootMetadata)
        verify_role(envelope, root, Role.ROOT)
        return root

    def update_root(self, raw: bytes) -> RootMetadata:
        """Accept root N+1 signed by a threshold of root N's root keys and of its own."""
        envelope = decode_envelope(raw, max_bytes=self.max_document_bytes)
        _expect_type(envelope, PayloadType.ROOT)
        payload = verify_role(envelope, self.root, Role.ROOT)
        new = _parse_payload(payload, RootMetadata, self.max_document_bytes)
        assert isinstance(new, RootMetadata)
        verify_role(envelope, new, Role.ROOT)
        if new.fleet != self.root.fleet:
            raise WrongFleet(f"root for fleet {new.fleet!r}, this device trusts {self.root.fleet!r}")
        if new.version <= self.root.version:
            raise Rollback(f"root v{new.version} is not newer than trusted v{self.root.version}")
        if new.version != self.root.version + 1:
            raise RootChainGap(f"root v{new.version} skips versions after trusted v{self.root.version}")
        self.root = new
        return new

    def verify_release(self, raw: bytes, current: DeviceRecord, now: datetime) -> ReleaseManifest:
        envelope = decode_envelope(raw, max_bytes=self.max_document_bytes)
        _expect_type(envelope, PayloadType.RELEASE)
        if self.root.expires <= now:
            raise Expired(f"trusted root v{self.root.version} expired at {self.root.expires.isoformat()}")
        payload = verify_role(envelope, self.root, Role.RELEASE)
        manifest = _parse_payload(payload, ReleaseManifest, self.max_document_bytes)
        assert isinstance(manifest, ReleaseManifest)
        if manifest.fleet != self.root.fleet:
            raise WrongFleet(f"manifest for fleet {manifest.fleet!r}, device is in {self.root.fleet!r}")
        if manifest.device_class != self.device_class:
            raise WrongClass(f"manifest for class {manifest.device_class!r}, device is {self.device_class!r}")
        if manifest.install.target != self.install_target:
            raise WrongTarget(f"manifest installs to {manifest.install.target}, device to {self.install_target}")
        if manifest.expires <= now:
            raise Expired(f"manifest sequence {manifest.sequence} expired at {manifest.expires.isoformat()}")
        same_content = manifest.artifact.sha256 == current.installed_sha256
        if manifest.sequence < current.last_sequence or (
            manifest.sequence == current.last_sequence and not same_content
        ):
            raise Rollback(f"sequence {manifest.sequence} is not newer than applied {current.last_sequence}")
        if not same_content and Version(manifest.version) < Version(current.installed_version):
            raise Rollback(f"version {manifest.version} is older than installed {current.installed_version}")
        return manifest
