"""The trust rules: which signed documents a device accepts. Pure: no I/O, no clock reads.

Like python-tuf's TrustedMetadataSet, `TrustedSet` holds what a device currently trusts (its
root, its latest timestamp) and has one method per kind of document. Each takes raw bytes from
an untrusted channel plus the reference time `now` from the caller, and either returns the
accepted document or raises a `TrustError` subclass naming the attack. Every refusal carries
`code`, the machine-readable reason a device reports on its state topic.

Order of checks for every document: size and grammar, envelope, payload type, signatures by a
threshold of the role's keys (over the exact bytes), then the document's own fields. Nothing is
parsed as a document before its signatures have been checked.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeVar

import pydantic
from packaging.version import Version

from schemas.canonical import MalformedDocument, canonical_json, strict_loads
from schemas.errors import EdgeswarmError, ReasonCode
from schemas.models import (
    PayloadType,
    ReleaseManifest,
    Role,
    RootMetadata,
    SignedEnvelope,
    TimestampMetadata,
    WireModel,
)
from services.runtime.keys import verify_signature

DEFAULT_MAX_DOCUMENT_BYTES = 64 * 1024


class TrustError(EdgeswarmError):
    code = ReasonCode.UNTRUSTED


class MalformedMetadata(TrustError):
    code = ReasonCode.MALFORMED


class WrongType(TrustError):
    code = ReasonCode.WRONG_TYPE


class UnsignedMetadata(TrustError):
    """Not enough valid signatures from the keys of the role."""

    code = ReasonCode.THRESHOLD_NOT_MET


class BadSignature(UnsignedMetadata):
    code = ReasonCode.BAD_SIGNATURE


class UnknownKey(UnsignedMetadata):
    code = ReasonCode.UNKNOWN_KEY


class ThresholdNotMet(UnsignedMetadata):
    code = ReasonCode.THRESHOLD_NOT_MET


class WrongFleet(TrustError):
    code = ReasonCode.WRONG_FLEET


class WrongClass(TrustError):
    code = ReasonCode.WRONG_CLASS


class WrongTarget(TrustError):
    code = ReasonCode.WRONG_TARGET


class Rollback(TrustError):
    code = ReasonCode.ROLLBACK


class RootChainGap(TrustError):
    code = ReasonCode.ROOT_CHAIN_GAP


class RootOutdated(TrustError):
    """A timestamp made under a newer root than the device has walked to: update the root first."""

    code = ReasonCode.ROOT_OUTDATED


class Expired(TrustError):
    code = ReasonCode.EXPIRED


class FreezeDetected(TrustError):
    """No fresh timestamp vouches for anything: the device may be held on old metadata."""

    code = ReasonCode.FROZEN


class TimestampMismatch(TrustError):
    """The release is validly signed but is not the one the current timestamp names."""

    code = ReasonCode.TIMESTAMP_MISMATCH


# -- envelopes and signatures ---------------------------------------------------------------------


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


def payload_bytes(envelope: SignedEnvelope) -> bytes:
    try:
        payload = base64.b64decode(envelope.payload, validate=True)
    except binascii.Error:
        raise MalformedMetadata("payload is not valid base64") from None
    # Unused low bits of the last base64 character would let one payload have many encodings.
    if base64.b64encode(payload).decode() != envelope.payload:
        raise MalformedMetadata("payload is not canonical base64")
    return payload


def payload_digest(envelope: SignedEnvelope) -> str:
    return hashlib.sha256(payload_bytes(envelope)).hexdigest()


def verify_role(envelope: SignedEnvelope, root: RootMetadata, role: Role) -> bytes:
    """Return the payload when at least `threshold` distinct keys of `role` signed it."""
    payload = payload_bytes(envelope)
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


M = TypeVar("M", bound=WireModel)


def _parse_payload(payload: bytes, model: type[M], max_bytes: int) -> M:
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


def _open(raw: bytes, payload_type: PayloadType, max_bytes: int) -> SignedEnvelope:
    envelope = decode_envelope(raw, max_bytes=max_bytes)
    if envelope.payload_type != payload_type:
        raise WrongType(f"expected {payload_type.value}, got {envelope.payload_type.value}")
    return envelope


def _names(timestamp: TimestampMetadata, device_class: str, sequence: int, payload: bytes) -> bool:
    pointer = timestamp.releases.get(device_class)
    return pointer is not None and pointer.sequence == sequence and pointer.sha256 == hashlib.sha256(payload).hexdigest()


def next_root(current: RootMetadata, raw: bytes, *, max_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES) -> RootUpdate:
    """Root N+1, signed by a threshold of root N's root keys and of its own (see `TrustedSet.update_root`)."""
    envelope = _open(raw, PayloadType.ROOT, max_bytes)
    payload = verify_role(envelope, current, Role.ROOT)
    new = _parse_payload(payload, RootMetadata, max_bytes)
    try:
        verify_role(envelope, new, Role.ROOT)
    except UnsignedMetadata as exc:
        # Old keys alone cannot hand the fleet to keys that never proved they exist.
        raise ThresholdNotMet(f"root v{new.version} is not signed by a threshold of its own root keys ({exc})") from None
    if new.fleet != current.fleet:
        raise WrongFleet(f"root for fleet {new.fleet!r}, this device trusts {current.fleet!r}")
    if new.version <= current.version:
        raise Rollback(f"root v{new.version} is not newer than trusted v{current.version}")
    if new.version != current.version + 1:
        raise RootChainGap(f"root v{new.version} skips versions after trusted v{current.version}")
    revoked = frozenset(
        role for role, spec in current.roles.items()
        if role in new.roles and not set(spec.keyids) <= set(new.roles[role].keyids)
    )
    return RootUpdate(new, revoked)


