"""`edgeswarm fleet serve`: fleet tracking, staged rollouts, operator requests and the Home Assistant
bridge, in one process with one MQTT session and one event loop.

Everything it decides comes from retained topics (device state and online, releases) plus the
fleet record (SQLite or PostgreSQL), so a restart, or a standby taking over, picks up where it left off: rollouts are persisted after every change,
device facts come back as retained messages.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pydantic

from schemas import topics
from schemas.canonical import MalformedDocument
from schemas.errors import EdgeswarmError, ReasonCode
from schemas.models import CommandName, DeviceCommand, DeviceState, PublicKey, ReleaseManifest, RootMetadata
from schemas.ops import (
    ControlRollout,
    DeviceRequest,
    OpsResult,
    RolloutState,
    StartRollout,
)
from services.operator.fleet import FleetTracker, Heard
from services.operator.fleet_store import FleetStore, OnlineSeen, ReportHeard
from services.operator.homeassistant import HomeAssistantBridge, Retained
from services.operator.identities import DeviceIdentities
from services.operator.report_trust import ReportRefused, judge_carried, signed_by
from services.operator.rollout import Member, Rollout
from services.runtime.messaging import Message, MqttClient, MqttError, topic_matches
from services.runtime.trust import RootsAhead, TrustError, next_root, open_release

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 256 * 1024
MAX_UNVERIFIED_CLASSES = 256  # releases kept until the root they need arrives, one per class
ACCESS_CHECK_SECONDS = 10.0
RECORD_BATCH = 5000  # reports written in one transaction at most; the rest wait for the tick
COMMAND_BATCH = 500  # install commands in flight at once (each waits for its PUBACK)
OPERATOR_ONLY = {"rollout/start", "rollout/pause", "rollout/resume", "rollout/abort", "device/retire"}


class AccessDenied(EdgeswarmError):
    """The broker login may not read and write the ops topics: the service would run and do nothing."""


@dataclass(frozen=True)
class OpsTokens:
    """Bearer tokens for ops requests: `operator` may do everything, `homeassistant` only install/check."""

    operator: str
    homeassistant: str

    @staticmethod
    def load_or_create(directory: Path) -> OpsTokens:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        values = []
        for name in ("operator", "homeassistant"):
            path = directory / name
            if not path.exists():
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(secrets.token_urlsafe(32) + "\n")
            values.append(path.read_text().strip())
        return OpsTokens(*values)

    def allows(self, token: str, action: str) -> bool:
        if hmac.compare_digest(token.encode(), self.operator.encode()):
            return True
        return action not in OPERATOR_ONLY and hmac.compare_digest(token.encode(), self.homeassistant.encode())


class RequestRefused(EdgeswarmError):
    code = ReasonCode.REQUEST_REFUSED


@dataclass(frozen=True)
class KnownRelease:
    """A release that verified against the fleet's root: shown, scheduled and admitted by its hash."""

    manifest: ReleaseManifest
    payload_sha256: str


