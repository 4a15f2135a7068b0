"""Pydantic models of every message on the wire.

All models are frozen and refuse unknown fields. Signed documents (root, release manifest) travel
inside a `SignedEnvelope` whose payload is the canonical JSON of the document: signatures are
checked over those exact bytes before the payload is parsed.
"""

from __future__ import annotations

import enum
import functools
from typing import Annotated, Literal

from packaging.version import InvalidVersion, Version
from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints, model_validator

from typing import Self

from schemas.canonical import canonical_json, strict_loads
from schemas.roles import Role  # noqa: F401 - part of this module's public names

MAX_REPORT_BYTES = 4096  # a device report is well under 2 KB; one carried by a peer is capped before parsing
MAX_SIZE = 2**40  # 1 TiB: no artifact is bigger; keeps sizes far from integer overflow anywhere

Identifier = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
KeyId = Sha256Hex
Cid = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9]{32,128}$")]
SignatureHex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{128}$")]
PublicKeyHex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Sequence = Annotated[int, Field(ge=1, le=2**53)]


@functools.lru_cache(maxsize=1024)
def _valid_version(value: str) -> bool:
    # A fleet runs a handful of versions and every report names one or two: the fleet service
    # parsed the same few strings 100,000 times (7 us each, measured in fleet_record_bench).
    try:
        Version(value)
    except InvalidVersion:
        return False
    return True


def _check_version(value: str) -> str:
    if not _valid_version(value):
        raise ValueError(f"{value!r} is not a valid version (PEP 440, e.g. 2.1.0)")
    return value


VersionStr = Annotated[
    str, StringConstraints(min_length=1, max_length=64), AfterValidator(_check_version)
]
TargetPath = Annotated[str, StringConstraints(min_length=1, max_length=4096, pattern=r"^/[^\x00]*$")]
ShortText = Annotated[str, StringConstraints(max_length=1024)]


class WireModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    def canonical_bytes(self) -> bytes:
        return canonical_json(self.model_dump(mode="json", exclude_none=True))

    @classmethod
    def from_bytes(cls, raw: bytes, *, max_bytes: int) -> Self:
        """Parse untrusted bytes: size, UTF-8, duplicate keys, NaN and depth first, then the model.

        Raises schemas.canonical.MalformedDocument or pydantic.ValidationError.
        """
        strict_loads(raw, max_bytes=max_bytes)
        return cls.model_validate_json(raw)


# --- signed documents -------------------------------------------------------------------------


class PublicKey(WireModel):
    scheme: Literal["ed25519"] = "ed25519"
    public: PublicKeyHex


class RoleKeys(WireModel):
    keyids: Annotated[list[KeyId], Field(min_length=1, max_length=32)]
    threshold: Annotated[int, Field(ge=1, le=32)]


class RootMetadata(WireModel):
    """The fleet's root of trust: which keys may sign for which role, and how many must."""

    type: Literal["root"] = "root"
    fleet: Identifier
    version: Sequence
    expires: AwareDatetime
    keys: Annotated[dict[KeyId, PublicKey], Field(max_length=128)]
    roles: dict[Role, RoleKeys]


class Encryption(WireModel):
    """The payload is ciphertext under the device class's key; these describe the plaintext."""

    scheme: Literal["secretbox-stream-v1"] = "secretbox-stream-v1"
    plain_sha256: Sha256Hex
    plain_size: Annotated[int, Field(ge=0, le=MAX_SIZE)]


class Artifact(WireModel):
    """Bytes located by CID; accepted only when their sha256 and size match."""

    cid: Cid
    sha256: Sha256Hex
    size: Annotated[int, Field(ge=0, le=MAX_SIZE)]
    encryption: Encryption | None = None

    @property
    def installed_sha256(self) -> str:
        """The sha256 of what ends up installed: the plaintext when the payload is encrypted."""
        return self.encryption.plain_sha256 if self.encryption else self.sha256

    @property
    def installed_size(self) -> int:
        return self.encryption.plain_size if self.encryption else self.size


class Delta(WireModel):
    """A patch from one base (keyed by the base's sha256 in the manifest) to the new artifact."""

    cid: Cid
    sha256: Sha256Hex
    size: Annotated[int, Field(ge=0, le=MAX_SIZE)]
    base_version: VersionStr
    format: Literal["esdelta1"] = "esdelta1"  # schemas/patch.py; devices refuse formats they cannot apply
    encryption: Encryption | None = None