class RootsAhead:
    """Signed roots heard for versions above the trusted one, held until the chain reaches them.

    Bounded in count (each is size-capped by its reader): past `limit`, the highest versions go,
    since the lowest are needed next and a flood of far-ahead versions must not evict them.
    """

    def __init__(self, limit: int = 8) -> None:
        self.limit = limit
        self._held: dict[int, bytes] = {}

    def __len__(self) -> int:
        return len(self._held)

    def lowest(self) -> int | None:
        return min(self._held, default=None)

    def add(self, version: int, raw: bytes, trusted: int) -> bool:
        """Hold root `version` (False, nothing held: not above the trusted version)."""
        if version <= trusted:
            return False
        self._held[version] = raw
        while len(self._held) > self.limit:
            del self._held[max(self._held)]
        return True

    def take_next(self, trusted: int) -> bytes | None:
        """The held root for version `trusted + 1`, removed from the buffer; None if it has not come."""
        return self._held.pop(trusted + 1, None)

    def has_next(self, trusted: int) -> bool:
        return trusted + 1 in self._held


def open_release(root: RootMetadata, raw: bytes, now: datetime, *,
                 max_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES) -> tuple[ReleaseManifest, bytes]:
    """A release manifest signed by a threshold of `root`'s release keys, for `root`'s fleet, unexpired
    (with its payload bytes). The checks every reader of a release makes: a device adds its class,
    target, floors and the timestamp (`TrustedSet.verify_release`); the fleet service records only
    what passes these.

    Raises:
        MalformedMetadata, WrongType: not a signed release document.
        Expired: the root or the manifest expired.
        UnsignedMetadata: below the release role's threshold.
        WrongFleet: a manifest for another fleet.
    """
    envelope = _open(raw, PayloadType.RELEASE, max_bytes)
    if root.expires <= now:
        raise Expired(f"trusted root v{root.version} expired at {root.expires.isoformat()}")
    payload = verify_role(envelope, root, Role.RELEASE)
    manifest = _parse_payload(payload, ReleaseManifest, max_bytes)
    if manifest.fleet != root.fleet:
        raise WrongFleet(f"manifest for fleet {manifest.fleet!r}, device is in {root.fleet!r}")
    if manifest.expires <= now:
        raise Expired(f"manifest sequence {manifest.sequence} expired at {manifest.expires.isoformat()}")
    return manifest, payload


