"""The embedded broker delivers retained messages to subscribers of their topic, and only to them."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from services.operator.broker import EmbeddedBroker
from services.runtime.messaging import MqttClient, SubscriptionRefused, Will

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("driver", ["thread", "loop"])  # paho's thread per client, or driven by the event loop
def test_retained_messages_reach_only_clients_subscribed_to_their_topic(driver: str) -> None:
    async def scenario() -> list[str]:
        async with EmbeddedBroker("127.0.0.1", 0) as broker:
            port = broker.port
            async with MqttClient("127.0.0.1", port, "publisher", clean_session=True, driver=driver) as pub:
                await pub.publish("edgeswarm/f/releases/gateway", b"for gateways", retain=True)
                await pub.publish("edgeswarm/f/releases/ipc", b"for ipcs", retain=True)
            async with MqttClient("127.0.0.1", port, "gateway-1", driver=driver) as gateway:
                await gateway.subscribe("edgeswarm/f/releases/gateway")
                async with MqttClient("127.0.0.1", port, "ipc-1", driver=driver) as ipc:
                    await ipc.subscribe("edgeswarm/f/releases/ipc")
                    received = []
                    while True:
                        try:
                            received.append((await ipc.next_message(1.0)).topic)
                        except TimeoutError:
                            return received

    assert asyncio.run(scenario()) == ["edgeswarm/f/releases/ipc"]


@pytest.mark.parametrize("driver", ["thread", "loop"])  # paho's thread per client, or driven by the event loop
def test_a_client_that_dies_gets_its_last_will_published(driver: str) -> None:
    async def scenario() -> bytes:
        async with EmbeddedBroker("127.0.0.1", 0) as broker:
            port = broker.port
            device = MqttClient("127.0.0.1", port, "device", will=Will("dev/online", b"offline"), birth=Will("dev/online", b"online"),
                                driver=driver)
            await device.connect()
            async with MqttClient("127.0.0.1", port, "watcher", clean_session=True) as watcher:
                await watcher.subscribe("dev/online")
                assert (await watcher.next_message(5)).payload == b"online"
                device.abort()
                return (await watcher.next_message(10)).payload

    assert asyncio.run(scenario()) == b"offline"


def test_a_very_long_reason_is_truncated_to_fit_the_wire_contract() -> None:
    from device_client.reporter import Reporter
    from schemas.models import DeviceState, Phase

    async def scenario() -> DeviceState:
        async with EmbeddedBroker("127.0.0.1", 0) as broker:
            port = broker.port
            async with MqttClient("127.0.0.1", port, "dev", clean_session=True) as device, \
                    MqttClient("127.0.0.1", port, "watcher", clean_session=True) as watcher:
                await watcher.subscribe("edgeswarm/f1/devices/d1/state")
                reporter = Reporter(device, fleet="f1", device="d1", device_class="ipc")
                await reporter.report(phase=Phase.FAILED, installed_version="1.0.0", installed_sha256="1" * 64,
                                      reason="x" * 5000, reason_code="internal_error")
                return DeviceState.from_bytes((await watcher.next_message(5)).payload, max_bytes=65536)

    state = asyncio.run(scenario())
    assert state.phase == Phase.FAILED and state.reason is not None and len(state.reason) <= 1000


def test_only_unacknowledged_deliveries_are_kept_out_of_the_broker_log() -> None:
    import io
    import logging

    from services.operator.broker import _UnacknowledgedDelivery

    stream = io.StringIO()
    logger = logging.getLogger("edgeswarm-test.amqtt.broker")
    logger.addHandler(logging.StreamHandler(stream))
    logger.addFilter(_UnacknowledgedDelivery())
    for exc in (TimeoutError("Timeout waiting for PUBACK for packet ID 60"), TimeoutError("other"), ValueError("real")):
        try:
            raise exc
        except Exception:  # noqa: BLE001
            logger.exception("Task failed and will be skipped")
    text = stream.getvalue()
    assert text.count("Task failed") == 2 and "PUBACK" not in text and "other" in text and "ValueError" in text


class _BrokerWithSubscribeAcl(EmbeddedBroker):
    """amqtt with its topic ACL plugin: anonymous clients may subscribe to allowed/# only."""

    def _config(self) -> dict[str, Any]:
        config = super()._config()
        config["plugins"] = {**config["plugins"],
                             "amqtt.plugins.topic_checking.TopicAccessControlListPlugin": {"acl": {"anonymous": ["allowed/#"]}}}
        return config