class FleetService:
    def __init__(self, fleet: str, store: FleetStore, tokens: OpsTokens, root: RootMetadata, *,
                 bridge: HomeAssistantBridge | None = None, identities: DeviceIdentities | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC), tick: float = 1.0) -> None:
        if root.fleet != fleet:
            raise ValueError(f"the trusted root is for fleet {root.fleet!r}, not {fleet!r}")
        self.fleet = fleet
        self.root = root
        self.store = store
        self.tokens = tokens
        self.bridge = bridge
        self.clock = clock
        self.tick = tick
        self.tracker = FleetTracker(fleet, clock=clock)
        self.identities = identities
        self._top_counters = store.top_counters()  # the highest report counter believed, per device
        # Devices whose latest recorded report a peer carried, with that report's time: their next newer
        # direct one is recorded as direct (the retained copy of the carried one, heard again after a
        # restart, is not newer). Any other direct report needs no write of how it was heard (a fleet
        # of 100,000 reports in bursts).
        self._relayed = store.relayed_devices()
        self.releases: dict[str, KnownRelease] = {}
        self._roots_ahead = RootsAhead()
        self._unverified: dict[str, bytes] = {}  # by topic: refused, maybe only for want of a newer root
        self.rollouts: dict[str, Rollout] = {}
        for device_class, raw in store.rollouts().items():
            self.rollouts[device_class] = Rollout.model_validate_json(raw)
        self._published: dict[str, bytes] = {}
        self._status_seen: dict[str, str] = {}
        self._dirty: set[str] = set()  # devices whose Home Assistant entity may have changed
        self._showing_all = True  # the fleet is small enough that every device has an entity
        self._unrecorded: list[DeviceState | ReportHeard | OnlineSeen] = []  # written to the store once per tick, in order
        # What the rollout engine reads, per class, kept as reports arrive: a tick reads it, never rebuilds it.
        self._members: dict[str, dict[str, Member]] = {}
        self._class_of: dict[str, str] = {}
        self._changed: set[str] = set()  # classes whose members changed since their status was last made

    # -- main loop ------------------------------------------------------------------------------

    async def run(self, client: MqttClient, stop: asyncio.Event) -> None:
        await self.tracker.subscribe(client)
        await client.subscribe(topics.all_devices_wildcard(self.fleet, "relay"))
        await client.subscribe(topics.root_wildcard(self.fleet))
        await client.subscribe(topics.releases_wildcard(self.fleet))
        await client.subscribe(topics.ops_wildcard(self.fleet))
        if self.bridge is not None:
            await client.subscribe(self.bridge.status_topic)
        # A broker drops what its ACL denies without telling anyone (Mosquitto grants the subscription
        # and never delivers): a marker sent to ourselves shows whether this login may do our job.
        probe, probe_topic = secrets.token_hex(16).encode(), topics.ops_probe_topic(self.fleet)
        await client.publish(probe_topic, probe, retain=False)
        stopper = asyncio.ensure_future(stop.wait())
        loop = asyncio.get_running_loop()
        next_advance = loop.time() + self.tick  # first let the retained reports of the fleet arrive
        probe_deadline: float | None = loop.time() + ACCESS_CHECK_SECONDS
        try:
            while not stop.is_set():
                if probe_deadline is not None and loop.time() > probe_deadline:
                    raise AccessDenied(
                        f"this broker login ({client.username or 'anonymous'}) may not write and read "
                        f"{topics.ops_wildcard(self.fleet)}: fleet serve needs the operator principal's "
                        "[mqtt] credentials (credentials/edgeswarm-operator.toml from `edgeswarm broker config`)")
                getter = asyncio.ensure_future(client.next_message())
                wait = max(0.0, min(next_advance, probe_deadline or next_advance) - loop.time())
                done, _ = await asyncio.wait({getter, stopper}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    message: Message | None = getter.result()
                    # A burst of reports is handled as it waits, up to a tick's worth, before the next wait.
                    for _ in range(RECORD_BATCH):
                        if message is None:
                            break
                        if message.topic == probe_topic:
                            if message.payload == probe and probe_deadline is not None:
                                log.info("broker login checked: it may write and read %s",
                                         topics.ops_wildcard(self.fleet))
                                probe_deadline = None
                        else:
                            await self.handle(client, message)
                        message = client.waiting_message() if loop.time() < next_advance else None
                else:
                    getter.cancel()
                # Once per tick, not per message: a burst of a thousand reports is one pass over the rollouts.
                if not stop.is_set() and loop.time() >= next_advance:
                    await self.advance(client)
                    next_advance = loop.time() + self.tick
        finally:
            stopper.cancel()
            self.flush()

    async def handle(self, client: MqttClient, message: Message) -> None:
        if self.tracker.handle(message):
            device, leaf = topics.device_from_topic(self.fleet, message.topic) or ("", "")
            self._track(device)
            view = self.tracker.devices.get(device)
            if view is None:
                return
            if leaf == "state" and view.state is not None and view.state.device == device:
                believed = self._believed_counter(view.state)
                direct = view.heard is None or view.heard.relayed_by is None
                carried_at = self._relayed.get(device)
                newer_direct = direct and carried_at is not None and view.state.timestamp > carried_at
                if believed is not None or newer_direct:
                    self._unrecorded.append(ReportHeard(view.state, view.heard or Heard(None, self.clock()), believed))
                    if newer_direct:
                        del self._relayed[device]
                else:
                    self._unrecorded.append(view.state)
            elif leaf == "online" and view.online is not None:
                self._unrecorded.append(OnlineSeen(device, view.online, self.clock()))
            if len(self._unrecorded) >= RECORD_BATCH:
                self.flush()
            self._dirty.add(device)
            return
        relayed = topics.device_from_topic(self.fleet, message.topic)
        if relayed is not None and relayed[1] == "relay":
            await self._on_carried(client, relayed[0], message.payload)
            return
        if topics.topic_matches_release(self.fleet, message.topic):
            self._on_release(message.topic, message.payload)
            return
        if topic_matches(topics.root_wildcard(self.fleet), message.topic):
            self._on_root(message.topic, message.payload)
            return
        if self.bridge is not None and message.topic == self.bridge.status_topic:
            if message.payload == b"online":
                # Home Assistant (re)started: send every entity again in case its broker lost them.
                self._published.clear()
                self._status_seen.clear()
                self._dirty |= set(self.tracker.devices)
            return
        parsed = topics.parse_ops_topic(self.fleet, message.topic)
        if parsed is not None and not message.retain:
            await self._on_request(client, parsed[0], parsed[1], message.payload)

    # -- reports peers carried -------------------------------------------------------------------

    def _key_of(self, device: str) -> PublicKey | None:
        return self.identities.public_key(device) if self.identities is not None else None

    def _believed_counter(self, state: DeviceState) -> int | None:
        """A direct report's counter, when the device's registered key signed it: it raises the highest
        counter a carried report of the device must pass."""
        if state.counter is None or state.signature is None:
            return None
        key = self._key_of(state.device)
        if key is None or not signed_by(state, key):
            return None
        self._top_counters[state.device] = max(self._top_counters.get(state.device, 0), state.counter)
        return state.counter

    async def _on_carried(self, client: MqttClient, relayer: str, raw: bytes) -> None:
        """A device's report that `relayer` carried for it: believed only as its signature and counter say."""
        try:
            state = judge_carried(raw, fleet=self.fleet, key_of=self._key_of, highest=self._top_counters.get)
        except ReportRefused as exc:
            # Copies come round again (a re-announcement reaching two relays): only real refusals warn.
            (log.debug if exc.code == ReasonCode.REPORT_REPLAYED else log.warning)(
                "refused a report %s carried: %s (%s)", relayer, exc, exc.code.value)
            return
        assert state.counter is not None
        self._top_counters[state.device] = state.counter
        view = self.tracker.carried(state, relayer)
        heard = Heard(relayer, self.clock())
        self._unrecorded.append(ReportHeard(state, heard, state.counter))
        if view is None:
            return  # older than the report held (one the device sent itself since): only its counter counts
        self._relayed[state.device] = state.timestamp
        log.info("%s: %s %s, report #%d carried by %s", state.device, state.phase.value, state.installed_version,
                 state.counter, relayer)
        self._track(state.device)
        self._dirty.add(state.device)
        # Retained on the device's own topic, for every reader of the fleet's state (`fleet status`,
        # Node-RED, a restarted service): the device's own next report replaces it.
        try:
            await self._publish(client, Retained(topics.state_topic(self.fleet, state.device), raw), force=True)
        except MqttError as exc:
            log.warning("could not retain %s's carried report on its state topic: %s", state.device, exc)

    def _on_release(self, topic: str, raw: bytes) -> None:
        """Record a release only if it verifies against the fleet's root (signatures of the release
        role, fleet, expiry), as devices do: an unsigned one is never shown nor rolled out."""
        try:
            manifest, payload = open_release(self.root, raw, self.clock(), max_bytes=MAX_REQUEST_BYTES)
        except TrustError as exc:
            log.warning("refusing the release on %s: %s", topic, exc)
            if len(self._unverified) < MAX_UNVERIFIED_CLASSES or topic in self._unverified:
                self._unverified[topic] = raw  # verified again once a newer root is walked
            return
        self._unverified.pop(topic, None)
        current = self.releases.get(manifest.device_class)
        if current is None or manifest.sequence >= current.manifest.sequence:
            self.releases[manifest.device_class] = KnownRelease(manifest, hashlib.sha256(payload).hexdigest())
            self._dirty |= {d for d, v in self.tracker.devices.items()
                            if v.state is not None and v.state.device_class == manifest.device_class}

    def _on_root(self, topic: str, raw: bytes) -> None:
        """Walk the root chain as devices do, so releases signed by rotated keys verify."""
        version = topics.root_version(topic)
        if version is None:
            return
        if len(raw) > MAX_REQUEST_BYTES or not self._roots_ahead.add(version, raw, self.root.version):
            return
        walked = False
        while (next_raw := self._roots_ahead.take_next(self.root.version)) is not None:
            try:
                self.root = next_root(self.root, next_raw, max_bytes=MAX_REQUEST_BYTES).root
            except TrustError as exc:
                log.warning("refusing root v%d: %s", self.root.version + 1, exc)
                break
            log.info("now trusting root v%d", self.root.version)
            walked = True
        if walked:
            for waiting_topic, waiting in list(self._unverified.items()):
                self._on_release(waiting_topic, waiting)

    # -- operator requests ----------------------------------------------------------------------

    async def _on_request(self, client: MqttClient, action: str, device: str | None, raw: bytes) -> None:
        model: type[StartRollout | ControlRollout | DeviceRequest]
        model = StartRollout if action == "rollout/start" else ControlRollout if action.startswith("rollout/") else DeviceRequest
        request_id = None
        try:
            request = model.from_bytes(raw, max_bytes=MAX_REQUEST_BYTES)
            request_id = request.request_id
            if not self.tokens.allows(request.token, action):
                raise RequestRefused("token not accepted for this request")
            message = await self._perform(client, action, device, request)
            ok = True
        except (MalformedDocument, pydantic.ValidationError) as exc:
            ok, message = False, f"malformed request: {exc}"[:1000]
        except (RequestRefused, ValueError) as exc:
            ok, message = False, str(exc)[:1000]
        (log.info if ok else log.warning)("%s%s: %s", action, f" {device}" if device else "", message)
        result = OpsResult(request_id=request_id, action=action, ok=ok, message=message, at=self.clock())
        try:
            await client.publish(topics.ops_results_topic(self.fleet), result.model_dump_json(exclude_none=True).encode())
        except MqttError as exc:
            # The request was performed; only its answer is late (a broker busy saving, a reconnect).
            # paho still sends it; the service must not exit over it.
            log.warning("the answer to %s was not acknowledged (%s); the request itself was performed", action, exc)

    async def _perform(self, client: MqttClient, action: str, device: str | None,
                       request: StartRollout | ControlRollout | DeviceRequest) -> str:
        now = self.clock()
        if isinstance(request, StartRollout):
            return self._start(request, now)
        if isinstance(request, ControlRollout):
            rollout = self.rollouts.get(request.device_class)
            if rollout is None:
                raise RequestRefused(f"no rollout for {request.device_class}")
            verb = action.split("/")[1]
            if verb == "pause":
                rollout.pause(request.reason)
            elif verb == "resume":
                rollout.resume(self._class_members(request.device_class))
            else:
                rollout.abort(request.reason)
            self._save(request.device_class)
            return f"rollout of {request.device_class} {rollout.plan.version}: {rollout.state.value}"
        assert device is not None
        if action == "device/install":
            return await self._install(client, device, now)
        if action == "device/check":
            await self._command(client, device, DeviceCommand(command=CommandName.CHECK))
            return f"{device}: asked to check for its release"
        return await self._retire(client, device)

    def _start(self, request: StartRollout, now: datetime) -> str:
        plan = request.plan
        known = self.releases.get(plan.device_class)
        release = known.manifest if known else None
        if known is None or release is None or release.version != plan.version:
            have = f"the latest is {release.version}" if release else "none is published"
            raise RequestRefused(f"{plan.device_class} {plan.version} is not the class's latest release ({have})")
        if release.rollout is None:
            raise RequestRefused(f"{plan.device_class} {plan.version} was released without --staged: every device "
                                 "installs it as soon as it verifies, there is nothing to roll out")
        current = self.rollouts.get(plan.device_class)
        if current is not None and current.state in (RolloutState.RUNNING, RolloutState.PAUSED):
            raise RequestRefused(f"a rollout of {plan.device_class} {current.plan.version} is {current.state.value}: "
                                 "abort it first")
        self.rollouts[plan.device_class] = Rollout(plan=plan, sequence=release.sequence, salt=release.rollout.salt,
                                                   release_sha256=known.payload_sha256, wave_started=now)
        self._save(plan.device_class)
        return (f"rollout of {plan.device_class} {plan.version} started: {len(plan.waves)} wave(s), "
                f"soak {plan.soak_seconds} s, pause above {plan.max_failed_percent}% failed")

    async def _install(self, client: MqttClient, device: str, now: datetime) -> str:
        view = self.tracker.devices.get(device)
        if view is None or view.state is None:
            raise RequestRefused(f"no device {device!r} has reported")
        known = self.releases.get(view.state.device_class)
        if known is None:
            raise RequestRefused(f"no release is published for {view.state.device_class}")
        release = known.manifest
        if view.state.installed_version == release.version:
            return f"{device} runs {release.version} already"
        if release.rollout is None:
            await self._command(client, device, DeviceCommand(command=CommandName.CHECK))
            return f"{device}: asked to install {release.version}"
        rollout = self.rollouts.get(release.device_class)
        if rollout is not None and rollout.sequence == release.sequence and rollout.state in (
                RolloutState.PAUSED, RolloutState.ABORTED):
            raise RequestRefused(f"the rollout of {release.device_class} {release.version} is {rollout.state.value}: "
                                 f"{device} is not installed while it is")
        await self._command(client, device, DeviceCommand(command=CommandName.INSTALL, sequence=release.sequence,
                                                          release_sha256=known.payload_sha256))
        if rollout is not None and rollout.sequence == release.sequence:
            rollout.commanded[device] = now
            self._save(release.device_class)
        return f"{device}: told to install {release.version} (sequence {release.sequence})"

    async def _retire(self, client: MqttClient, device: str) -> str:
        self.flush()  # a report still waiting would bring the device back after it is deleted
        known = self.store.retire(device)
        self.tracker.devices.pop(device, None)
        self._track(device)
        self._dirty.discard(device)
        cleared = [Retained(topics.state_topic(self.fleet, device), b""),
                   Retained(topics.online_topic(self.fleet, device), b"")]
        for message in cleared + (self.bridge.retire(device) if self.bridge else []):
            await self._publish(client, message, force=True)
        return f"{device} retired" if known else f"{device} was not tracked; its retained topics are cleared"

    async def _command(self, client: MqttClient, device: str, command: DeviceCommand) -> None:
        await client.publish(topics.command_topic(self.fleet, device), command.canonical_bytes())

    # -- rollouts and Home Assistant ------------------------------------------------------------

    def flush(self) -> None:
        """Write the reports heard since the last tick to the fleet record, in one transaction."""
        if self._unrecorded:
            batch, self._unrecorded = self._unrecorded, []
            self.store.record(batch)

    def _track(self, device: str) -> None:
        view = self.tracker.devices.get(device)
        before = self._class_of.pop(device, None)
        if before is not None:
            self._members[before].pop(device, None)
            self._changed.add(before)
        if view is None or view.state is None:
            return
        s = view.state
        self._class_of[device] = s.device_class
        self._changed.add(s.device_class)
        self._members.setdefault(s.device_class, {})[device] = Member(
            device, s.installed_version, s.phase, s.target_version, view.online, bool(s.retrying))

    def _class_members(self, device_class: str) -> dict[str, Member]:
        return self._members.get(device_class, {})

    def _admission_hash(self, device_class: str, rollout: Rollout) -> str | None:
        """The hash install commands of this rollout name; a rollout persisted before hashes were
        recorded takes the verified release's, if it is the same sequence."""
        if rollout.release_sha256 is not None:
            return rollout.release_sha256
        known = self.releases.get(device_class)
        if known is not None and known.manifest.sequence == rollout.sequence:
            return known.payload_sha256
        return None

    def _save(self, device_class: str) -> None:
        self.store.save_rollout(device_class, self.rollouts[device_class].model_dump_json())
        self._changed.add(device_class)  # its status is made again at the next tick

    async def advance(self, client: MqttClient) -> None:
        self.store.check_leading()  # a service that lost the record's lock stops deciding at once
        self.flush()
        now = self.clock()
        for device_class, rollout in self.rollouts.items():
            members = self._class_members(device_class)
            before = rollout.progress()
            admits = self._admission_hash(device_class, rollout)
            commands = rollout.step(members, now) if admits else []
            if commands:
                log.info("rollout %s %s wave %d: install commands to %d device(s): %s%s", device_class,
                         rollout.plan.version, rollout.wave_index + 1, len(commands), ", ".join(commands[:10]),
                         ", ..." if len(commands) > 10 else "")
                install = DeviceCommand(command=CommandName.INSTALL, sequence=rollout.sequence, release_sha256=admits)
                for start in range(0, len(commands), COMMAND_BATCH):
                    await asyncio.gather(*(self._command(client, d, install)
                                           for d in commands[start:start + COMMAND_BATCH]))
            if commands or rollout.progress() != before:
                self._save(device_class)
            elif device_class not in self._changed and device_class in self._status_seen:
                continue  # nothing it counts changed: the status is the one published (its time aside)
            self._changed.discard(device_class)
            status = rollout.status(members, now)
            topic = topics.rollout_status_topic(self.fleet, device_class)
            meaning = status.model_dump_json(exclude={"updated"})  # a new time alone is no news
            if self._status_seen.get(device_class) != meaning:
                self._status_seen[device_class] = meaning
                await self._publish(client, Retained(topic, status.model_dump_json(exclude_none=True).encode()))
                if self.bridge is not None:
                    for message in self.bridge.rollout(status):
                        await self._publish(client, message)
        if self.bridge is not None:
            size = len(self.tracker.devices)
            showing_all = size <= self.bridge.all_devices_up_to
            if showing_all != self._showing_all:  # the fleet crossed the limit: every entity is decided again
                self._showing_all = showing_all
                self._dirty |= set(self.tracker.devices)
            dirty, self._dirty = self._dirty, set()
            for device in sorted(dirty):
                view = self.tracker.devices.get(device)
                if view is None or view.state is None:
                    continue
                if not self.bridge.shows(device, size):
                    if self._published.get(self.bridge.discovery_topic(device)):  # shown before: removed now
                        for message in self.bridge.retire(device):
                            await self._publish(client, message)
                    continue
                known = self.releases.get(view.state.device_class)
                for message in self.bridge.device(view.state, known.manifest if known else None):
                    await self._publish(client, message)

    async def _publish(self, client: MqttClient, message: Retained, *, force: bool = False) -> None:
        if not force and self._published.get(message.topic) == message.payload:
            return
        await client.publish(message.topic, message.payload, retain=True)
        self._published[message.topic] = message.payload
