"""The release pipeline: artifact and deltas into the content store, a signed manifest, published retained."""

from __future__ import annotations

import asyncio
import io
import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import zstandard
from packaging.version import Version

from schemas import topics
from schemas.errors import EdgeswarmError, ReasonCode
from schemas.models import (
    Artifact,
    Delta,
    Encryption,
    InstallSpec,
    PayloadType,
    ReleaseManifest,
    Role,
    RolloutRule,
)
from services.operator.home import OperatorHome, ReleaseRecord
from services.runtime.confidential import encrypt_file
from services.runtime.content import ContentStore, HashOnlyStore
from services.runtime.delta import create_delta
from services.runtime.files import atomic_write, sha256_file
from services.runtime.keys import sign_envelope
from services.runtime.messaging import MqttClient
from services.runtime.settings import ContentSettings

if TYPE_CHECKING:
    from services.runtime.content import KuboRpcStore

log = logging.getLogger(__name__)


class ReleaseError(EdgeswarmError):
    code = ReasonCode.RELEASE_REFUSED


MIN_DELTA_SAVING = 0.2  # a delta must be this much smaller than the compressed full artifact


def choose_bases(releases: Sequence[ReleaseRecord], fleet_versions: Mapping[str, int] | None, new_sha256: str, k: int) -> list[ReleaseRecord]:
    """The K released versions to make deltas from: those most devices run, else the latest ones."""
    candidates = [r for r in releases if r.sha256 != new_sha256]
    running = [r for r in candidates if fleet_versions and fleet_versions.get(r.version, 0) > 0]
    if running:
        assert fleet_versions is not None
        return sorted(running, key=lambda r: (-fleet_versions[r.version], -r.sequence))[:k]
    return candidates[::-1][:k]


def compressed_size(path: Path) -> int:
    """What the full artifact would cost compressed (zstd level 9 with long matching: close to xz -6, fast)."""
    params = zstandard.ZstdCompressionParameters.from_level(9, enable_ldm=True, window_log=27)
    counter = _CountingSink()
    with open(path, "rb") as source, zstandard.ZstdCompressor(compression_params=params).stream_writer(counter, closefd=False) as sink:
        while block := source.read(1 << 20):
            sink.write(block)
    return counter.count


class _CountingSink(io.RawIOBase):
    def __init__(self) -> None:
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[override]
        self.count += len(data)
        return len(data)


@dataclass(frozen=True)
class BuiltRelease:
    manifest: ReleaseManifest
    envelope: bytes

    @property
    def delta_bytes(self) -> int:
        return sum(d.size for d in self.manifest.deltas.values())


class ReleasePipeline:
    def __init__(self, home: OperatorHome, store: ContentStore, *, delta_bases: int = 3, expires_days: int = 30) -> None:
        self.home = home
        self.store = store
        self.delta_bases = delta_bases
        self.expires_days = expires_days

    async def build(
        self, device_class: str, version: str, artifact: Path, *, target: str, summary: str = "",
        install: InstallSpec | None = None, fleet_versions: Mapping[str, int] | None = None,
        rollout: RolloutRule | None = None, release_url: str | None = None,
    ) -> BuiltRelease:
        """Sign and store a release; `fleet_versions` (version -> devices running it, from fleet
        tracking) picks the delta bases, else the last releases are used."""
        topics.check_identifier(device_class, "device class")
        root = self.home.root()
        history = self.home.history(device_class)
        latest = history.latest
        if latest is not None and Version(version) <= Version(latest.version):
            raise ReleaseError(f"{device_class} {version} is not newer than the released {latest.version}")
        release_dir = self.home.release_dir(device_class) / version
        release_dir.mkdir(parents=True, exist_ok=True)
        stored = release_dir / "artifact"
        shutil.copyfile(artifact, stored)
        sha, size = sha256_file(stored), stored.stat().st_size
        class_key = self.home.class_key(device_class)
        shipped = await self._ship(stored, class_key)
        deltas: dict[str, Delta] = {}
        bases = choose_bases(history.releases, fleet_versions, sha, self.delta_bases)
        worth = int(compressed_size(stored) * (1 - MIN_DELTA_SAVING)) if bases else 0
        for base in bases:
            base_file = self.home.release_dir(device_class) / base.version / "artifact"
            patch = release_dir / f"delta-from-{base.version}.esd"
            patch_size = await asyncio.to_thread(create_delta, base_file, stored, patch)
            if patch_size > worth:
                log.info("delta from %s (%d bytes) is not %d%% smaller than the compressed artifact (%d bytes); "
                         "devices on it take the full file", base.version, patch_size, MIN_DELTA_SAVING * 100,
                         worth / (1 - MIN_DELTA_SAVING))
                patch.unlink()
                continue
            sent = await self._ship(patch, class_key)
            deltas[base.sha256] = Delta(
                cid=sent.cid, sha256=sent.sha256, size=sent.size, encryption=sent.encryption, base_version=base.version
            )
        now = datetime.now(UTC).replace(microsecond=0)
        manifest = ReleaseManifest(
            fleet=root.fleet,
            device_class=device_class,
            version=version,
            sequence=(latest.sequence + 1) if latest else 1,
            issued=now,
            expires=now + timedelta(days=self.expires_days),
            artifact=shipped,
            deltas=deltas,
            install=install or InstallSpec(target=target),
            summary=summary,
            release_url=release_url,
            rollout=rollout,
        )
        signers = self.home.signing_keys(Role.RELEASE)
        if len(signers) < root.roles[Role.RELEASE].threshold:
            raise ReleaseError(f"only {len(signers)} release key(s) here, threshold is {root.roles[Role.RELEASE].threshold}")
        envelope = sign_envelope(PayloadType.RELEASE, manifest.canonical_bytes(), signers).canonical_bytes()
        history.releases.append(ReleaseRecord(version=version, sequence=manifest.sequence, sha256=sha, size=size, cid=shipped.cid))
        self.home.save_history(device_class, history)
        atomic_write(release_dir / "manifest.json", envelope)
        atomic_write(self.home.release_dir(device_class) / "latest.json", envelope)
        return BuiltRelease(manifest, envelope)

    async def _ship(self, path: Path, class_key: bytes | None) -> Artifact:
        """Add `path` to the content store, sealed under the class key when the class has one."""
        if class_key is None:
            return Artifact(cid=await self.store.add(path), sha256=sha256_file(path), size=path.stat().st_size)
        sealed_path = path.with_name(path.name + ".sealed")
        sealed = encrypt_file(class_key, path, sealed_path)
        return Artifact(
            cid=await self.store.add(sealed_path), sha256=sha256_file(sealed_path), size=sealed_path.stat().st_size,
            encryption=Encryption(plain_sha256=sealed.plain_sha256, plain_size=sealed.plain_size),
        )