CommandArg = Annotated[str, StringConstraints(min_length=1, max_length=4096, pattern=r"^[^\x00]*$")]


class InstallSpec(WireModel):
    """How the device installs the artifact; chosen per class by whoever signs the manifest.

    `file` replaces `target` atomically; `ab` writes the inactive of two slots and switches
    `target` (a symlink) to it; `command` runs `command` as an argument vector, never through a
    shell, with `{artifact}` and `{target}` substituted, and `rollback` if it or the health check
    fails.
    """

    handler: Literal["file", "ab", "command"] = "file"
    target: TargetPath
    command: Annotated[list[CommandArg], Field(min_length=1, max_length=64)] | None = None
    rollback: Annotated[list[CommandArg], Field(min_length=1, max_length=64)] | None = None

    @model_validator(mode="after")
    def _command_only_for_command_handler(self) -> InstallSpec:
        if (self.handler == "command") != (self.command is not None):
            raise ValueError("`command` is required by the command handler and allowed for no other")
        if self.rollback is not None and self.handler != "command":
            raise ValueError("`rollback` belongs to the command handler")
        return self


class RolloutRule(WireModel):
    """Signed with the release: which devices install it at once, and that the others wait.

    A device's bucket is a deterministic function of `salt` and its id (services.runtime.trust.rollout_bucket,
    0-9999). Devices whose bucket is below `canary_percent` x 100 install at once; every other
    device reports `waiting` until it receives an install command naming this release's sequence.
    The rollout service sends those commands wave by wave; a forged or replayed command can only
    make a device install a release that this signature already covers.
    """

    canary_percent: Annotated[int, Field(ge=0, le=100)] = 0
    salt: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")]


class ReleaseManifest(WireModel):
    type: Literal["release"] = "release"
    fleet: Identifier
    device_class: Identifier
    version: VersionStr
    sequence: Sequence
    issued: AwareDatetime
    expires: AwareDatetime
    artifact: Artifact
    deltas: Annotated[dict[Sha256Hex, Delta], Field(max_length=16)] = {}
    install: InstallSpec
    summary: ShortText = ""
    release_url: Annotated[str, StringConstraints(max_length=512, pattern=r"^https?://[^\s]+$")] | None = None
    rollout: RolloutRule | None = None  # absent: every device of the class installs as soon as it verifies


class ReleasePointer(WireModel):
    """The release a timestamp vouches for: its sequence and the sha256 of its signed payload."""

    sequence: Sequence
    sha256: Sha256Hex


class TimestampMetadata(WireModel):
    """A short-lived statement, re-signed often, of the latest release per device class.

    A device accepts a release only while a fresh timestamp names it, so an attacker who can
    replay old (validly signed) manifests or withhold new ones is detected within its lifetime.
    """

    type: Literal["timestamp"] = "timestamp"
    fleet: Identifier
    version: Sequence
    expires: AwareDatetime
    root_version: Sequence
    releases: Annotated[dict[Identifier, ReleasePointer], Field(max_length=256)] = {}


class Signature(WireModel):
    keyid: KeyId
    sig: SignatureHex


class PayloadType(str, enum.Enum):
    ROOT = "application/vnd.edgeswarm.root+json"
    RELEASE = "application/vnd.edgeswarm.release+json"
    TIMESTAMP = "application/vnd.edgeswarm.timestamp+json"
    REPORT = "application/vnd.edgeswarm.report+json"  # a device's own signature over its state (not an envelope)


class SignedEnvelope(WireModel):
    """Signatures over `payload`, the base64 of a document's canonical JSON (DSSE-like).

    Signing the exact payload bytes, bound to their type, means a verifier never re-serializes
    before checking, and a root can never be passed off as a release or vice versa.
    """

    payload_type: PayloadType
    payload: Annotated[str, StringConstraints(max_length=96 * 1024, pattern=r"^[A-Za-z0-9+/]*={0,2}$")]
    signatures: Annotated[list[Signature], Field(max_length=32)]


# --- device reports and commands ---------------------------------------------------------------


