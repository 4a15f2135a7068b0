"""Many simulated devices in one process, speaking the real protocol: for load tests and benchmarks.

Each simulated device has its own MQTT login and persistent session (client id = device id, last
will and birth on its online topic), subscribes to what a real agent subscribes to, and runs the
real cores: every root, timestamp and release goes through `TrustIntake` (the agent's trust rules,
with its own root and floors per device), and every decision and report comes from the agent's
state machine (device_client.machine), published with the agent's `Reporter`. Only the update
itself is simulated: `RunUpdate` enters the download and install phases and succeeds, or fails
for the versions a device is told fail (`failing_versions`); nothing is fetched and nothing on disk changes. The freshness timer
and the journal of a real agent are left out (nothing is installed, so there is nothing to undo).

All devices of a process share one event loop; their paho clients are driven by it (no thread per
client). Run a process per core or so:

    python -m device_client.simulator FLEET.json

FLEET.json is a `SimulatedFleetConfig`. The process prints one JSON line when every device has
connected and subscribed (or failed to), then reads commands on stdin: `status` prints how many
devices are connected now; `stop` (or the end of stdin) disconnects them all and prints a last line
with every device's timeline (`SimulatedFleetResult`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import resource
import sys
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from device_client import machine
from device_client.local_state import LocalState
from device_client.machine import AgentState, MachineConfig
from device_client.reporter import Reporter
from device_client.trust_intake import TrustIntake, command_event
from schemas import topics
from schemas.errors import ReasonCode
from schemas.models import OFFLINE, ONLINE, Phase, RootMetadata
from services.runtime.messaging import Message, MqttClient, MqttError, SubscriptionRefused, Will, topic_matches
from services.runtime.trust import TrustedSet

log = logging.getLogger(__name__)


class SimulatedDeviceSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    device_id: str
    device_class: str
    installed_version: str
    installed_sha256: str
    username: str | None = None
    password: str | None = None
    failing_versions: list[str] = []  # the updates to these versions fail (install_failed), as on a broken unit


class SimulatedFleetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fleet: str
    trusted_root: Path  # the signed root every device was provisioned with
    host: str
    port: int
    ca_file: Path | None = None
    keepalive: int = 60
    install_target: str = "/opt/app/current"
    max_message_bytes: int = 65536
    update_seconds: float = 0.0  # how long a simulated update takes between its download and install phases
    connecting_at_once: int = 200
    devices: list[SimulatedDeviceSpec]


class DeviceTimeline(BaseModel):
    """Wall-clock times (time.time()) of what happened to one device, comparable across processes."""

    device: str
    subscribed_at: float | None = None
    connect_error: str | None = None
    verified: dict[str, float] = Field(default_factory=dict)  # version -> when the trust core accepted it
    refused: list[str] = Field(default_factory=list)  # reasons of refused documents
    reported_at: list[float] = Field(default_factory=list)
    last_phase: str | None = None
    installed_version: str


class SimulatedFleetResult(BaseModel):
    devices: list[DeviceTimeline]


class SimulatedDevice:
    def __init__(self, spec: SimulatedDeviceSpec, config: SimulatedFleetConfig, root: RootMetadata) -> None:
        self.spec = spec
        self.fleet = config.fleet
        self.max_message_bytes = config.max_message_bytes
        self.update_seconds = config.update_seconds
        trusted = TrustedSet(root, device_class=spec.device_class, install_target=config.install_target,
                             max_document_bytes=config.max_message_bytes)
        self.intake = TrustIntake(trusted, max_message_bytes=config.max_message_bytes)  # nothing persisted
        self.machine_config = MachineConfig(device_id=spec.device_id)
        self.state = AgentState(local=LocalState(installed_version=spec.installed_version,
                                                 installed_sha256=spec.installed_sha256))
        online = topics.online_topic(config.fleet, spec.device_id)
        self.client = MqttClient(
            config.host, config.port, spec.device_id, clean_session=False, will=Will(online, OFFLINE),
            birth=Will(online, ONLINE), username=spec.username, password=spec.password, ca_file=config.ca_file,
            keepalive=config.keepalive, max_payload_bytes=config.max_message_bytes, driver="loop",
            connect_timeout=120.0,
        )
        self.reporter = Reporter(self.client, fleet=config.fleet, device=spec.device_id, device_class=spec.device_class)
        self.timeline = DeviceTimeline(device=spec.device_id, installed_version=spec.installed_version)
        self._listener: asyncio.Task[None] | None = None
        self._retry: asyncio.TimerHandle | None = None

    def subscriptions(self) -> list[str]:
        s = self.spec
        return [topics.root_wildcard(self.fleet), topics.timestamp_topic(self.fleet),
                topics.release_topic(self.fleet, s.device_class), topics.command_topic(self.fleet, s.device_id)]

    async def start(self) -> None:
        """Connect, subscribe as the agent does, and start listening.

        Raises:
            MqttError: the broker refused or did not answer the connection or a subscription.
        """
        await self.client.connect()
        for topic in self.subscriptions():
            await self.client.subscribe(topic)
        self.timeline.subscribed_at = time.time()
        self._listener = asyncio.ensure_future(self._listen())
        await self._feed(machine.Started())

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
        if self._retry is not None:
            self._retry.cancel()
        try:
            await self.client.publish(topics.online_topic(self.fleet, self.spec.device_id), OFFLINE, retain=True, timeout=5)
        except MqttError:
            pass  # its will says it
        await self.client.disconnect()

    async def _listen(self) -> None:
        while True:
            message = await self.client.next_message()
            try:
                await self._dispatch(message)
            except MqttError as exc:
                log.warning("%s: %s", self.spec.device_id, exc)
            except Exception as exc:  # noqa: BLE001 - as the agent: reported, and the device goes on
                log.exception("%s: internal error", self.spec.device_id)
                await self._feed(machine.InternalError(f"internal error: {type(exc).__name__}: {exc}"[:1000]))

    async def _dispatch(self, message: Message) -> None:
        size = message.dropped_bytes or len(message.payload)
        if size > self.max_message_bytes:
            await self._feed(machine.TrustDocumentRefused(ReasonCode.MALFORMED, f"message of {size} bytes"))
            return
        fleet, s = self.fleet, self.spec
        if message.topic == topics.release_topic(fleet, s.device_class):
            await self._feed(machine.ReleaseHeard(message.payload))
        elif topic_matches(topics.root_wildcard(fleet), message.topic):
            if (version := topics.root_version(message.topic)) is None:
                return
            for event in self.intake.root_heard(version, message.payload):
                await self._feed(event)
        elif message.topic == topics.timestamp_topic(fleet):
            await self._feed(self.intake.timestamp_heard(message.payload))
        elif message.topic == topics.command_topic(fleet, s.device_id):
            await self._feed(command_event(message.payload, max_bytes=self.max_message_bytes))

    async def _feed(self, event: machine.Event) -> None:
        """As the agent's: one step, then each action performed and its outcome fed back, depth first."""
        if isinstance(event, machine.ReleaseVerified):
            self.timeline.verified.setdefault(event.manifest.version, time.time())
        elif isinstance(event, (machine.ReleaseRefused, machine.TrustDocumentRefused)):
            self.timeline.refused.append(f"{event.code.value}: {event.reason}"[:300])
        self.state, actions = machine.step(self.state, event, self.machine_config)
        for action in actions:
            follow = await self._perform(action)
            if follow is not None:
                await self._feed(follow)

    async def _perform(self, action: machine.Action) -> machine.Event | None:
        match action:
            case machine.Report():
                await self._report(action)
            case machine.Verify(raw=raw, resuming=resuming):
                return self.intake.verify_release(raw, self.state.local, resuming=resuming)
            case machine.RunUpdate(manifest=m):
                await self._feed(machine.PhaseEntered(Phase.DOWNLOADING, m.version, 0))
                if self.update_seconds:
                    await asyncio.sleep(self.update_seconds)
                await self._feed(machine.PhaseEntered(Phase.INSTALLING, m.version, 90))
                if m.version in self.spec.failing_versions:
                    return machine.UpdateFailed(m, ReasonCode.INSTALL_FAILED, "simulated install failure")
                return machine.UpdateSucceeded(m, figures={"used_delta": False, "update_millis": 0})
            case machine.ScheduleRetry(seconds=seconds):
                loop = asyncio.get_running_loop()
                self._retry = loop.call_later(seconds, lambda: asyncio.ensure_future(self._feed(machine.RetryDue())))
            case _:
                pass  # KeepReleases, RollBack, ClearSwitch: nothing is held or installed here
        return None

    async def _report(self, report: machine.Report) -> None:
        await self.reporter.report_transition(report, self.state.local)
        self.timeline.reported_at.append(time.time())
        self.timeline.last_phase = report.phase.value
        self.timeline.installed_version = self.state.local.installed_version


