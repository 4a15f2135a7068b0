"""Past [homeassistant] all_devices_up_to devices, only the selected devices keep an entity: the
fleet service removes the others' discovery when the fleet grows past the limit."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest

from schemas import topics
from schemas.models import DeviceState, Phase
from services.operator.broker import EmbeddedBroker
from services.operator.fleet_service import FleetService, OpsTokens
from services.operator.fleet_store import FleetStore
from services.operator.homeassistant import HomeAssistantBridge
from services.runtime.messaging import Message, MqttClient
from services.runtime.trust import TrustedSet
from tests.support.factories import Keyring, sign_root

pytestmark = pytest.mark.integration


def _report(device: str) -> Message:
    state = DeviceState(device=device, fleet="f1", device_class="gw", installed_version="1.0.0",
                        installed_sha256="1" * 64, phase=Phase.IDLE, timestamp=datetime.now(UTC))
    return Message(topics.state_topic("f1", device), state.canonical_bytes(), True, 1)


def test_a_large_fleet_shows_only_the_selected_devices_in_home_assistant(tmp_path: Path) -> None:
    keys = Keyring()
    root = TrustedSet.load_initial_root(sign_root(keys.root_metadata(), keys.root[:2]))
    bridge = HomeAssistantBridge("f1", "homeassistant", "t" * 32, all_devices_up_to=3, selected=["gw-1", "plant-*"])
    service = FleetService("f1", FleetStore.sqlite(tmp_path / "fleet.sqlite"), OpsTokens.load_or_create(tmp_path / "tokens"),
                           root, bridge=bridge)

    async def entities(port: int) -> set[str]:
        found: dict[str, bytes] = {}
        async with MqttClient("127.0.0.1", port, "home-assistant", clean_session=True) as ha:
            await ha.subscribe("homeassistant/update/#")
            try:
                while True:
                    message = await ha.next_message(1.0)
                    found[message.topic] = message.payload
            except TimeoutError:
                pass
        return {topic for topic, payload in found.items() if payload}  # an empty retained message removes one

    async def scenario() -> tuple[set[str], set[str]]:
        async with EmbeddedBroker("127.0.0.1", 0) as broker, \
                MqttClient("127.0.0.1", broker.port, "service", clean_session=True) as client:
            for device in ("gw-0", "gw-1", "plant-9"):
                await service.handle(client, _report(device))
            await service.advance(client)
            small = await entities(broker.port)
            for device in ("gw-2", "gw-3"):  # five devices: past the limit of three
                await service.handle(client, _report(device))
            await service.advance(client)
            return small, await entities(broker.port)

    small, large = asyncio.run(scenario())
    assert small == {bridge.discovery_topic(d) for d in ("gw-0", "gw-1", "plant-9")}
    assert large == {bridge.discovery_topic(d) for d in ("gw-1", "plant-9")}
    assert bridge.shows("gw-1", 10_000) and bridge.shows("plant-7-a", 10_000) and not bridge.shows("gw-10", 10_000)