class Phase(str, enum.Enum):
    IDLE = "idle"
    VERIFYING = "verifying"
    DOWNLOADING = "downloading"
    PATCHING = "patching"
    INSTALLING = "installing"
    DONE = "done"
    FAILED = "failed"
    REFUSED = "refused"
    FROZEN = "frozen"  # no fresh timestamp: the device cannot tell whether it is being held back
    CONFIRMING = "confirming"  # installed, waiting for the health check before committing
    ROLLED_BACK = "rolled_back"  # the install or its health check failed; the previous version runs
    WAITING = "waiting"  # a verified release is held back by its rollout rule until an install command


class DeviceState(WireModel):
    """What a device reports, retained, on its state topic after every transition."""

    device: Identifier
    fleet: Identifier
    device_class: Identifier
    installed_version: VersionStr
    installed_sha256: Sha256Hex
    last_sequence: Annotated[int, Field(ge=0, le=2**53)] = 0
    phase: Phase
    target_version: VersionStr | None = None
    progress: Annotated[int, Field(ge=0, le=100)] = 0
    bytes_from_peers: Annotated[int, Field(ge=0)] = 0
    bytes_from_origin: Annotated[int, Field(ge=0)] = 0
    bytes_from_lan_peers: Annotated[int, Field(ge=0)] = 0  # the part of bytes_from_peers from this device's own LAN
    peers_direct: Annotated[int, Field(ge=0)] | None = None  # connections when the last fetch ended: direct
    peers_relayed: Annotated[int, Field(ge=0)] | None = None  # ... and through a circuit relay
    used_delta: bool | None = None
    update_millis: Annotated[int, Field(ge=0)] | None = None
    reason: ShortText | None = None
    reason_code: Annotated[str, StringConstraints(pattern=r"^[a-z_]{1,64}$")] | None = None
    retrying: bool | None = None  # failed, and the device will try the same release again by itself
    timestamp: AwareDatetime
    # Signed reports (docs/wire-contract.md): a counter that only grows, and the device's identity key's
    # signature over the canonical JSON of this report without `signature`. A peer can carry such a
    # report to the broker; the fleet service accepts it only signed by that device, with a higher counter.
    counter: Annotated[int, Field(ge=1, le=2**62)] | None = None
    signature: Signature | None = None
    # Sent through a peer's tunnel to the broker (docs/p2p.md): the name that peer gave. Only what the
    # device says (its broker login binds the report, not the peer's name).
    tunnel_via: Identifier | None = None

    def signed_bytes(self) -> bytes:
        """What the device's identity key signs: the canonical report without its signature."""
        return self.model_copy(update={"signature": None}).canonical_bytes()


Multiaddr = Annotated[str, StringConstraints(max_length=256, pattern=r"^/ip[46]/[0-9a-fA-F.:]+/tcp/[0-9]{1,5}/p2p/[A-Za-z0-9]{32,128}$")]


class PeerAnnouncement(WireModel):
    """Retained on a device's `peer` topic: where its IPFS node can be dialed (the MQTT rendezvous).

    Only a hint for finding bytes faster; everything fetched is still checked against the signed
    manifest, so a lying announcement costs a failed dial, nothing more.
    """

    device: Identifier
    device_class: Identifier
    peer_id: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9]{32,128}$")]
    addrs: Annotated[list[Multiaddr], Field(min_length=1, max_length=8)]
    timestamp: AwareDatetime


class CommandName(str, enum.Enum):
    CHECK = "check"  # re-evaluate the retained release now
    REPORT = "report"  # publish the current state again
    INSTALL = "install"  # a staged release's rollout reached this device: install `sequence` if it verifies


class DeviceCommand(WireModel):
    command: CommandName
    request_id: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")] | None = None
    sequence: Sequence | None = None  # install: the release the rollout admits, by sequence ...
    release_sha256: Sha256Hex | None = None  # ... and by the sha256 of its signed payload

    @model_validator(mode="after")
    def _install_names_a_release(self) -> DeviceCommand:
        naming = (self.sequence is not None, self.release_sha256 is not None)
        if naming != ((True, True) if self.command == CommandName.INSTALL else (False, False)):
            raise ValueError("`sequence` and `release_sha256` are required by the install command and allowed for no other")
        return self


ONLINE = b"online"
OFFLINE = b"offline"