class SimulatedFleet:
    """`async with SimulatedFleet(config) as fleet:` connects every device (at most
    `connecting_at_once` at a time); leaving disconnects them."""

    def __init__(self, config: SimulatedFleetConfig) -> None:
        root = TrustedSet.load_initial_root(config.trusted_root.read_bytes(), max_document_bytes=config.max_message_bytes)
        if root.fleet != config.fleet:
            raise ValueError(f"trusted root is for fleet {root.fleet!r}, not {config.fleet!r}")
        self.devices = [SimulatedDevice(spec, config, root) for spec in config.devices]
        self._at_once = asyncio.Semaphore(config.connecting_at_once)

    async def __aenter__(self) -> SimulatedFleet:
        await asyncio.gather(*(self._start(d) for d in self.devices))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.gather(*(d.stop() for d in self.devices if d.timeline.subscribed_at is not None))

    async def _start(self, device: SimulatedDevice) -> None:
        async with self._at_once:
            try:
                await device.start()
            except (MqttError, SubscriptionRefused) as exc:
                device.timeline.connect_error = str(exc)[:300]
                log.error("%s: %s", device.spec.device_id, exc)

    def result(self) -> SimulatedFleetResult:
        return SimulatedFleetResult(devices=[d.timeline for d in self.devices])


def _raise_open_files_limit() -> None:
    """Every device holds a socket: thousands of them need more than the usual 1024 descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _serve(config: SimulatedFleetConfig) -> None:
    started = time.time()
    async with SimulatedFleet(config) as fleet:
        failed = [d.spec.device_id for d in fleet.devices if d.timeline.connect_error is not None]
        print(f'{{"event": "ready", "devices": {len(fleet.devices)}, "failed": {len(failed)}, '
              f'"started_at": {started}, "ready_at": {time.time()}}}', flush=True)
        while (command := (await asyncio.to_thread(sys.stdin.readline)).strip()) not in ("", "stop"):
            if command == "status":
                connected = sum(1 for d in fleet.devices if d.client.connected)
                print(f'{{"event": "status", "connected": {connected}, "at": {time.time()}}}', flush=True)
            else:
                print(f'{{"event": "unknown", "command": {json.dumps(command)}}}', flush=True)
    print(fleet.result().model_dump_json(), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m device_client.simulator", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="a SimulatedFleetConfig as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    _raise_open_files_limit()
    asyncio.run(_serve(SimulatedFleetConfig.model_validate_json(args.config.read_text())))


if __name__ == "__main__":
    main()
