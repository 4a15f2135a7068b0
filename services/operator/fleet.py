"""Fleet tracking: the latest state and online status of every device, from their retained topics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import pydantic

from schemas import topics
from schemas.canonical import MalformedDocument
from schemas.models import DeviceState
from services.runtime.messaging import Message, MqttClient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Heard:
    """How a device's latest report reached the fleet service: on its own topic, or carried by a peer."""

    relayed_by: str | None  # None: direct (the broker's login vouches); else the peer that handed it on
    at: datetime

    def describe(self, state: DeviceState | None = None) -> str:
        return describe_heard(self.relayed_by, state.tunnel_via if state is not None else None)


def describe_heard(relayed_by: str | None, tunnel_via: str | None = None) -> str:
    """How `fleet status` says a report came: "direct", "tunnel via <peer>" (sent by the device itself,
    through a peer's tunnel to the broker), or "relayed by <peer>" (a signed report a peer handed on)."""
    if relayed_by is not None:
        return f"relayed by {relayed_by}"
    return "direct" if tunnel_via is None else f"tunnel via {tunnel_via}"


@dataclass
class DeviceView:
    device: str
    state: DeviceState | None = None
    online: bool | None = None
    heard: Heard | None = None

    def accept(self, state: DeviceState, heard: Heard) -> bool:
        """Take `state` unless the report held is newer by both its counter and its time (a report queued
        while offline arriving after a peer carried a later one); False when it is not taken."""
        held = self.state
        if (held is not None and held.counter is not None and state.counter is not None
                and state.counter <= held.counter and state.timestamp <= held.timestamp):
            return False
        self.state, self.heard = state, heard
        return True


@dataclass(frozen=True)
class StatusLine:
    """One device as `fleet status` shows it; before its first report only `device` and `online`."""

    device: str
    online: bool | None
    device_class: str = "?"
    installed_version: str | None = None
    phase: str | None = None
    progress: int | None = None
    reason: str | None = None
    reported: datetime | None = None
    heard: str | None = None  # "direct" or "relayed by <peer>" (Heard.describe); None when not known
    heard_at: datetime | None = None

    @classmethod
    def of(cls, view: DeviceView) -> StatusLine:
        s = view.state
        if s is None:
            return cls(view.device, view.online)
        heard = view.heard
        return cls(view.device, view.online, s.device_class, s.installed_version, s.phase.value, s.progress, s.reason,
                   s.timestamp, heard.describe(s) if heard else None, heard.at if heard else None)


class FleetTracker:
    def __init__(self, fleet: str, *, max_message_bytes: int = 64 * 1024,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.fleet = fleet
        self.clock = clock
        self.max_message_bytes = max_message_bytes
        self.devices: dict[str, DeviceView] = {}
        self.changed = asyncio.Event()

    async def subscribe(self, client: MqttClient) -> None:
        await client.subscribe(topics.all_devices_wildcard(self.fleet, "state"))
        await client.subscribe(topics.all_devices_wildcard(self.fleet, "online"))

    def handle(self, message: Message) -> bool:
        """Take one message; returns whether it was a device topic of this fleet."""
        parsed = topics.device_from_topic(self.fleet, message.topic)
        if parsed is None:
            return False
        device, leaf = parsed
        if leaf not in ("state", "online"):
            return False
        if not message.payload and leaf in ("state", "online"):
            self.devices.pop(device, None)  # a retained message cleared: the device was retired
            self.changed.set()
            return True
        view = self.devices.setdefault(device, DeviceView(device))
        if leaf == "online":
            view.online = message.payload == b"online"
        elif leaf == "state":
            try:
                state = DeviceState.from_bytes(message.payload, max_bytes=self.max_message_bytes)
            except (MalformedDocument, pydantic.ValidationError) as exc:
                log.warning("ignoring malformed state from %s: %s", device, exc)
                return True
            if state.device != device:
                log.warning("ignoring state on %s's topic claiming to be %s", device, state.device)
                return True
            if not view.accept(state, Heard(None, self.clock())):
                return True
        self.changed.set()
        return True

    def carried(self, state: DeviceState, relayed_by: str) -> DeviceView | None:
        """Take a report a peer carried, which services.operator.report_trust believed; the device's view
        if it was taken."""
        view = self.devices.setdefault(state.device, DeviceView(state.device))
        if not view.accept(state, Heard(relayed_by, self.clock())):
            return None
        self.changed.set()
        return view

    async def follow(self, client: MqttClient, duration: float | None = None, *, settle: float | None = None) -> None:
        """Consume messages for `duration` seconds (forever if None); with `settle`, go on after that
        until no message came for `settle` seconds (a large fleet's retained reports still arriving)."""
        loop = asyncio.get_running_loop()
        end = None if duration is None else loop.time() + duration
        while True:
            timeout = None if end is None else end - loop.time()
            if timeout is not None and timeout <= 0:
                if settle is None:
                    return
                timeout = settle
            try:
                message = await client.next_message(timeout)
            except TimeoutError:
                return
            self.handle(message)

    def by_class(self) -> dict[str, list[DeviceView]]:
        groups: dict[str, list[DeviceView]] = {}
        for view in sorted(self.devices.values(), key=lambda v: v.device):
            cls = view.state.device_class if view.state else "?"
            groups.setdefault(cls, []).append(view)
        return groups
