"""The device agent: one process, one event loop, one IPFS node, one MQTT session.

It listens, on a persistent session with a last will, to its fleet's root chain, to the release
topic of its own device class and to its command topic. Every release goes through the pure trust
rules (services.runtime.trust) before any byte is fetched; refusals and failures are reported on the
retained state topic and leave the working version untouched.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime

import pydantic

from device_client.content_keeper import ContentKeeper
from device_client.installer import InstallError, installer_for, sha256_file
from device_client.local_state import LocalState, StateStore
from device_client.rendezvous import Rendezvous, local_address
from device_client.reporter import Reporter
from device_client.updater import ManifestAndRaw, UpdateContext, UpdateFailed, Updater
from schemas import topics
from schemas.canonical import MalformedDocument
from schemas.models import OFFLINE, ONLINE, CommandName, DeviceCommand, Phase, ReleaseManifest, Role
from services.runtime.confidential import load_class_key
from services.runtime.files import atomic_write
from services.runtime.content import FetchError, FetchTooLarge, KuboConfig, load_swarm_key, open_store
from services.runtime.messaging import Message, MqttClient, MqttError, Will, topic_matches
from services.runtime.settings import DeviceSettings
from services.runtime.traffic import Endpoint, TrafficMeter
from services.runtime.trust import (
    BUCKETS, DeviceRecord, FreezeDetected, RootOutdated, TimestampMismatch, TrustedSet, TrustError, decode_envelope,
    payload_bytes, rollout_admits, rollout_bucket,
)
from services.runtime import natpmp

log = logging.getLogger(__name__)


def origin_endpoint(multiaddr: str | None) -> Endpoint | None:
    """(ip, port) of an /ip4/<ip>/tcp/<port>/... multiaddr."""
    if not multiaddr:
        return None
    parts = multiaddr.strip("/").split("/")
    if len(parts) >= 4 and parts[0] in ("ip4", "ip6") and parts[2] == "tcp":
        return parts[1], int(parts[3])
    return None


class DeviceAgent:
    def __init__(self, settings: DeviceSettings) -> None:
        self.settings = settings
        self.state_dir = settings.state_dir
        self.rendezvous: Rendezvous | None = None
        self.state_store = StateStore(self.state_dir / "state.json")
        budget = settings.content.disk_budget_mb
        self.keeper = ContentKeeper(self.state_dir / "held.json", keep_releases=settings.content.keep_releases,
                                    budget_bytes=int(budget * 1_000_000) if budget is not None else None)
        self.root_path = self.state_dir / "root.json"
        self.timestamp_path = self.state_dir / "timestamp.json"
        self.state = self._load_state()
        self.trusted = self._load_trust()
        self.last_release: bytes | None = None
        self._pending_roots: dict[int, bytes] = {}
        self._pending_timestamp: bytes | None = None
        self._retry_at: float | None = None
        self._freeze_check_at: float | None = time.monotonic() + settings.limits.freeze_grace
        self.frozen = False
        self._release_awaits_timestamp = False  # the last release was refused only for want of a fresh timestamp

    # -- start-up -------------------------------------------------------------------------

    def _load_trust(self) -> TrustedSet:
        limit = self.settings.limits.max_message_bytes
        source = self.root_path if self.root_path.exists() else self.settings.trusted_root
        root = TrustedSet.load_initial_root(source.read_bytes(), max_document_bytes=limit)
        if root.fleet != self.settings.fleet:
            raise ValueError(f"trusted root is for fleet {root.fleet!r}, settings say {self.settings.fleet!r}")
        trusted = TrustedSet(
            root,
            device_class=self.settings.device_class,
            install_target=self.settings.install_target,
            timestamp_floor=self.state.timestamp_version,
            max_document_bytes=limit,
        )
        if self.timestamp_path.exists():
            try:
                trusted.update_timestamp(self.timestamp_path.read_bytes(), datetime.now(UTC))
            except TrustError as exc:
                log.info("stored timestamp no longer usable (%s); waiting for a fresh one", exc)
        return trusted

    def _load_state(self) -> LocalState:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        state = self.state_store.load()
        if state is None:
            state = LocalState(
                installed_version=self.settings.initial_version,
                installed_sha256=sha256_file(self.settings.install_path),
            )
            self.state_store.save(state)
        return state

    # -- reporting --------------------------------------------------------------------------

    async def report(self, phase: Phase, **fields: object) -> None:
        await self.reporter.report(
            phase=phase,
            installed_version=self.state.installed_version,
            installed_sha256=self.state.installed_sha256,
            last_sequence=self.state.last_sequence,
            **fields,
        )

    # -- main loop --------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None) -> None:
        s = self.settings
        stop = stop or asyncio.Event()
        download_dir = self.state_dir / "downloads"
        download_dir.mkdir(exist_ok=True)
        mapped = await self._map_swarm_port() if s.content.nat_pmp else None
        node_config = KuboConfig(
            repo=self.state_dir / "ipfs",
            listen_host=s.content.listen_host,
            swarm_port=s.content.swarm_port,
            # With a grace period the origin is dialed only when peers do not deliver (Updater).
            peers=[p for p in s.content.peers if s.content.origin_grace is None or p != s.content.origin],
            mdns=s.content.mdns,
            nat_port_map=s.content.nat_port_map,
            announce=[mapped] if mapped else [],
            append_announce=list(s.content.announce),
            fetch_in_memory_bytes=int(s.content.fetch_in_memory_mb * (1 << 20)),
            routing=s.content.routing,
            swarm_key=load_swarm_key(s.content.swarm_key_file) if s.content.swarm_key_file else None,
        )
        online = topics.online_topic(s.fleet, s.device_id)
        client = MqttClient(
            s.mqtt.host, s.mqtt.port, f"edgeswarm-{s.fleet}-{s.device_id}",
            clean_session=False,
            will=Will(online, OFFLINE),
            birth=Will(online, ONLINE),
            keepalive=s.mqtt.keepalive, **s.mqtt.client_options(),
        )
        async with open_store(s.content.backend, kubo=node_config, rpc_api=s.content.rpc_api) as node, client:
            self.node, self.client = node, client
            self.reporter = Reporter(client, fleet=s.fleet, device=s.device_id, device_class=s.device_class)
            meter = TrafficMeter(s.content.swarm_port)  # for a daemon, its own port: counts are then the daemon's
            self.update_context = UpdateContext(
                store=node, target=s.install_path, state_store=self.state_store, download_dir=download_dir,
                meter=meter if meter.available else None, origin=origin_endpoint(s.content.origin),
                stall_timeout=s.limits.stall_timeout, fetch_deadline=s.limits.fetch_deadline,
                class_key=load_class_key(s.content.class_key_file) if s.content.class_key_file else None,
                install=s.install,
                origin_peer=s.content.origin if s.content.origin_grace is not None else None,
                origin_grace=self._origin_grace(),
                keeper=self.keeper,
            )
            await client.subscribe(topics.root_wildcard(s.fleet))
            await client.subscribe(topics.timestamp_topic(s.fleet))
            await client.subscribe(topics.release_topic(s.fleet, s.device_class))
            await client.subscribe(topics.command_topic(s.fleet, s.device_id))
            renewer = asyncio.ensure_future(self._keep_mapping(node.peer_id, mapped)) if s.content.nat_pmp else None
            if s.content.rendezvous:
                self.rendezvous = Rendezvous(client, node, fleet=s.fleet, device=s.device_id, device_class=s.device_class,
                                             max_message_bytes=s.limits.max_message_bytes,
                                             max_peers=s.content.rendezvous_peers)
                await self.rendezvous.start(node.peer_id, self._dialable(node.peer_id, mapped))
            await self.report(Phase.IDLE)  # only now: "idle" means listening
            if self.state.pending is not None and self.state.pending.phase == Phase.CONFIRMING:
                await self._roll_back_unconfirmed()
            elif self.state.pending is not None:
                log.info("resuming the update interrupted in phase %s", self.state.pending.phase.value)
                await self._evaluate(self.state.pending.envelope.encode(), resuming=True)
            stopper = asyncio.ensure_future(stop.wait())
            try:
                while not stop.is_set():
                    timers = [t for t in (self._retry_at, self._next_freeze_check()) if t is not None]
                    timeout = max(0.0, min(timers) - time.monotonic()) if timers else None
                    getter = asyncio.ensure_future(client.next_message())
                    done, _ = await asyncio.wait({getter, stopper}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                    if getter in done:
                        await self._dispatch_guarded(getter.result())
                        continue
                    getter.cancel()
                    if stop.is_set():
                        break
                    await self._check_freshness()
                    if self._retry_at is not None and self._retry_at <= time.monotonic():
                        self._retry_at = None
                        if self.state.pending is not None:
                            await self._evaluate(self.state.pending.envelope.encode(), resuming=True)
            finally:
                stopper.cancel()
                if self.rendezvous is not None:
                    self.rendezvous.close()
                if renewer is not None:
                    renewer.cancel()
                try:
                    await client.publish(online, OFFLINE, retain=True, timeout=2)
                except MqttError as exc:
                    log.info("could not publish offline (%s); the broker's last will says it instead", exc)

    async def _dispatch_guarded(self, message: Message) -> None:
        """A bug met while handling one message must not take a remote device offline for good."""
        try:
            await self._dispatch(message)
        except Exception as exc:  # noqa: BLE001 - logged with its traceback and reported, then the agent goes on
            log.exception("internal error while handling %s", message.topic)
            await self.report(Phase.FAILED, reason=f"internal error: {type(exc).__name__}: {exc}", reason_code="internal_error")

    async def _dispatch(self, message: Message) -> None:
        s = self.settings
        if self.rendezvous is not None and self.rendezvous.handles(message):
            return
        if topic_matches(topics.release_topic(s.fleet, s.device_class), message.topic):
            self.last_release = message.payload
            await self._evaluate(message.payload)
        elif topic_matches(topics.root_wildcard(s.fleet), message.topic):
            await self._on_root(message)
        elif message.topic == topics.timestamp_topic(s.fleet):
            await self._on_timestamp(message.payload)
        elif message.topic == topics.command_topic(s.fleet, s.device_id):
            await self._on_command(message.payload)
        else:
            log.debug("ignoring message on %s", message.topic)

    # -- peer-to-peer -----------------------------------------------------------------------

    async def _map_swarm_port(self) -> str | None:
        """/ip4/<external>/tcp/<port> the router mapped to our swarm port, or None (no NAT-PMP there)."""
        router = natpmp.gateway()
        if router is None:
            return None
        try:
            mapping = await natpmp.map_tcp(router, self.settings.content.swarm_port)
        except natpmp.NatPmpError as exc:
            log.info("no port mapping: %s", exc)
            return None
        log.info("router %s maps %s:%d to our swarm port", router, mapping.external_ip, mapping.external_port)
        return f"/ip4/{mapping.external_ip}/tcp/{mapping.external_port}"

    async def _keep_mapping(self, peer_id: str, mapped: str | None, lifetime: int = 3600) -> None:
        """Routers forget mappings when their lease ends: renew at half-time. Without a mapping yet
        (the router was still starting), ask again every 30 s and announce it when it comes."""
        while True:
            await asyncio.sleep(lifetime / 2 if mapped else 30)
            renewed = await self._map_swarm_port()
            if renewed != mapped and renewed is not None and self.rendezvous is not None:
                await self.rendezvous.announce(peer_id, self._dialable(peer_id, renewed))
            mapped = renewed or mapped

    def _dialable(self, peer_id: str, mapped: str | None) -> list[str]:
        """Our node's addresses for the rendezvous: static port forwards and the router's mapping first,
        then the LAN address."""
        s = self.settings
        host = s.content.listen_host
        if host in ("0.0.0.0", "::"):
            host = local_address(s.mqtt.host)
        outside = [*s.content.announce, *([mapped] if mapped else [])]
        return [f"{a}/p2p/{peer_id}" for a in [*outside, f"/ip4/{host}/tcp/{s.content.swarm_port}"]][:8]

    def _origin_grace(self) -> float | None:
        """This device's grace before it dials the origin: 1-4x the setting, spread by device id, so
        that one device reaches the origin first and the others get its blocks instead."""
        grace = self.settings.content.origin_grace
        if grace is None:
            return None
        return grace * (1 + 3 * rollout_bucket("origin-grace", self.settings.device_id) / BUCKETS)

    # -- trust ------------------------------------------------------------------------------

    async def _on_root(self, message: Message) -> None:
        try:
            version = int(message.topic.rsplit("/", 1)[1])
        except ValueError:
            return
        if version <= self.trusted.root.version:
            return
        self._pending_roots[version] = message.payload
        if self.trusted.root.version + 1 not in self._pending_roots:
            await self.report(
                Phase.REFUSED, reason_code="root_chain_gap",
                reason=f"root v{version} received, but v{self.trusted.root.version + 1} is missing: waiting for it",
            )
            return
        while (raw := self._pending_roots.pop(self.trusted.root.version + 1, None)) is not None:
            try:
                update = self.trusted.update_root(raw)
            except TrustError as exc:
                await self.report(Phase.REFUSED, reason=f"root v{self.trusted.root.version + 1}: {exc}", reason_code=exc.code)
                return
            atomic_write(self.root_path, raw)
            if Role.TIMESTAMP in update.revoked_roles:
                # Fast-forward recovery: floors a revoked key may have pushed up are dropped.
                self.state.timestamp_version = 0
                self.timestamp_path.unlink(missing_ok=True)
            if Role.RELEASE in update.revoked_roles:
                self.state.last_sequence = 0
            self.state_store.save(self.state)
            log.info("now trusting root v%d (keys removed from: %s)", update.root.version,
                     ", ".join(sorted(r.value for r in update.revoked_roles)) or "none")
        if self._pending_timestamp is not None:
            raw, self._pending_timestamp = self._pending_timestamp, None
            await self._on_timestamp(raw)

    async def _on_timestamp(self, raw: bytes) -> None:
        try:
            timestamp = self.trusted.update_timestamp(raw, datetime.now(UTC))
        except RootOutdated as exc:
            self._pending_timestamp = raw  # tried again once the root chain has been walked
            await self.report(Phase.REFUSED, reason=f"{exc}; waiting for the root", reason_code=exc.code)
            return
        except TrustError as exc:
            await self.report(Phase.REFUSED, reason=f"timestamp: {exc}", reason_code=exc.code)
            return
        atomic_write(self.timestamp_path, raw)
        self.state.timestamp_version = timestamp.version
        self.state_store.save(self.state)
        self.frozen = False
        if self.last_release is not None and self.state.pending is None and self._release_awaits_timestamp:
            await self._evaluate(self.last_release)  # held back for want of a timestamp: maybe this one names it
        elif self.reporter.last is not None and self.reporter.last.phase == Phase.FROZEN:
            await self.report(Phase.IDLE)

    def _next_freeze_check(self) -> float | None:
        timestamp = self.trusted.timestamp
        if timestamp is not None and not self.frozen:
            seconds_left = (timestamp.expires - datetime.now(UTC)).total_seconds()
            return time.monotonic() + max(0.0, seconds_left)
        return self._freeze_check_at if not self.frozen else None

    async def _check_freshness(self) -> None:
        if self.frozen or self.state.pending is not None:
            return
        try:
            self.trusted.check_fresh(datetime.now(UTC))
        except TrustError as exc:
            self.frozen = True
            await self.report(Phase.FROZEN, reason=str(exc), reason_code=exc.code)

    async def _evaluate(self, raw: bytes, *, resuming: bool = False) -> None:
        record = DeviceRecord(self.state.installed_version, self.state.installed_sha256, self.state.last_sequence)
        try:
            manifest = self.trusted.verify_release(raw, record, datetime.now(UTC))
        except TrustError as exc:
            self._release_awaits_timestamp = isinstance(exc, (FreezeDetected, TimestampMismatch))
            if resuming:
                self.state.pending = None
                self.state_store.save(self.state)
            await self.report(Phase.REFUSED, reason=str(exc), reason_code=exc.code)
            return
        self._release_awaits_timestamp = False
        if manifest.sequence == self.state.rolled_back_sequence and manifest.artifact.installed_sha256 != self.state.installed_sha256:
            last = self.reporter.last.phase if self.reporter.last else None
            if last != Phase.ROLLED_BACK:
                await self.report(Phase.ROLLED_BACK, reason=f"sequence {manifest.sequence} was rolled back here; "
                                  "waiting for a newer release", reason_code="rolled_back", target_version=manifest.version)
            return
        if manifest.artifact.installed_sha256 == self.state.installed_sha256:
            changed = manifest.sequence > self.state.last_sequence or self.state.pending is not None
            if changed:
                self.state.last_sequence = max(self.state.last_sequence, manifest.sequence)
                self.state.pending = None
                self.state_store.save(self.state)
            last = self.reporter.last.phase if self.reporter.last else None
            if changed or last not in (Phase.IDLE, Phase.DONE):
                await self.report(Phase.IDLE)  # keep a retained DONE report (and its figures) in place
            return
        if self.state.pending is None and not rollout_admits(manifest, self.settings.device_id, self.state.approved_sequence):
            last = self.reporter.last
            if last is None or last.phase != Phase.WAITING or last.target_version != manifest.version:
                await self.report(Phase.WAITING, target_version=manifest.version, reason_code="awaiting_rollout",
                                  reason=f"{manifest.version} is rolled out in waves: waiting for an install command")
            return
        await self._install(ManifestAndRaw(manifest, raw))

    async def _install(self, manifest: ManifestAndRaw) -> None:
        m = manifest.manifest
        log.info("installing %s %s (sequence %d)", self.settings.device_class, m.version, m.sequence)

        async def report(**fields: object) -> None:
            await self.report(fields.pop("phase"), **fields)  # type: ignore[arg-type]

        def progress(percent: int) -> None:
            self.reporter.report_progress(
                phase=Phase.DOWNLOADING, installed_version=self.state.installed_version,
                installed_sha256=self.state.installed_sha256, last_sequence=self.state.last_sequence,
                target_version=m.version, progress=percent,
            )

        updater = Updater(self.update_context, report, progress)
        try:
            self.state = await updater.run(manifest, self.state)
        except FetchTooLarge as exc:
            await self._failed(manifest, exc.code, str(exc), updater, retry=False, phase=Phase.REFUSED)
            return
        except (FetchError, OSError) as exc:
            await self._failed(manifest, getattr(exc, "code", "io_error"), str(exc), updater, retry=True)
            return
        except UpdateFailed as exc:
            await self._failed(manifest, exc.code, exc.reason, updater, retry=False, phase=exc.phase)
            return
        try:
            await self.keeper.settle(self.node, installed_sequence=m.sequence)
        except (OSError, RuntimeError, ValueError) as exc:  # the update stands; only serving old content is at stake
            log.warning("could not let go of old releases' content: %s", exc)
        await self.report(
            Phase.DONE, target_version=m.version, progress=100, used_delta=updater.used_delta,
            bytes_from_origin=updater.traffic.from_origin, bytes_from_peers=updater.traffic.from_peers,
            bytes_from_lan_peers=updater.traffic.from_lan_peers,
            peers_direct=updater.traffic.peers_direct, peers_relayed=updater.traffic.peers_relayed,
            update_millis=updater.elapsed_ms,
        )

    async def _failed(
        self, manifest: ManifestAndRaw, code: str, reason: str, updater: Updater, *, retry: bool, phase: Phase = Phase.FAILED
    ) -> None:
        pending = self.state.pending
        attempts = (pending.attempts if pending else 0) + 1
        if phase == Phase.ROLLED_BACK:
            self.state.rolled_back_sequence = manifest.manifest.sequence
        retrying = retry and attempts < self.settings.limits.max_attempts and pending is not None
        if retrying:
            assert pending is not None
            self.state.pending = pending.model_copy(update={"attempts": attempts})
            self._retry_at = time.monotonic() + self.settings.limits.retry_interval
            reason = f"{reason}; retry {attempts + 1} of {self.settings.limits.max_attempts} in {self.settings.limits.retry_interval:.0f} s"
        else:
            self.state.pending = None
        self.state_store.save(self.state)
        await self.report(
            phase, target_version=manifest.manifest.version, reason=reason, reason_code=code,
            bytes_from_origin=updater.traffic.from_origin, bytes_from_peers=updater.traffic.from_peers,
            bytes_from_lan_peers=updater.traffic.from_lan_peers,
            peers_direct=updater.traffic.peers_direct, peers_relayed=updater.traffic.peers_relayed,
            retrying=retrying or None,
        )

    async def _roll_back_unconfirmed(self) -> None:
        """The agent restarted while a new version awaited its health check: go back to the old one."""
        pending = self.state.pending
        assert pending is not None
        # The manifest was verified before it was installed; only its install spec is needed now.
        manifest = ReleaseManifest.model_validate_json(payload_bytes(decode_envelope(pending.envelope.encode())))
        installer = installer_for(manifest.install, self.settings.install_path,
                                  command_timeout=self.settings.install.command_timeout)
        reason = f"restarted before {manifest.version} was confirmed healthy; rolled back to {self.state.installed_version}"
        try:
            await asyncio.to_thread(installer.rollback)
        except (InstallError, OSError) as exc:
            reason += f" (rollback reported: {exc})"
        self.state.pending = None
        self.state.rolled_back_sequence = manifest.sequence
        self.state_store.save(self.state)
        await self.report(Phase.ROLLED_BACK, reason=reason, reason_code="unconfirmed_restart", target_version=manifest.version)

    # -- commands ---------------------------------------------------------------------------

    async def _on_command(self, raw: bytes) -> None:
        try:
            command = DeviceCommand.from_bytes(raw, max_bytes=self.settings.limits.max_message_bytes)
        except (MalformedDocument, pydantic.ValidationError) as exc:
            await self.report(Phase.REFUSED, reason=f"bad command: {exc}"[:1000], reason_code="malformed_command")
            return
        if command.command == CommandName.INSTALL and command.sequence is not None:
            # Only an admission: the release itself must still arrive signed and verify like any other.
            self.state.approved_sequence = command.sequence
            self.state_store.save(self.state)
            if self.last_release is not None and self.state.pending is None:
                await self._evaluate(self.last_release)
        elif command.command == CommandName.CHECK and self.last_release is not None:
            await self._evaluate(self.last_release)
        else:
            await self.report(self.reporter.last.phase if self.reporter.last else Phase.IDLE)