@pytest.mark.filterwarnings("ignore:The 'acl' option is deprecated:DeprecationWarning")
@pytest.mark.parametrize("driver", ["thread", "loop"])  # paho's thread per client, or driven by the event loop
def test_a_refused_subscription_is_an_error_and_asked_for_again_on_every_reconnect(
        caplog: pytest.LogCaptureFixture, driver: str) -> None:
    """The broker's SUBACK may refuse a subscription (an ACL; NATS's MQTT gateway at its subscription
    limit). The client used to take any SUBACK as granted: a device then never heard its releases."""

    async def scenario() -> None:
        broker = _BrokerWithSubscribeAcl("127.0.0.1", 0)
        await broker.start()
        port = broker.port
        client = MqttClient("127.0.0.1", port, "device", keepalive=5, driver=driver)
        try:
            await client.connect()
            await client.subscribe("allowed/releases")
            with pytest.raises(SubscriptionRefused) as refused:
                await client.subscribe("denied/releases")
            assert refused.value.topic == "denied/releases"
            assert "refused the subscription to denied/releases" in str(refused.value)
            assert client.refused == {"denied/releases": refused.value.reason}
            client.refused.clear()  # so that only the renewal can list it again

            # A new broker on the same port: the client reconnects and renews both subscriptions;
            # the one still refused stays listed, the granted one delivers.
            await broker.stop()
            broker = _BrokerWithSubscribeAcl("127.0.0.1", port)
            await broker.start()
            async with asyncio.timeout(30):
                # Until the renewals are answered (in order: the refusal comes after the grant), so that
                # the publisher does not race the client's SUBSCRIBE.
                while not client._connected.is_set() or not client.refused:  # type: ignore[union-attr]
                    await asyncio.sleep(0.1)
                async with MqttClient("127.0.0.1", port, "publisher", clean_session=True) as publisher:
                    await publisher.publish("allowed/releases", b"v2")
                    await publisher.publish("denied/releases", b"unseen")
                    await publisher.publish("allowed/releases", b"v3")
                assert [(await client.next_message(10)).payload for _ in range(2)] == [b"v2", b"v3"]
            assert client.refused == {"denied/releases": refused.value.reason}
            assert "refused the renewed subscription to denied/releases" in caplog.text
        finally:
            await client.disconnect()
            await broker.stop()

    asyncio.run(scenario())


@pytest.mark.parametrize("driver", ["thread", "loop"])  # paho's thread per client, or driven by the event loop
def test_a_fleet_dropped_by_a_broker_restart_comes_back_spread_out_not_in_lockstep(driver: str) -> None:
    """paho's reconnect backoff has no jitter: every client of a restarted broker used to come back
    in the same instant (at 1 s, then 3 s, 7 s ...). Each client now has a first wait of its own."""
    count = 60

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        broker = EmbeddedBroker("127.0.0.1", 0)
        await broker.start()
        port = broker.port
        clients = [MqttClient("127.0.0.1", port, f"device-{i}", keepalive=5, driver=driver) for i in range(count)]
        try:
            for client in clients:
                await client.connect()
            await broker.stop()
            async with asyncio.timeout(30):
                while any(c._connected.is_set() for c in clients):  # type: ignore[union-attr]
                    await asyncio.sleep(0.05)
            broker = EmbeddedBroker("127.0.0.1", port)
            await broker.start()
            back = loop.time()
            returned: dict[int, float] = {}
            async with asyncio.timeout(60):
                while len(returned) < count:
                    for i, client in enumerate(clients):
                        if i not in returned and client._connected.is_set():  # type: ignore[union-attr]
                            returned[i] = loop.time() - back
                    await asyncio.sleep(0.02)
            times = sorted(returned.values())
            # Lockstep would put everyone within a fraction of a second; the first waits span 1-4 s.
            assert times[-1] - times[0] > 1.0, times
            assert len({round(t, 1) for t in times}) > count // 4, "spread over many moments, not a few bursts"
        finally:
            for client in clients:
                await client.disconnect()
            await broker.stop()

    asyncio.run(scenario())


