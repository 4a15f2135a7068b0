"""The device simulator against a real (embedded) broker: the agent's trust rules and state machine,
many devices on one event loop, each with its own session and its own reports on the wire."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from device_client.simulator import SimulatedDeviceSpec, SimulatedFleet, SimulatedFleetConfig
from schemas import topics
from schemas.models import DeviceState, Phase
from services.operator.broker import EmbeddedBroker
from services.runtime.keys import SigningKey
from services.runtime.messaging import MqttClient
from tests.support.factories import (
    SHA_V1,
    TARGET,
    Keyring,
    manifest,
    sign_release,
    sign_root,
    sign_timestamp,
    timestamp,
)

pytestmark = pytest.mark.integration

FLEET, CLASS = "f1", "ipc"


async def _latest_states(watcher: MqttClient, into: dict[str, DeviceState]) -> None:
    while True:
        message = await watcher.next_message()
        state = DeviceState.model_validate_json(message.payload)
        into[state.device] = state


async def _until(check, timeout: float = 30) -> None:  # noqa: ANN001
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.05)


def test_simulated_devices_verify_with_the_agents_rules_and_report_on_their_own_topics(tmp_path: Path) -> None:
    keys = Keyring()
    now = datetime.now(UTC)
    root_raw = sign_root(keys.root_metadata(fleet=FLEET, expires=now + timedelta(days=365)), keys.root[:2])
    (tmp_path / "root.json").write_bytes(root_raw)
    good = sign_release(manifest(issued=now - timedelta(minutes=5), expires=now + timedelta(days=30)), keys.release[:2])
    stamp = sign_timestamp(timestamp(keys, {CLASS: (2, good)}, fleet=FLEET, expires=now + timedelta(hours=1)),
                           keys.timestamp)
    # Signed, well formed, newer, named by no timestamp and by keys the root does not know.
    strangers = [SigningKey.generate("release") for _ in range(2)]
    forged = sign_release(manifest(version="3.0.0", sequence=3, issued=now, expires=now + timedelta(days=30)), strangers)
    count, failing = 12, {"sim-03", "sim-07"}
    specs = [SimulatedDeviceSpec(device_id=f"sim-{i:02d}", device_class=CLASS, installed_version="1.0.0",
                                 installed_sha256=SHA_V1, failing_versions=["2.0.0"] if f"sim-{i:02d}" in failing else [])
             for i in range(count)]

    async def scenario() -> None:
        async with EmbeddedBroker("127.0.0.1", 0) as broker:
            config = SimulatedFleetConfig(fleet=FLEET, trusted_root=tmp_path / "root.json", host="127.0.0.1",
                                          port=broker.port, install_target=TARGET, keepalive=10, devices=specs)
            async with MqttClient("127.0.0.1", broker.port, "operator", clean_session=True) as operator:
                await operator.subscribe(topics.all_devices_wildcard(FLEET, "state"))
                states: dict[str, DeviceState] = {}
                reader = asyncio.ensure_future(_latest_states(operator, states))
                await operator.publish(topics.root_topic(FLEET, 1), root_raw, retain=True)
                await operator.publish(topics.timestamp_topic(FLEET), stamp, retain=True)
                await operator.publish(topics.release_topic(FLEET, CLASS), good, retain=True)
                try:
                    async with SimulatedFleet(config) as fleet:
                        assert all(d.timeline.subscribed_at is not None for d in fleet.devices)
                        await _until(lambda: len(states) == count and all(
                            s.phase in (Phase.DONE, Phase.FAILED) for s in states.values()))
                        for device in fleet.devices:
                            state = states[device.spec.device_id]
                            assert "2.0.0" in device.timeline.verified
                            if device.spec.device_id in failing:
                                assert (state.phase, state.installed_version, state.reason_code) == \
                                    (Phase.FAILED, "1.0.0", "install_failed")
                            else:
                                assert (state.phase, state.installed_version, state.last_sequence) == \
                                    (Phase.DONE, "2.0.0", 2)
                                assert state.installed_sha256 == manifest().artifact.sha256

                        await operator.publish(topics.release_topic(FLEET, CLASS), forged, retain=True)
                        await _until(lambda: all(s.phase == Phase.REFUSED for s in states.values()))
                        for device in fleet.devices:
                            state = states[device.spec.device_id]
                            assert state.installed_version == ("1.0.0" if device.spec.device_id in failing else "2.0.0")
                            assert state.reason_code in ("unknown_key", "threshold_not_met", "bad_signature")
                            assert "3.0.0" not in device.timeline.verified
                            assert device.timeline.refused
                finally:
                    reader.cancel()

    asyncio.run(scenario())
