"""The device agent: one process, one event loop, one IPFS node, one MQTT session.

It listens, on a persistent session with a last will, to its fleet's root chain, to the release
topic of its own device class and to its command topic. It is the I/O shell around two pure cores:
the trust rules (services.runtime.trust) decide whether a signed document is acceptable, and the
update state machine (device_client.machine) decides what to do next. The agent turns what it
hears into events, saves the machine's persisted state before it performs the machine's actions
(report, verify, run the update, schedule a retry, roll back), and feeds each outcome back as an
event. Refusals and failures are reported on the retained state topic and leave the working
version untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from device_client import machine
from device_client.broker_tunnel import BrokerPath, TunnelDialer, TunnelOffer
from device_client.content_keeper import ContentKeeper
from device_client.installer import (
    UnsafePath,
    check_install_directory,
    installer_for,
    sha256_file,
)
from device_client.local_state import LocalState, StateStore
from device_client.machine import AgentState, Event, MachineConfig
from device_client.peer_memory import RememberedPeers
from device_client.rendezvous import Rendezvous
from device_client.report_relay import ReportRelay
from device_client.report_signing import ReportCounter, ReportSigner
from device_client.reporter import Reporter
from device_client.switch import SwitchJournal, SwitchRecord, SwitchStep, Unreadable
from device_client.trust_intake import TrustFiles, TrustIntake, command_event
from device_client.updater import DiskFull, UpdateContext, UpdateError, Updater
from schemas import topics
from schemas.errors import EdgeswarmError, ReasonCode
from schemas.models import (
    OFFLINE,
    ONLINE,
    Phase,
    ReleaseManifest,
)
from services.runtime import natpmp
from services.runtime.addresses import host_addresses, local_address
from services.runtime.confidential import load_class_key
from services.runtime.content import (
    FetchError,
    FetchTooLarge,
    KuboConfig,
    load_swarm_key,
    open_store,
)
from services.runtime.files import read_capped, set_aside
from services.runtime.gossip import DocumentKind, GossipLimits
from services.runtime.keys import SigningKey
from services.runtime.messaging import (
    Message,
    MqttClient,
    MqttError,
    SubscriptionRefused,
    Will,
    topic_matches,
)
from services.runtime.peer_channel import GossipChannel, PeerDocument
from services.runtime.settings import DeviceSettings
from services.runtime.traffic import Endpoint, TrafficMeter
from services.runtime.trust import (
    BUCKETS,
    TrustedSet,
    TrustError,
    decode_envelope,
    payload_bytes,
    rollout_bucket,
)

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
        """Load the persisted state and the root of trust.

        Raises:
            ValueError: the trusted root is for another fleet.
            TrustError: the provisioned root does not parse or verify (a damaged stored one is set aside).
            PermissionError: state_dir belongs to another user.
        """
        self.settings = settings
        self.state_dir = settings.state_dir
        self.rendezvous: Rendezvous | None = None
        self.mapped: str | None = None  # /ip4/<external>/tcp/<port> this network's router maps to our node (NAT-PMP)
        self.gossip: GossipChannel | None = None
        self.swarm_port = settings.content.swarm_port  # the bound port once the node runs (settings may say 0)
        self._problems: list[tuple[ReasonCode, str]] = []  # found while loading: reported once connected
        self._prepare_state_dir()
        self.state_store = StateStore(self.state_dir / "state.json")
        self.journal = SwitchJournal(self.state_dir / "switch.json")
        budget = settings.content.disk_budget_mb
        self.keeper = ContentKeeper(self.state_dir / "held.json", keep_releases=settings.content.keep_releases,
                                    budget_bytes=int(budget * 1_000_000) if budget is not None else None)
        self.root_path = self.state_dir / "root.json"
        self.timestamp_path = self.state_dir / "timestamp.json"
        self.machine_config = MachineConfig(
            device_id=settings.device_id, max_attempts=settings.limits.max_attempts,
            retry_interval=settings.limits.retry_interval,
        )
        self.state = AgentState(local=self._load_state())
        trusted = self._load_trust()
        self.intake = TrustIntake(trusted, max_message_bytes=settings.limits.max_message_bytes,
                                  store=TrustFiles(self.root_path, self.timestamp_path))
        if trusted.timestamp_floor > self.state.local.timestamp_version:  # state.json was rebuilt
            local = self.state.local.model_copy(update={"timestamp_version": trusted.timestamp_floor})
            self.state_store.save(local)
            self.state = AgentState(local=local)
        self._retry_at: float | None = None
        # Subscriptions the broker refused: what was last said about them, and when they are asked again.
        self._refusals_said: dict[str, str] = {}
        self._resubscribe_at: float | None = None
        self._relay_at: float | None = None  # when peers' held reports are tried again
        self._resubscribe_delay = settings.limits.resubscribe_interval
        self._jitter = random.Random()
        self._freeze_check_at: float | None = time.monotonic() + settings.limits.freeze_grace
        # Until the node and the broker are up, only what undoes a cut switch is performed; the
        # machine's other actions (reports, verifying, updating) wait here, in order.
        self._held: list[machine.Action] | None = []
        self.signer = self._load_signer()
        self.relay = ReportRelay(settings.fleet, settings.device_id)

    # -- start-up -------------------------------------------------------------------------

    def _load_signer(self) -> ReportSigner | None:
        """The identity key that signs this device's reports, if it was provisioned with one. A key that
        does not load is said and left out: reports then count only when sent directly to the broker."""
        path = self.settings.identity_key
        if path is None:
            return None
        try:
            key = SigningKey.load(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("identity key %s not usable (%s): reports are not signed, so peers cannot carry them",
                      path, exc)
            return None
        return ReportSigner(key, ReportCounter(self.state_dir / "report-counter"))

    def _prepare_state_dir(self) -> None:
        """The state directory is the agent's alone: nobody else may create names in it (a planted
        link there could redirect a download or a state write)."""
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        info = self.state_dir.stat()
        if info.st_uid != os.geteuid():
            raise PermissionError(f"state_dir {self.state_dir} belongs to uid {info.st_uid}, not to this agent")
        if info.st_mode & 0o077:
            log.warning("state_dir %s had mode %o; making it private (700)", self.state_dir, info.st_mode & 0o777)
            os.chmod(self.state_dir, 0o700)

    def _load_trust(self) -> TrustedSet:
        limit = self.settings.limits.max_message_bytes
        root = None
        if self.root_path.exists():
            try:
                root = TrustedSet.load_initial_root(read_capped(self.root_path, limit), max_document_bytes=limit)
            except (TrustError, OSError, ValueError) as exc:
                # The chain is walked again from the provisioned root, through the retained root topics.
                set_aside(self.root_path)
                self._problem(ReasonCode.STATE_RESET, f"stored root unreadable ({exc}); back to the provisioned root")
        if root is None:
            root = TrustedSet.load_initial_root(self.settings.trusted_root.read_bytes(), max_document_bytes=limit)
        if root.fleet != self.settings.fleet:
            raise ValueError(f"trusted root is for fleet {root.fleet!r}, settings say {self.settings.fleet!r}")
        trusted = TrustedSet(
            root,
            device_class=self.settings.device_class,
            install_target=self.settings.install_target,
            timestamp_floor=self.state.local.timestamp_version,
            max_document_bytes=limit,
        )
        if self.timestamp_path.exists():
            try:
                trusted.update_timestamp(read_capped(self.timestamp_path, limit), datetime.now(UTC))
            except (TrustError, OSError, ValueError) as exc:
                log.info("stored timestamp no longer usable (%s); waiting for a fresh one", exc)
        return trusted

    def _load_state(self) -> LocalState:
        try:
            state = self.state_store.load()
        except (OSError, ValueError) as exc:
            # Rebuilt from what is on disk: the installed bytes' hash is certain, the version label is
            # the provisioned one until a release a timestamp vouches for names these bytes. The
            # timestamp floor comes back from timestamp.json; any pending update is dropped.
            set_aside(self.state_store.path)
            self._problem(ReasonCode.STATE_RESET, f"state.json was unreadable ({str(exc)[:200]}); rebuilt from the "
                                                  "installed bytes, any pending update dropped")
            state = None
        if state is None:
            state = LocalState(installed_version=self.settings.initial_version, installed_sha256=self._active_sha256())
            self.state_store.save(state)
        return state

    def _active_sha256(self) -> str:
        """The hash of the bytes at the install target (through an A/B link); of nothing if it is missing."""
        try:
            return sha256_file(self.settings.install_path)
        except OSError as exc:
            self._problem(ReasonCode.IO_ERROR, f"install target {self.settings.install_path} unreadable: {exc.strerror}")
            return hashlib.sha256(b"").hexdigest()

    def _problem(self, code: ReasonCode, reason: str) -> None:
        log.error("%s", reason)
        self._problems.append((code, reason[:1000]))

    def _started(self) -> machine.Started:
        """What the machine must know to finish what a cut interrupted: the switch journal and the
        bytes active now (read from disk, not from state.json)."""
        try:
            check_install_directory(self.settings.install_path.parent)
        except UnsafePath as exc:
            self._problem(exc.code, f"{exc}: installs will be refused")
        record = self.journal.load()
        if isinstance(record, SwitchRecord):
            installer = installer_for(record.install, self.settings.install_path,
                                      command_timeout=self.settings.install.command_timeout)
            try:
                active = installer.active_sha256()
            except (OSError, EdgeswarmError) as exc:
                log.error("cannot tell what is active at %s: %s", self.settings.install_path, exc)
                active = None  # unknown counts as moved: the rollback finds the old bytes by their hash
            return machine.Started(switch=record, active_sha256=active, problems=tuple(self._problems))
        return machine.Started(switch_unreadable=isinstance(record, Unreadable), problems=tuple(self._problems))

    # -- the machine ------------------------------------------------------------------------

    async def _feed(self, event: Event) -> None:
        """One step of the state machine: save what it persists, then perform its actions in order.

        Each action's outcome is fed back at once (depth first), so effects keep their causal order."""
        new, actions = machine.step(self.state, event, self.machine_config)
        if new.local != self.state.local:
            self.state_store.save(new.local)  # before anything it decided happens (a power cut resumes here)
        self.state = new
        for action in actions:
            if self._held is not None and not isinstance(action, (machine.RollBack, machine.ClearSwitch)):
                self._held.append(action)
                continue
            follow = await self._perform(action)
            if follow is not None:
                await self._feed(follow)

    async def _release_held(self) -> None:
        held, self._held = self._held or [], None
        for action in held:
            follow = await self._perform(action)
            if follow is not None:
                await self._feed(follow)

    async def _perform(self, action: machine.Action) -> Event | None:
        match action:
            case machine.Report():
                await self.reporter.report_transition(action, self.state.local)
            case machine.Verify(raw=raw, resuming=resuming):
                return self.intake.verify_release(raw, self.state.local, resuming=resuming)
            case machine.RunUpdate():
                return await self._run_update(action)
            case machine.KeepReleases(installed_sequence=sequence):
                await self._keep_releases(sequence)
            case machine.ScheduleRetry(seconds=seconds):
                self._retry_at = time.monotonic() + seconds
            case machine.RollBack(record=record, envelope=envelope):
                return await self._roll_back(record, envelope)
            case machine.ClearSwitch():
                await asyncio.to_thread(self.journal.settle)
        return None

    async def _run_update(self, action: machine.RunUpdate) -> Event:
        m = action.manifest
        log.info("installing %s %s (sequence %d)", self.settings.device_class, m.version, m.sequence)

        async def enter(phase: Phase, progress: int) -> None:
            await self._feed(machine.PhaseEntered(phase, m.version, progress))

        def progress(percent: int) -> None:
            local = self.state.local
            self.reporter.report_progress(
                phase=Phase.DOWNLOADING, installed_version=local.installed_version,
                installed_sha256=local.installed_sha256, last_sequence=local.last_sequence,
                target_version=m.version, progress=percent,
            )

        updater = Updater(self.update_context, enter, progress)
        try:
            await updater.run(m, action.installed_sha256)
        except DiskFull as exc:
            return self._failure(m, updater, exc.code, exc.reason, retryable=True, spent=exc.spent)
        except FetchTooLarge as exc:
            return self._failure(m, updater, exc.code, str(exc), phase=Phase.REFUSED)
        except FetchError as exc:
            return self._failure(m, updater, exc.code, str(exc), retryable=True)
        except OSError as exc:
            code = ReasonCode.DISK_FULL if exc.errno == errno.ENOSPC else ReasonCode.IO_ERROR
            return self._failure(m, updater, code, str(exc), retryable=True)
        except UpdateError as exc:
            return self._failure(m, updater, exc.code, exc.reason, phase=exc.phase)
        except Exception as exc:  # noqa: BLE001 - a bug must not leave the update pending for ever
            log.exception("internal error during the update to %s", m.version)
            return self._failure(m, updater, ReasonCode.INTERNAL_ERROR, f"internal error: {type(exc).__name__}: {exc}")
        return machine.UpdateSucceeded(m, figures={
            "used_delta": updater.used_delta, "update_millis": updater.elapsed_ms, **_traffic_figures(updater),
        })

    def _failure(self, m: ReleaseManifest, updater: Updater, code: ReasonCode, reason: str, *,
                 phase: Phase = Phase.FAILED, retryable: bool = False, spent: bool = True) -> machine.UpdateFailed:
        return machine.UpdateFailed(m, code, reason, phase=phase, retryable=retryable, figures=_traffic_figures(updater),
                                    spent=spent)

    async def _keep_releases(self, installed_sequence: int) -> None:
        try:
            await self.keeper.settle(self.node, installed_sequence=installed_sequence)
        except (OSError, RuntimeError, ValueError) as exc:  # the update stands; only serving old content is at stake
            log.warning("could not let go of old releases' content: %s", exc)

    async def _roll_back(self, record: SwitchRecord | None, envelope: str | None) -> Event:
        """Undo a switch found unconfirmed at start: to the slot or file the journal recorded, or, with
        no readable journal, to the installed bytes wherever the handler keeps them."""
        local = self.state.local
        if record is None:
            try:
                # Verified before it was installed; only its install spec, version and hashes are needed now.
                m = ReleaseManifest.model_validate_json(payload_bytes(decode_envelope((envelope or "").encode())))
            except (TrustError, ValueError) as exc:
                record = SwitchRecord(sequence=0, version=local.installed_version,
                                      install={"handler": "file", "target": self.settings.install_target},
                                      old_sha256=local.installed_sha256, new_sha256=local.installed_sha256,
                                      back_to=None, step=SwitchStep.SWITCHING)
                return machine.RolledBack(record, problem=f"the pending release is unreadable ({exc})")
            record = SwitchRecord(sequence=m.sequence, version=m.version, install=m.install,
                                  old_sha256=local.installed_sha256, new_sha256=m.artifact.installed_sha256,
                                  back_to=None, step=SwitchStep.SWITCHING)
        installer = installer_for(record.install, self.settings.install_path,
                                  command_timeout=self.settings.install.command_timeout)
        try:
            await asyncio.to_thread(self.journal.roll_back, installer, record, record.reason or "unconfirmed restart",
                                    record.reason_code or ReasonCode.UNCONFIRMED_RESTART)
        except Exception as exc:  # noqa: BLE001 - reported; the journal keeps the rollback for the next start
            log.exception("rollback of %s failed", record.version)
            return machine.RolledBack(record, problem=f"{type(exc).__name__}: {exc}")
        return machine.RolledBack(record)

    # -- main loop --------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Run until `stop` is set: finish or undo a switch a cut interrupted, start the IPFS node,
        connect to the broker, resume any update the state machine left pending, and handle
        messages and timers.

        Raises:
            MqttError: the broker refused the connection at start (one that does not answer leaves the
                agent offline, dialing it again, while it goes on with what it knows and its peers).
            RuntimeError: the IPFS node could not start.
            ValueError: a settings file (swarm key, class key) does not hold a key.
        """
        s = self.settings
        stop = stop or asyncio.Event()
        # First finish what a power cut interrupted, before the node starts or the broker answers: a
        # device that stays offline must not keep running a version nobody confirmed healthy.
        await self._guarded("start-up", self._feed_started)
        download_dir = self.state_dir / "downloads"
        download_dir.mkdir(exist_ok=True)
        self.mapped = await self._map_swarm_port(s.content.swarm_port) if s.content.nat_pmp else None
        node_config = KuboConfig(
            repo=self.state_dir / "ipfs",
            listen_host=s.content.listen_host,
            swarm_port=s.content.swarm_port,
            # With a grace period the origin is dialed only when peers do not deliver (Updater).
            peers=[p for p in s.content.peers if s.content.origin_grace is None or p != s.content.origin],
            kept=[s.content.origin.rsplit("/", 1)[-1]] if s.content.origin else [],  # never refused, even flooding
            mdns=s.content.mdns,
            nat_port_map=s.content.nat_port_map,
            announce=[self.mapped] if self.mapped else [],
            append_announce=list(s.content.announce),
            fetch_in_memory_bytes=int(s.content.fetch_in_memory_mb * (1 << 20)),
            fetch_spread=s.content.fetch_spread,
            routing=s.content.routing,
            swarm_key=load_swarm_key(s.content.swarm_key_file) if s.content.swarm_key_file else None,
        )
        online = topics.online_topic(s.fleet, s.device_id)
        client = MqttClient(
            s.mqtt.host, s.mqtt.port, f"edgeswarm-{s.fleet}-{s.device_id}",
            clean_session=False,
            will=Will(online, OFFLINE),
            birth=Will(online, ONLINE),
            keepalive=s.mqtt.keepalive, max_payload_bytes=s.limits.max_message_bytes, start_offline=True,
            **s.mqtt.client_options(),
        )
        async with (open_store(s.content.backend, kubo=node_config, rpc_api=s.content.rpc_api) as node, client,
                    contextlib.AsyncExitStack() as stack):
            self.node, self.client = node, client
            self.gossip = await self._open_gossip(node, stack)
            self.swarm_port = node_config.swarm_port
            dialer = TunnelDialer((s.mqtt.host, s.mqtt.port))
            self.reporter = Reporter(client, fleet=s.fleet, device=s.device_id, device_class=s.device_class,
                                     signer=self.signer, peers=self.gossip,
                                     tunnel=lambda: dialer.via if client.connector is not None else None)
            tunnels = await self._open_tunnels(node, client, dialer, stack)
            meter = TrafficMeter(self.swarm_port)  # for a daemon, its own port: counts are then the daemon's
            self.update_context = UpdateContext(
                store=node, target=s.install_path, download_dir=download_dir,
                meter=meter if meter.available else None, origin=origin_endpoint(s.content.origin),
                journal=self.journal, stall_timeout=s.limits.stall_timeout, fetch_deadline=s.limits.fetch_deadline,
                class_key=load_class_key(s.content.class_key_file) if s.content.class_key_file else None,
                install=s.install,
                origin_peer=s.content.origin if s.content.origin_grace is not None else None,
                origin_grace=self._origin_grace(),
                keeper=self.keeper,
            )
            for topic in (topics.root_wildcard(s.fleet), topics.timestamp_topic(s.fleet),
                          topics.release_topic(s.fleet, s.device_class), topics.command_topic(s.fleet, s.device_id)):
                await self._subscribe(topic)
            renewer = asyncio.ensure_future(self._keep_mapping(node.peer_id)) if s.content.nat_pmp else None
            watcher = asyncio.ensure_future(self._watch_network(node)) if hasattr(node, "restart_when_idle") else None
            if s.content.rendezvous:
                self.rendezvous = Rendezvous(client, node, fleet=s.fleet, device=s.device_id, device_class=s.device_class,
                                             max_message_bytes=s.limits.max_message_bytes,
                                             max_peers=s.content.rendezvous_peers,
                                             memory=RememberedPeers(self.state_dir / "peers.json"))
                self.rendezvous.dial_remembered()  # before the broker answers, if it ever does
                try:
                    await self.rendezvous.start(node.peer_id, self._dialable(node.peer_id))
                except SubscriptionRefused as exc:
                    log.error("%s: rendezvous announcements of other devices are not heard", exc)
            await self._guarded("the subscriptions", self._say_refusals)
            if self.state.local.pending is not None:
                log.info("resuming the update interrupted in phase %s", self.state.local.pending.phase.value)
            stopper = asyncio.ensure_future(stop.wait())
            await self._until_stopped(self._guarded("start-up", self._release_held), stopper)
            refusals = asyncio.ensure_future(client.refusals_changed.wait())
            try:
                while not stop.is_set():
                    if refusals.done():  # a renewal after a reconnect was refused or granted
                        client.refusals_changed.clear()
                        refusals = asyncio.ensure_future(client.refusals_changed.wait())
                        await self._guarded("the subscriptions", self._say_refusals)
                    freeze_check_at = self._next_freeze_check()
                    timers = [t for t in (self._retry_at, freeze_check_at, self._resubscribe_at, self._relay_at)
                              if t is not None]
                    timeout = max(0.0, min(timers) - time.monotonic()) if timers else None
                    getter = asyncio.ensure_future(client.next_message())
                    from_peer = asyncio.ensure_future(self.gossip.next()) if self.gossip is not None else None
                    done, _ = await asyncio.wait({getter, stopper, refusals, *([from_peer] if from_peer else [])},
                                                 timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                    for waiting in (getter, from_peer):
                        if waiting is not None and waiting not in done:
                            waiting.cancel()  # (neither loses a message: both queues keep what was not taken)
                    if getter in done:
                        await self._until_stopped(self._dispatch_guarded(getter.result()), stopper)
                    if from_peer is not None and from_peer in done:
                        await self._until_stopped(self._guarded("a document from a peer",
                                                                lambda: self._on_peer_document(from_peer.result())),
                                                  stopper)
                    if getter in done or (from_peer is not None and from_peer in done):
                        continue
                    if stop.is_set():
                        break
                    # Only when its own timer is due: another timer (a retry) must not cut the freeze grace short.
                    if freeze_check_at is not None and freeze_check_at <= time.monotonic():
                        await self._guarded("the freshness check", self._check_freshness)
                    if self._retry_at is not None and self._retry_at <= time.monotonic():
                        self._retry_at = None
                        await self._until_stopped(self._guarded("a retry", lambda: self._feed(machine.RetryDue())),
                                                  stopper)
                    if self._relay_at is not None and self._relay_at <= time.monotonic():
                        self._relay_at = None
                        await self._guarded("peers' reports", self._hand_on_held)
                    if self._resubscribe_at is not None and self._resubscribe_at <= time.monotonic():
                        self._resubscribe_at = None
                        await self._guarded("the subscriptions", self._resubscribe)
            finally:
                stopper.cancel()
                refusals.cancel()
                if self.rendezvous is not None:
                    self.rendezvous.close()
                if renewer is not None:
                    renewer.cancel()
                if watcher is not None:
                    watcher.cancel()
                if tunnels is not None:
                    tunnels.cancel()
                try:
                    await client.publish(online, OFFLINE, retain=True, timeout=2)
                except MqttError as exc:
                    log.info("could not publish offline (%s); the broker's last will says it instead", exc)

    async def _until_stopped(self, work: Awaitable[None], stopper: asyncio.Future[object]) -> None:
        """Run `work` (which may run a whole update), but let SIGTERM end a fetch: a long download must
        not hold a shutdown for minutes. state.json already records the download, so the next start
        resumes it with the blocks the node holds. Past the fetch (patching, installing, confirming:
        seconds, with files moving) the work is finished first."""
        task = asyncio.ensure_future(work)
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        pending = self.state.local.pending
        if not task.done() and pending is not None and pending.phase == Phase.DOWNLOADING:
            log.info("stopping during a download: it resumes at the next start")
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return
        if not task.done():
            log.info("stopping once the update's %s phase is over",
                     pending.phase.value if pending is not None else "current")
        await task

    async def _feed_started(self) -> None:
        await self._feed(self._started())

    # -- subscriptions the broker refuses ----------------------------------------------------

    async def _subscribe(self, topic: str) -> None:
        """A refusal (an ACL, a broker at its subscription limit) does not stop the agent: what it can
        still hear, it handles; the refusal is said on the state topic and asked again until granted
        (_say_refusals, once every subscription was asked for)."""
        try:
            await self.client.subscribe(topic)
        except SubscriptionRefused as exc:
            log.error("%s", exc)

    async def _say_refusals(self) -> None:
        """Tell the fleet when the set of refused subscriptions changes, and keep asking while it is not empty."""
        refused = dict(self.client.refused)
        if refused and self._resubscribe_at is None:
            # Jittered, so that a fleet refused by one broker does not ask again all at once.
            self._resubscribe_at = time.monotonic() + self._resubscribe_delay * self._jitter.uniform(0.8, 1.2)
        if refused == self._refusals_said:
            return
        self._refusals_said = refused
        if refused:
            listed = "; ".join(f"{topic} ({reason})" for topic, reason in sorted(refused.items()))
            await self._feed(machine.SubscriptionsRefused(f"the broker refused the subscription to {listed}"[:1000]))
        else:
            log.info("every subscription is granted again")
            self._resubscribe_at = None
            self._resubscribe_delay = self.settings.limits.resubscribe_interval
            await self._feed(machine.SubscriptionsGranted())

    async def _resubscribe(self) -> None:
        for topic in list(self.client.refused):
            try:
                await self.client.subscribe(topic)
            except SubscriptionRefused as exc:
                log.warning("%s", exc)
            except MqttError as exc:  # not connected: the reconnect renews every subscription anyway
                log.info("could not ask for %s again: %s", topic, exc)
        if self.client.refused:
            self._resubscribe_delay = min(self._resubscribe_delay * 2, 20 * self.settings.limits.resubscribe_interval)
        await self._say_refusals()

    async def _guarded(self, what: str, work: Callable[[], Awaitable[None]]) -> None:
        """A bug (or a disk error) met while handling one message, a timer or the start must not take a
        remote device offline for good, nor make it exit at every start: reported, then the agent goes on."""
        try:
            await work()
        except MqttError:
            raise  # the session is gone: `run` ends and the caller reconnects
        except Exception as exc:  # noqa: BLE001 - logged with its traceback and reported
            log.exception("internal error during %s", what)
            try:
                await self._feed(machine.InternalError(f"internal error during {what}: {type(exc).__name__}: {exc}"[:1000]))
            except Exception:  # noqa: BLE001 - not even the report went out; the log has it
                log.exception("could not report the internal error")

    async def _dispatch_guarded(self, message: Message) -> None:
        limit = self.settings.limits.max_message_bytes
        size = message.dropped_bytes or len(message.payload)
        if size > limit:  # nothing unverified this large is kept, parsed or stored (the client dropped the bytes)
            await self._feed(machine.TrustDocumentRefused(
                ReasonCode.MALFORMED, f"message of {size} bytes on {message.topic[-80:]} exceeds the limit of {limit}"))
            return
        await self._guarded(f"handling {message.topic[-80:]}", lambda: self._dispatch(message))

    async def _dispatch(self, message: Message) -> None:
        s = self.settings
        if self.rendezvous is not None and self.rendezvous.handles(message):
            return
        if topic_matches(topics.release_topic(s.fleet, s.device_class), message.topic):
            if self.gossip is not None and self.intake.carriable_release(message.payload):
                self.gossip.carry(message.topic, message.payload)
            await self._feed(machine.ReleaseHeard(message.payload))
        elif topic_matches(topics.root_wildcard(s.fleet), message.topic):
            await self._on_root(message)
        elif message.topic == topics.timestamp_topic(s.fleet):
            await self._on_timestamp(message.payload)
        elif message.topic == topics.command_topic(s.fleet, s.device_id):
            await self._on_command(message.payload)
        else:
            log.debug("ignoring message on %s", message.topic)

    # -- peer-to-peer -----------------------------------------------------------------------

    async def _open_tunnels(self, node: object, client: MqttClient, dialer: TunnelDialer,
                            stack: contextlib.AsyncExitStack) -> asyncio.Task[None] | None:
        """Offer peers a tunnel to the broker while this device reaches it directly, and reach it through
        a peer's after `tunnel_after` without it (docs/p2p.md). Only the embedded node mounts streams."""
        s = self.settings
        if not hasattr(node, "p2p_forward"):
            log.info("no broker through peers: the %s backend mounts no libp2p streams here (docs/p2p.md)",
                     s.content.backend)
            return None
        if s.mqtt.tunnel_carry > 0:
            await stack.enter_async_context(TunnelOffer(
                node, (s.mqtt.host, s.mqtt.port), s.device_id, limit=s.mqtt.tunnel_carry,  # type: ignore[arg-type]
                live=lambda: client.connected and client.connector is None))
        if s.mqtt.tunnel_after == 0:
            return None
        origin = s.content.origin.rsplit("/p2p/", 1)[-1] if s.content.origin else None
        path = BrokerPath(client, node, dialer, after=s.mqtt.tunnel_after,  # type: ignore[arg-type]
                          changed=lambda: self._guarded("the report of a new broker path", self._report_again),
                          exclude=frozenset({origin} if origin else ()))
        return asyncio.ensure_future(path.run())

    async def _report_again(self) -> None:
        """Say again where this device stands: the broker now hears it by another path."""
        assert self.reporter is not None
        if self.reporter.last is not None:
            try:
                await self.reporter.again()
            except MqttError as exc:  # the path went again: the next one reports
                log.info("could not report the new broker path: %s", exc)

    async def _open_gossip(self, node: object, stack: contextlib.AsyncExitStack) -> GossipChannel | None:
        """Join the fleet's gossip topic, carrying the root and timestamp this device trusts already."""
        s = self.settings
        if not s.content.gossip:
            return None
        if not hasattr(node, "pubsub_join"):
            log.info("no signed documents from peers: the %s backend's daemon cannot be made to refuse a "
                     "flooding peer (only the embedded node gossips; see docs/p2p.md)", s.content.backend)
            return None
        channel = GossipChannel(node, fleet=s.fleet, interval=s.content.gossip_interval,  # type: ignore[arg-type]
                                limits=GossipLimits(max_document_bytes=s.limits.max_message_bytes))
        await stack.enter_async_context(channel)
        trusted = self.intake.trusted
        root_raw = read_capped(self.root_path if self.root_path.exists() else s.trusted_root, s.limits.max_message_bytes)
        channel.carry(topics.root_topic(s.fleet, trusted.root.version), root_raw)
        if trusted.timestamp is not None and self.timestamp_path.exists():
            channel.carry(topics.timestamp_topic(s.fleet), read_capped(self.timestamp_path, s.limits.max_message_bytes))
        self.intake.on_accepted = channel.carry
        return channel

    async def _on_peer_document(self, document: PeerDocument) -> None:
        """A signed document a peer gossiped: the trust core judges it as it judges the broker's."""
        assert self.gossip is not None
        if self.gossip.ignores(document.sender):
            return  # queued before its ban
        if document.kind == DocumentKind.REPORT:
            await self._relay_report(document)
            return
        verdict = self.intake.from_peer(document.kind, document.topic, document.payload,
                                        last_release=self.state.last_release, local=self.state.local)
        if verdict.forged is not None:
            log.warning("refused a %s from peer %s: %s", document.kind.value, document.sender, verdict.forged)
            self.gossip.strike(document.sender, verdict.forged)
        elif verdict.note:
            log.info("a %s from peer %s is not used: %s", document.kind.value, document.sender, verdict.note)
        if verdict.held:
            self.gossip.read_again(document)
        if verdict.carry:
            self.gossip.carry(document.topic, document.payload)
        if verdict.events and verdict.forged is None:
            log.info("heard %s from peer %s", document.topic, document.sender)
        for event in verdict.events:
            await self._feed(event)

    async def _relay_report(self, document: PeerDocument) -> None:
        """A peer's signed report: handed on to the broker when this device reaches it. Unverified here;
        the fleet service checks the peer's signature and counter (services.operator.report_trust)."""
        assert self.gossip is not None and self.client is not None
        decision = self.relay.judge(document.topic, document.payload)
        if decision.forged is not None:
            log.warning("refused a report from peer %s: %s", document.sender, decision.forged)
            self.gossip.strike(document.sender, decision.forged)
            return
        if not decision.hand_on:
            log.debug("not handing on a report from peer %s: %s", document.sender, decision.note)
            return
        device, _ = topics.device_from_topic(self.settings.fleet, document.topic) or ("?", "")
        if not self.client.connected or not self.relay.take():
            # Held until it can go (its broker away too: a data mule on an isolated LAN, or over the rate).
            self.relay.hold(document.payload)
            self._relay_at = self._relay_at or time.monotonic() + 2.0
            log.info("holding %s's report from peer %s until this device reaches its broker", device, document.sender)
            return
        if await self._hand_on(document.payload):
            log.info("handed on %s's report from peer %s to the broker", device, document.sender)
        else:
            self.relay.hold(document.payload)
            self._relay_at = self._relay_at or time.monotonic() + 2.0

    async def _hand_on(self, raw: bytes) -> bool:
        assert self.client is not None
        try:
            await self.client.publish(topics.relay_topic(self.settings.fleet, self.settings.device_id), raw, qos=1,
                                      retain=False)
        except MqttError as exc:
            log.info("could not hand on a peer's report (%s): held, tried again", exc)
            return False
        self.relay.handed_on(raw)
        return True

    async def _hand_on_held(self) -> None:
        """Hand on the peers' reports held while this device could not (every 2 s until none is left)."""
        assert self.client is not None
        held = self.relay.held()
        if self.client.connected:
            sent = 0
            for raw in held:
                if not self.relay.take() or not await self._hand_on(raw):
                    break
                sent += 1
            if sent:
                log.info("handed on %d report(s) of peers held while the broker was away", sent)
        if self.relay.held():
            self._relay_at = time.monotonic() + 2.0

    async def _watch_network(self, node: object, interval: float = 2.0) -> None:
        """Notice when this device's addresses change (it moved to another LAN, its DHCP lease changed):
        with NAT-PMP it asks the new network's router for a port mapping (the old one names another
        router's address), its node then starts again, so mDNS and its peers learn the new addresses,
        and it announces them on the rendezvous. A fetch under way restarts the node itself at its
        next check (EmbeddedKuboNode.restart_when_idle)."""
        seen = sorted(host_addresses())
        changing: list[str] | None = None
        while True:
            await asyncio.sleep(interval)
            now = sorted(host_addresses())
            if now == seen or not now:
                changing = None
                continue  # (no address at all: a link down for a moment; the next one decides)
            if now != changing:
                changing = now  # settled only when the next look finds the same (an address comes before its route)
                continue
            changing = None
            log.warning("this device's addresses changed (%s -> %s): restarting its IPFS node so peers on this "
                        "network find it", ", ".join(seen) or "none", ", ".join(now))
            seen = now
            try:
                if self.settings.content.nat_pmp:
                    self.mapped = await self._map_swarm_port(self.swarm_port)  # None: no NAT-PMP on this network
                    node.announce_instead([self.mapped] if self.mapped else [])  # type: ignore[attr-defined]
                await node.restart_when_idle()  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001 - the next change, or the fetch's remedy, tries again
                log.exception("could not restart the IPFS node on the new network")
            if self.rendezvous is not None:
                try:
                    await self.rendezvous.announce(node.peer_id, self._dialable(node.peer_id),  # type: ignore[attr-defined]
                                                   confirm=False)
                except MqttError as exc:
                    log.warning("could not announce the new addresses on the rendezvous: %s", exc)

    async def _map_swarm_port(self, port: int) -> str | None:
        """/ip4/<external>/tcp/<port> the router mapped to our swarm port, or None (no NAT-PMP there)."""
        router = natpmp.gateway()
        if router is None:
            return None
        try:
            mapping = await natpmp.map_tcp(router, port)
        except natpmp.NatPmpError as exc:
            log.info("no port mapping: %s", exc)
            return None
        log.info("router %s maps %s:%d to our swarm port", router, mapping.external_ip, mapping.external_port)
        return f"/ip4/{mapping.external_ip}/tcp/{mapping.external_port}"

    async def _keep_mapping(self, peer_id: str, lifetime: int = 3600) -> None:
        """Routers forget mappings when their lease ends: renew at half-time. Without a mapping yet
        (the router was still starting), ask again every 30 s and announce it when it comes. The
        mapping is `self.mapped`, which a move to another network replaces (_watch_network)."""
        while True:
            await asyncio.sleep(lifetime / 2 if self.mapped else 30)
            renewed = await self._map_swarm_port(self.swarm_port)
            if renewed != self.mapped and renewed is not None:
                self.mapped = renewed
                if self.rendezvous is not None:
                    await self.rendezvous.announce(peer_id, self._dialable(peer_id))

    def _dialable(self, peer_id: str) -> list[str]:
        """Our node's addresses for the rendezvous: static port forwards and the router's mapping first,
        then the LAN address."""
        s = self.settings
        host = s.content.listen_host
        if host in ("0.0.0.0", "::"):
            host = local_address(s.mqtt.host)
        outside = [*s.content.announce, *([self.mapped] if self.mapped else [])]
        return [f"{a}/p2p/{peer_id}" for a in [*outside, f"/ip4/{host}/tcp/{self.swarm_port}"]][:8]

    def _origin_grace(self) -> float | None:
        """This device's grace before it dials the origin: 1-4x the setting, spread by device id, so
        that one device reaches the origin first and the others get its blocks instead."""
        grace = self.settings.content.origin_grace
        if grace is None:
            return None
        return grace * (1 + 3 * rollout_bucket("origin-grace", self.settings.device_id) / BUCKETS)

    # -- trust ------------------------------------------------------------------------------

    async def _on_root(self, message: Message) -> None:
        version = topics.root_version(message.topic)
        if version is None:
            return
        for event in self.intake.root_heard(version, message.payload):
            if isinstance(event, machine.RootAccepted):
                log.info("now trusting root v%d (keys removed from: %s)", event.version,
                         ", ".join(sorted(r.value for r in event.revoked_roles)) or "none")
            await self._feed(event)

    async def _on_timestamp(self, raw: bytes) -> None:
        await self._feed(self.intake.timestamp_heard(raw))

    def _next_freeze_check(self) -> float | None:
        if self.state.frozen or self.state.local.pending is not None:
            return None  # (the machine does not judge freshness while an update is pending: no timer to spin on)
        seconds_left = self.intake.seconds_until_stale()
        if seconds_left is not None:
            return time.monotonic() + seconds_left
        return self._freeze_check_at

    async def _check_freshness(self) -> None:
        if (event := self.intake.check_fresh()) is not None:
            await self._feed(event)

    # -- commands ---------------------------------------------------------------------------

    async def _on_command(self, raw: bytes) -> None:
        event = command_event(raw, max_bytes=self.settings.limits.max_message_bytes)
        log.info("a command on this device's topic: %s", type(event).__name__)
        await self._feed(event)


def _traffic_figures(updater: Updater) -> dict[str, object]:
    t = updater.traffic
    return {"bytes_from_origin": t.from_origin, "bytes_from_peers": t.from_peers, "bytes_from_lan_peers": t.from_lan_peers,
            "peers_direct": t.peers_direct, "peers_relayed": t.peers_relayed}
