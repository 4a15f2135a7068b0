"""Fleet tracking: the latest state and online status of every device, from their retained topics."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime

import pydantic

from schemas import topics
from schemas.canonical import MalformedDocument
from schemas.models import DeviceState
from services.runtime.messaging import Message, MqttClient

log = logging.getLogger(__name__)


@dataclass
class DeviceView:
    device: str
    state: DeviceState | None = None
    online: bool | None = None


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

    @classmethod
    def of(cls, view: DeviceView) -> StatusLine:
        s = view.state
        if s is None:
            return cls(view.device, view.online)
        return cls(view.device, view.online, s.device_class, s.installed_version, s.phase.value, s.progress, s.reason,
                   s.timestamp)


class FleetTracker:
    def __init__(self, fleet: str, *, max_message_bytes: int = 64 * 1024) -> None:
        self.fleet = fleet
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
            view.state = state
        self.changed.set()
        return True

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
