"""The operator's working directory: signing keys, the signed root chain and the release history.

    <home>/keys/<role>-<keyid8>.key    private keys, 0600
    <home>/roots/<version>.json        every signed root, in order
    <home>/root.json                   the current signed root (what devices are provisioned with)
    <home>/releases/<class>/history.json, <version>/artifact, <version>/delta-from-<base>.esd
    <home>/seed/<cid>                  files for a long-running `edgeswarm origin` to serve
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from schemas.errors import EdgeswarmError, ReasonCode
from schemas.models import (
    PayloadType,
    ReleasePointer,
    Role,
    RoleKeys,
    RootMetadata,
    Signature,
    SignedEnvelope,
    TimestampMetadata,
)
from services.runtime.files import atomic_write
from services.runtime.keys import SigningKey, sign_envelope
from services.runtime.trust import (
    RootUpdate,
    TrustedSet,
    TrustError,
    decode_envelope,
    payload_bytes,
    payload_digest,
    verify_role,
)


class ReleaseRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str
    sequence: int
    sha256: str
    size: int
    cid: str


class ReleaseHistory(BaseModel):
    model_config = ConfigDict(extra="forbid")
    releases: list[ReleaseRecord] = []

    @property
    def latest(self) -> ReleaseRecord | None:
        return self.releases[-1] if self.releases else None


class RootChangeError(EdgeswarmError):
    code = ReasonCode.ROOT_CHANGE_REFUSED


class OperatorHome:
    def __init__(self, path: Path, passphrase: str | None = None) -> None:
        self.path = path
        self.passphrase = passphrase  # for sealed key files; None when keys are stored in the clear

    @property
    def keys_dir(self) -> Path:
        return self.path / "keys"

    @property
    def root_file(self) -> Path:
        return self.path / "root.json"

    @property
    def identities_dir(self) -> Path:
        """Devices' registered identity keys (services.operator.identities)."""
        return self.path / "identities"

    @property
    def seed_dir(self) -> Path:
        return self.path / "seed"

    def release_dir(self, device_class: str) -> Path:
        return self.path / "releases" / device_class

    # -- keys and root ----------------------------------------------------------------------

    def init(
        self, fleet: str, *, root_keys: int = 1, root_threshold: int = 1, release_keys: int = 1,
        release_threshold: int = 1, timestamp_keys: int = 1, expires_days: int = 365,
    ) -> RootMetadata:
        if self.root_file.exists():
            raise FileExistsError(f"{self.root_file} exists: this operator home is already initialised")
        if root_threshold > root_keys or release_threshold > release_keys:
            raise ValueError("a threshold cannot exceed the number of keys")
        keys: dict[Role, list[SigningKey]] = {
            Role.ROOT: [SigningKey.generate("root") for _ in range(root_keys)],
            Role.RELEASE: [SigningKey.generate("release") for _ in range(release_keys)],
            Role.TIMESTAMP: [SigningKey.generate("timestamp") for _ in range(timestamp_keys)],
        }
        thresholds = {Role.ROOT: root_threshold, Role.RELEASE: release_threshold, Role.TIMESTAMP: 1}
        for role_keys in keys.values():
            for key in role_keys:
                self._save_key(key)
        root = RootMetadata(
            fleet=fleet,
            version=1,
            expires=datetime.now(UTC).replace(microsecond=0) + timedelta(days=expires_days),
            keys={k.keyid: k.public_key() for role_keys in keys.values() for k in role_keys},
            roles={role: RoleKeys(keyids=[k.keyid for k in ks], threshold=thresholds[role]) for role, ks in keys.items()},
        )
        self._write_root(root, keys[Role.ROOT])
        return root

    def _write_root(self, root: RootMetadata, signers: list[SigningKey]) -> bytes:
        envelope = sign_envelope(PayloadType.ROOT, root.canonical_bytes(), signers).canonical_bytes()
        (self.path / "roots").mkdir(parents=True, exist_ok=True)
        atomic_write(self.path / "roots" / f"{root.version}.json", envelope)
        atomic_write(self.root_file, envelope)
        return envelope

    def _save_key(self, key: SigningKey) -> Path:
        path = self.keys_dir / f"{key.role}-{key.keyid[:8]}.key"
        key.save(path, passphrase=self.passphrase)
        return path

    def local_keys(self, role: Role) -> list[SigningKey]:
        return [SigningKey.load(p, self.passphrase) for p in sorted(self.keys_dir.glob(f"{role.value}-*.key"))]

    def signing_keys(self, role: Role, root: RootMetadata | None = None) -> list[SigningKey]:
        """The private keys present here that `root` (default: the current one) trusts for `role`."""
        root = root or self.root()
        allowed = set(root.roles[role].keyids)
        return [k for k in self.local_keys(role) if k.keyid in allowed]

    # -- root changes: rotate, revoke, sign offline, commit -----------------------------------

    @property
    def proposal_file(self) -> Path:
        return self.path / "root-proposed.json"

    def _successor(self, keys: dict, roles: dict[Role, RoleKeys], expires_days: int) -> RootMetadata:
        current = self.root()
        return RootMetadata(
            fleet=current.fleet, version=current.version + 1,
            expires=datetime.now(UTC).replace(microsecond=0) + timedelta(days=expires_days), keys=keys, roles=roles,
        )

    def propose_rotation(self, role: Role, *, count: int | None = None, threshold: int | None = None,
                         expires_days: int = 365) -> RootMetadata:
        """Root N+1 with fresh keys for `role` (saved here); the role's old keys are dropped."""
        current = self.root()
        old = current.roles[role]
        count = count or len(old.keyids)
        threshold = threshold or min(old.threshold, count)
        if threshold > count:
            raise RootChangeError(f"threshold {threshold} exceeds {count} key(s)")
        fresh = [SigningKey.generate(role.value) for _ in range(count)]
        for key in fresh:
            self._save_key(key)
        roles = dict(current.roles)
        roles[role] = RoleKeys(keyids=[k.keyid for k in fresh], threshold=threshold)
        return self._successor(self._keys_for(current, roles, fresh), roles, expires_days)

    def propose_revocation(self, keyid: str, *, expires_days: int = 365) -> RootMetadata:
        current = self.root()
        matches = [k for k in current.keys if k.startswith(keyid)]
        if len(matches) != 1:
            raise RootChangeError(f"key id {keyid!r} matches {len(matches)} keys of root v{current.version}")
        full = matches[0]
        roles: dict[Role, RoleKeys] = {}
        for role, spec in current.roles.items():
            remaining = [k for k in spec.keyids if k != full]
            if len(remaining) < spec.threshold:
                raise RootChangeError(
                    f"revoking {full[:12]} leaves role {role.value} {len(remaining)} key(s) for threshold "
                    f"{spec.threshold}: rotate the role instead (edgeswarm keys rotate {role.value})"
                )
            roles[role] = RoleKeys(keyids=remaining, threshold=spec.threshold)
        return self._successor(self._keys_for(current, roles, []), roles, expires_days)

    @staticmethod
    def _keys_for(current: RootMetadata, roles: dict[Role, RoleKeys], fresh: list[SigningKey]) -> dict:
        known = dict(current.keys)
        known.update({k.keyid: k.public_key() for k in fresh})
        used = {keyid for spec in roles.values() for keyid in spec.keyids}
        return {keyid: public for keyid, public in known.items() if keyid in used}

    def start_proposal(self, root: RootMetadata) -> SignedEnvelope:
        """The unsigned root N+1, written to `root-proposed.json` for signing (possibly offline)."""
        envelope = sign_envelope(PayloadType.ROOT, root.canonical_bytes(), [])
        atomic_write(self.proposal_file, envelope.canonical_bytes())
        return envelope

    @staticmethod
    def add_signatures(envelope: SignedEnvelope, keys: list[SigningKey]) -> SignedEnvelope:
        """Sign a proposed root with `keys` (root keys of the current or the proposed root)."""
        payload = payload_bytes(envelope)
        existing = {s.keyid for s in envelope.signatures}
        added: list[Signature] = []
        for key in keys:
            if key.role != Role.ROOT.value:
                raise RootChangeError(f"key {key.keyid[:12]} is a {key.role} key; roots are signed by root keys")
            if key.keyid not in existing:
                added.append(key.sign(PayloadType.ROOT, payload))
                existing.add(key.keyid)
        return envelope.model_copy(update={"signatures": [*envelope.signatures, *added]})

    def sign_with_local_root_keys(self, envelope: SignedEnvelope) -> SignedEnvelope:
        proposed = RootMetadata.model_validate_json(payload_bytes(envelope))
        wanted = set(self.root().roles[Role.ROOT].keyids) | set(proposed.roles[Role.ROOT].keyids)
        return self.add_signatures(envelope, [k for k in self.local_keys(Role.ROOT) if k.keyid in wanted])

    def commit_root(self, raw: bytes) -> RootUpdate:
        """Make a fully signed root N+1 current, after checking it exactly as a device will."""
        trusted = TrustedSet(self.root(), device_class="operator", install_target="/")
        try:
            update = trusted.update_root(raw)
        except TrustError as exc:
            raise RootChangeError(f"root not accepted: {exc}") from exc
        atomic_write(self.path / "roots" / f"{update.root.version}.json", raw)
        atomic_write(self.root_file, raw)
        self.proposal_file.unlink(missing_ok=True)
        return update

    def root(self) -> RootMetadata:
        if not self.root_file.exists():
            raise FileNotFoundError(f"{self.root_file} not found: run `edgeswarm keys init` first")
        return TrustedSet.load_initial_root(self.root_file.read_bytes())

    def root_chain(self) -> list[tuple[int, bytes]]:
        return sorted((int(p.stem), p.read_bytes()) for p in (self.path / "roots").glob("*.json"))

    # -- releases -------------------------------------------------------------------------

    def history(self, device_class: str) -> ReleaseHistory:
        path = self.release_dir(device_class) / "history.json"
        return ReleaseHistory.model_validate_json(path.read_bytes()) if path.exists() else ReleaseHistory()

    def save_history(self, device_class: str, history: ReleaseHistory) -> None:
        directory = self.release_dir(device_class)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(directory / "history.json", history.model_dump_json(indent=2).encode())

    def device_classes(self) -> list[str]:
        base = self.path / "releases"
        return sorted(p.name for p in base.iterdir() if (p / "history.json").exists()) if base.exists() else []

    @property
    def swarm_key_file(self) -> Path:
        return self.path / "swarm.key"

    def class_key_file(self, device_class: str) -> Path:
        return self.path / "class-keys" / f"{device_class}.key"

    def class_key(self, device_class: str) -> bytes | None:
        """The class's payload key when its releases are confidential, else None."""
        from services.runtime.confidential import load_class_key

        path = self.class_key_file(device_class)
        return load_class_key(path) if path.exists() else None

    def latest_manifest(self, device_class: str) -> bytes | None:
        path = self.release_dir(device_class) / "latest.json"
        return path.read_bytes() if path.exists() else None

    def resign_latest_manifests(self) -> dict[str, bytes]:
        """Re-sign each class's latest manifest whose signatures the current root no longer accepts.

        After a release key rotation the payloads stay byte for byte the same (so timestamps that
        name them stay valid); only the signatures change to the new keys.
        """
        root = self.root()
        resigned: dict[str, bytes] = {}
        for device_class in self.device_classes():
            latest = self.latest_manifest(device_class)
            if latest is None:
                continue
            envelope = decode_envelope(latest)
            try:
                verify_role(envelope, root, Role.RELEASE)
                continue
            except TrustError:
                pass
            fresh = sign_envelope(PayloadType.RELEASE, payload_bytes(envelope), self.signing_keys(Role.RELEASE)).canonical_bytes()
            atomic_write(self.release_dir(device_class) / "latest.json", fresh)
            resigned[device_class] = fresh
        return resigned

    # -- timestamps -------------------------------------------------------------------------

    @property
    def timestamp_file(self) -> Path:
        return self.path / "timestamp.json"

    def sign_timestamp(self, *, expires_in: timedelta = timedelta(hours=4)) -> tuple[TimestampMetadata, bytes]:
        """A new timestamp naming the latest release of every class; its version always grows."""
        root = self.root()
        releases: dict[str, ReleasePointer] = {}
        for device_class in self.device_classes():
            latest = self.latest_manifest(device_class)
            if latest is None:
                continue
            history = self.history(device_class).latest
            assert history is not None
            releases[device_class] = ReleasePointer(sequence=history.sequence, sha256=payload_digest(decode_envelope(latest)))
        version_file = self.path / "timestamp-version"
        version = (int(version_file.read_text()) if version_file.exists() else 0) + 1
        atomic_write(version_file, str(version).encode())
        now = datetime.now(UTC).replace(microsecond=0)
        metadata = TimestampMetadata(
            fleet=root.fleet, version=version, expires=now + expires_in, root_version=root.version, releases=releases
        )
        signers = self.signing_keys(Role.TIMESTAMP)
        if len(signers) < root.roles[Role.TIMESTAMP].threshold:
            raise ValueError(f"only {len(signers)} timestamp key(s) here, threshold {root.roles[Role.TIMESTAMP].threshold}")
        envelope = sign_envelope(PayloadType.TIMESTAMP, metadata.canonical_bytes(), signers).canonical_bytes()
        atomic_write(self.timestamp_file, envelope)
        return metadata, envelope
