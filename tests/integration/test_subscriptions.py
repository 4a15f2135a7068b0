"""A subscription the broker refuses is said and asked again, never a silent gap (issue 19, item 5).

A broker answers SUBSCRIBE with a SUBACK that may refuse it (an ACL; a broker at its subscription
limit, as NATS's MQTT gateway was at 200 of 2,000). A device that took every SUBACK as granted never
heard its commands or releases and nobody knew. The agent keeps running on what it does hear, says
which subscription was refused on its state topic, asks again (jittered, backing off) and clears
the reason once the broker grants it.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from schemas import topics
from schemas.errors import ReasonCode
from schemas.models import CommandName, DeviceCommand, Phase
from tests.support.harness import FLEET, Fleet, StateWatcher
from tests.support.refusing_broker import RefusingBroker

pytestmark = pytest.mark.integration
DEVICE = "refused-1"


def test_a_refused_subscription_is_said_on_the_state_topic_and_asked_again_until_granted(
        fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    command_topic = topics.command_topic(FLEET, DEVICE)
    refused = {command_topic}
    monkeypatch.setenv("EDGESWARM_LIMITS__RESUBSCRIBE_INTERVAL", "1")
    monkeypatch.setenv("EDGESWARM_LIMITS__FREEZE_GRACE", "600")  # no timestamps on this broker: not frozen meanwhile
    with RefusingBroker(refused) as broker:
        watcher = StateWatcher(broker.port)
        try:
            device = fleet.add_device(DEVICE, "ipc-x86_64", broker=(broker.port, None))
            said = watcher.wait(DEVICE, lambda s: s.reason_code == ReasonCode.BROKER_ERROR.value, timeout=90)
            assert said.phase == Phase.IDLE, "no update outcome: the phase the fleet counts stays"
            assert said.reason is not None and f"refused the subscription to {command_topic}" in said.reason

            # Asked again while still refused (1 s, then 2 s: backing off), and the agent keeps running.
            deadline = time.monotonic() + 30
            while fleet.log(DEVICE).count(f"refused the subscription to {command_topic}") < 3:
                assert time.monotonic() < deadline, fleet.log(DEVICE)[-3000:]
                time.sleep(0.2)
            assert device.process.alive()
            assert watcher.states[DEVICE].reason_code == ReasonCode.BROKER_ERROR.value, "a refusal that repeats is said once"

            refused.clear()
            cleared = watcher.wait(DEVICE, lambda s: s.reason_code is None, timeout=60)
            assert cleared.phase == Phase.IDLE
            assert "every subscription is granted again" in fleet.log(DEVICE)

            # Granted for real: a command on that topic now reaches the device, which answers it.
            asked = datetime.now(UTC)
            watcher.publish(command_topic, DeviceCommand(command=CommandName.REPORT).canonical_bytes(), retain=False)
            watcher.wait(DEVICE, lambda s: s.timestamp > asked, timeout=30)
        finally:
            watcher.close()
            fleet.devices[DEVICE].process.stop()