# -- the trusted set ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceRecord:
    """What the device currently runs, as the trust rules need it."""

    installed_version: str
    installed_sha256: str
    last_sequence: int


@dataclass(frozen=True)
class RootUpdate:
    """An accepted root, and the roles from which it removed keys.

    Removing keys of a role is how a compromise is recovered from. Version floors the removed
    keys may have pushed up (fast-forward attack) are then dropped: old documents signed by the
    remaining keys are still refused, by expiry (timestamps) or by the timestamp's pointer
    (releases).
    """

    root: RootMetadata
    revoked_roles: frozenset[Role] = field(default_factory=frozenset)


class TrustedSet:
    """The metadata a device trusts for one fleet and device class."""

    def __init__(
        self,
        root: RootMetadata,
        *,
        device_class: str,
        install_target: str,
        timestamp_floor: int = 0,
        max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES,
    ) -> None:
        self.root = root
        self.device_class = device_class
        self.install_target = install_target
        self.timestamp: TimestampMetadata | None = None
        self.timestamp_floor = timestamp_floor
        self.max_document_bytes = max_document_bytes

    @staticmethod
    def load_initial_root(raw: bytes, *, max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES) -> RootMetadata:
        """Verify a provisioned root against itself (its own root role, its own threshold).

        Raises:
            MalformedMetadata, WrongType: not a signed root document.
            UnsignedMetadata: fewer valid signatures of its own root keys than its threshold.
        """
        envelope = _open(raw, PayloadType.ROOT, max_document_bytes)
        root = _parse_payload(payload_bytes(envelope), RootMetadata, max_document_bytes)
        verify_role(envelope, root, Role.ROOT)
        return root

    # -- root -----------------------------------------------------------------------------------

    def update_root(self, raw: bytes) -> RootUpdate:
        """Accept root N+1 signed by a threshold of root N's root keys and of its own.

        Raises:
            MalformedMetadata, WrongType, WrongFleet: not a root of this fleet.
            RootChainGap, Rollback: not version N+1.
            UnsignedMetadata: below either threshold (BadSignature, UnknownKey, ThresholdNotMet).
        """
        update = next_root(self.root, raw, max_bytes=self.max_document_bytes)
        self.root = update.root
        if Role.TIMESTAMP in update.revoked_roles:
            self.timestamp = None
            self.timestamp_floor = 0
        return update

    # -- timestamp -------------------------------------------------------------------------------

    def update_timestamp(self, raw: bytes, now: datetime) -> TimestampMetadata:
        """Trust a newer timestamp signed by the timestamp role; it becomes the floor.

        Raises:
            MalformedMetadata, WrongType, WrongFleet, UnsignedMetadata: not a valid timestamp of this fleet.
            Rollback: older than the floor, or made under an older root.
            Expired: already expired at `now`.
            RootOutdated: made under a newer root: walk the root chain first, then try again.
        """
        envelope = _open(raw, PayloadType.TIMESTAMP, self.max_document_bytes)
        payload = verify_role(envelope, self.root, Role.TIMESTAMP)
        new = _parse_payload(payload, TimestampMetadata, self.max_document_bytes)
        if new.fleet != self.root.fleet:
            raise WrongFleet(f"timestamp for fleet {new.fleet!r}, device is in {self.root.fleet!r}")
        current = self.timestamp
        if new.version < self.timestamp_floor or (
            current is not None and new.version == current.version and new != current
        ):
            raise Rollback(f"timestamp v{new.version} is older than trusted v{self.timestamp_floor}")
        if new.expires <= now:
            raise Expired(f"timestamp v{new.version} expired at {new.expires.isoformat()}")
        if new.root_version > self.root.version:
            raise RootOutdated(f"timestamp v{new.version} was made under root v{new.root_version}, device trusts v{self.root.version}")
        if new.root_version < self.root.version:
            raise Rollback(f"timestamp v{new.version} predates trusted root v{self.root.version}")
        self.timestamp = new
        self.timestamp_floor = new.version
        return new

    def check_fresh(self, now: datetime) -> TimestampMetadata:
        """The trusted timestamp, if it is still fresh at `now`.

        Raises:
            FreezeDetected: none is trusted, or it expired (the device may be held on old metadata).
        """
        if self.timestamp is None:
            raise FreezeDetected("no timestamp is trusted yet: waiting for a fresh one")
        if self.timestamp.expires <= now:
            raise FreezeDetected(f"timestamp v{self.timestamp.version} expired at {self.timestamp.expires.isoformat()}")
        return self.timestamp

    # -- releases -------------------------------------------------------------------------------

    def verify_release(self, raw: bytes, current: DeviceRecord, now: datetime) -> ReleaseManifest:
        """The release manifest in `raw`, if this device may install it now.

        Raises:
            MalformedMetadata, WrongType: not a signed release document.
            Expired: the trusted root or the manifest expired.
            UnsignedMetadata: below the release role's threshold.
            WrongFleet, WrongClass, WrongTarget: a manifest for another fleet, class or install target.
            Rollback: an older sequence, or a lower version, than `current`.
            FreezeDetected, TimestampMismatch: no fresh timestamp names this release.
        """
        manifest, payload = open_release(self.root, raw, now, max_bytes=self.max_document_bytes)
        if manifest.device_class != self.device_class:
            raise WrongClass(f"manifest for class {manifest.device_class!r}, device is {self.device_class!r}")
        if manifest.install.target != self.install_target:
            raise WrongTarget(f"manifest installs to {manifest.install.target}, device to {self.install_target}")
        same_content = manifest.artifact.installed_sha256 == current.installed_sha256
        if manifest.sequence < current.last_sequence or (
            manifest.sequence == current.last_sequence and not same_content
        ):
            raise Rollback(f"sequence {manifest.sequence} is not newer than applied {current.last_sequence}")
        if same_content:
            return manifest  # what the device already runs: nothing will be installed, freshness cannot matter
        if Version(manifest.version) < Version(current.installed_version):
            raise Rollback(f"version {manifest.version} is older than installed {current.installed_version}")
        timestamp = self.check_fresh(now)
        if not _names(timestamp, self.device_class, manifest.sequence, payload):
            pointer = timestamp.releases.get(self.device_class)
            named = f"sequence {pointer.sequence}" if pointer else "no release"
            raise TimestampMismatch(
                f"timestamp v{timestamp.version} names {named} for {self.device_class}, not this sequence {manifest.sequence}"
            )
        return manifest

    def vouches_for(self, manifest: ReleaseManifest, raw: bytes, now: datetime) -> bool:
        """Does a fresh trusted timestamp name this release (its sequence and payload hash)?

        `verify_release` accepts the release of what is already installed without one (nothing will
        be installed); such a release alone must not move the device's floors, since the release
        role alone could then push the sequence floor out of reach of every later release.
        """
        try:
            timestamp = self.check_fresh(now)
            payload = payload_bytes(decode_envelope(raw, max_bytes=self.max_document_bytes))
        except TrustError:
            return False
        return _names(timestamp, manifest.device_class, manifest.sequence, payload)


# -- staged rollouts ------------------------------------------------------------------------------

BUCKETS = 10_000


def rollout_bucket(salt: str, device: str) -> int:
    """A device's place (0-9999) in every rollout of a release: the same on the device and the service.

    A new salt per release reshuffles who goes first, so the same devices are not always the canaries.
    """
    digest = hashlib.sha256(f"edgeswarm-rollout:{salt}:{device}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


@dataclass(frozen=True)
class Admission:
    """An install command: admits exactly the release it names, by sequence and signed payload hash, so
    that an admission of a forged (or another) release with the same sequence admits nothing."""

    sequence: int
    release_sha256: str


def rollout_admits(manifest: ReleaseManifest, payload_sha256: str, device: str, admission: Admission | None) -> bool:
    """May `device` install this verified release (whose signed payload hashes to `payload_sha256`)
    now? By the signed canary rule, or an install command naming this release."""
    rule = manifest.rollout
    if rule is None:
        return True
    if rollout_bucket(rule.salt, device) < rule.canary_percent * (BUCKETS // 100):
        return True
    return admission == Admission(manifest.sequence, payload_sha256)