async def publish_trust(client: MqttClient, home: OperatorHome) -> None:
    """Publish every root of the chain, retained, so devices can walk from the one they trust."""
    fleet = home.root().fleet
    for version, raw in home.root_chain():
        await client.publish(topics.root_topic(fleet, version), raw, retain=True)


async def publish_timestamp(client: MqttClient, home: OperatorHome, *, expires_in: timedelta = timedelta(hours=4)) -> int:
    """Sign and publish, retained, a fresh timestamp naming the latest release of every class."""
    metadata, envelope = home.sign_timestamp(expires_in=expires_in)
    await client.publish(topics.timestamp_topic(metadata.fleet), envelope, retain=True)
    return metadata.version


# The publish order devices rely on lives in the functions below, and only here: the root chain
# first (a release may be signed by keys only a newer root names), then the timestamp, then the
# release. A device must never hear a release that no fresh timestamp names yet: it would refuse it
# (timestamp_mismatch) and wait for the next timestamp.


async def publish_release(client: MqttClient, home: OperatorHome, device_class: str, envelope: bytes, *,
                          timestamp_expires: timedelta = timedelta(hours=4)) -> None:
    """Publish a signed release (built by ReleasePipeline, so the operator home records it) in the order
    devices need: root chain, fresh timestamp naming it, the release itself (all retained)."""
    await publish_trust(client, home)
    await publish_timestamp(client, home, expires_in=timestamp_expires)
    await client.publish(topics.release_topic(home.root().fleet, device_class), envelope, retain=True)


async def publish_everything_again(client: MqttClient, home: OperatorHome, *,
                                   timestamp_expires: timedelta = timedelta(hours=4)) -> int:
    """The root chain, a fresh timestamp and every class's latest release, in that order: what a
    broker that lost its retained messages (a crash between two saves) needs to serve them again.
    Returns the timestamp's version."""
    await publish_trust(client, home)
    version = await publish_timestamp(client, home, expires_in=timestamp_expires)
    fleet = home.root().fleet
    for device_class in home.device_classes():
        envelope = home.latest_manifest(device_class)
        if envelope is not None:
            await client.publish(topics.release_topic(fleet, device_class), envelope, retain=True)
    return version


async def publish_root_change(client: MqttClient, home: OperatorHome, *,
                              timestamp_expires: timedelta = timedelta(hours=4)) -> dict[str, bytes]:
    """After a root rotation: the root chain, each class's latest release re-signed with the current
    release keys, then a fresh timestamp (which makes devices check the releases again).
    Returns the re-signed envelopes by device class."""
    await publish_trust(client, home)
    resigned = home.resign_latest_manifests()
    fleet = home.root().fleet
    for device_class, envelope in resigned.items():
        await client.publish(topics.release_topic(fleet, device_class), envelope, retain=True)
    await publish_timestamp(client, home, expires_in=timestamp_expires)
    return resigned


def release_store(content: ContentSettings, home: OperatorHome) -> HashOnlyStore | KuboRpcStore:
    """Where `edgeswarm release` puts artifacts and deltas: the Kubo daemon itself (it keeps serving),
    or hash-only CIDs with the files copied to <home>/seed for `edgeswarm origin` to serve."""
    if content.backend == "kubo-rpc":
        from services.runtime.content import KuboRpcStore  # ipfshttpclient: ~90 ms to import

        return KuboRpcStore(content.rpc_api)
    return HashOnlyStore(home.path / "cid-scratch", home.seed_dir)