def test_a_broker_whose_shutdown_hangs_still_stops_and_closes_its_listener(caplog: pytest.LogCaptureFixture) -> None:
    """amqtt's shutdown waits for each client's reader; once (the demo's Ctrl-C under load) one never
    stopped and the process ended with a traceback. The wait is bounded; the listener is closed."""

    async def scenario() -> None:
        broker = EmbeddedBroker("127.0.0.1", 0)
        await broker.start()
        port = broker.port
        amqtt = broker._broker
        assert amqtt is not None
        real_shutdown = amqtt.shutdown

        async def hanging_shutdown() -> None:
            await asyncio.sleep(3600)

        amqtt.shutdown = hanging_shutdown  # type: ignore[method-assign]
        await broker.stop(timeout=0.5)
        assert "did not shut down within" in caplog.text
        with pytest.raises(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
        amqtt.shutdown = real_shutdown  # type: ignore[method-assign]
        await real_shutdown()

    asyncio.run(scenario())


@pytest.mark.parametrize("acknowledge", ["when_full", "on_arrival"])
def test_a_service_that_holds_acknowledgements_when_full_loses_nothing_a_device_drops_a_flood(
        acknowledge: str, caplog: pytest.LogCaptureFixture) -> None:
    """The fleet service's client used to drop reports once 10,000 waited in its queue, after paho had
    acknowledged them: lost for good. Past its queue's size it now acknowledges a message only when it
    takes it, so nothing is dropped (the broker holds what is not acknowledged); a device's client
    still drops a flood beyond its queue."""
    count, room = 60, 5

    async def scenario() -> list[bytes]:
        async with EmbeddedBroker("127.0.0.1", 0) as broker:
            async with MqttClient("127.0.0.1", broker.port, "service", max_queued=room, acknowledge=acknowledge) as service:
                await service.subscribe("f/devices/+/state")
                async with MqttClient("127.0.0.1", broker.port, "devices", clean_session=True) as devices:
                    for i in range(count):
                        await devices.publish(f"f/devices/d{i}/state", str(i).encode())
                await asyncio.sleep(0.5)  # nobody takes anything meanwhile
                # The service's own publishes are acknowledged meanwhile (a held thread used to block them).
                await service.publish("f/ops/results", b"answer", timeout=5)
                received = []
                try:
                    while True:
                        received.append((await service.next_message(2.0)).payload)
                except TimeoutError:
                    return received

    received = asyncio.run(scenario())
    if acknowledge == "when_full":
        assert received == [str(i).encode() for i in range(count)]
    else:
        assert len(received) <= room + 1 and "receive queue full" in caplog.text


def test_a_service_holding_acknowledgements_still_gets_the_retained_messages_amqtt_sends_before_its_suback() -> None:
    """amqtt delivers retained messages before it answers a SUBSCRIBE and waits for their PUBACKs: a
    client that acknowledged only what it took never got its SUBACK (fleet serve hung at start)."""
    async def scenario() -> list[bytes]:
        async with EmbeddedBroker("127.0.0.1", 0) as broker:
            async with MqttClient("127.0.0.1", broker.port, "devices", clean_session=True) as devices:
                for i in range(50):
                    await devices.publish(f"f/devices/d{i}/state", str(i).encode(), retain=True)
            async with MqttClient("127.0.0.1", broker.port, "service", acknowledge="when_full") as service:
                await service.subscribe("f/devices/+/state", timeout=10)
                return sorted([(await service.next_message(5)).payload for _ in range(50)], key=int)

    assert asyncio.run(scenario()) == [str(i).encode() for i in range(50)]
