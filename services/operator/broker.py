"""The embedded MQTT broker (amqtt, in-process): zero set-up for demos, tests and small sites.

Production fleets run Mosquitto or a clustered broker; edgeswarm only needs MQTT 3.1.1 with
retained messages, QoS 1 and last wills, so the same clients work against either.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from amqtt.broker import Broker
from amqtt.session import Session

log = logging.getLogger(__name__)


class _SnapshotDict(dict):  # type: ignore[type-arg]
    """A dict whose iteration walks a copy of its keys, so it may change while a loop awaits."""

    def __iter__(self):  # noqa: ANN204
        return iter(list(super().keys()))


class _FixedAmqttBroker(Broker):
    """amqtt 0.12.1 (pinned) with two fixes measured here.

    On every connect, amqtt walks the subscription filters of *all* clients and sends the
    connecting client the retained messages of each, so a device got other classes' releases and
    other devices' states it never subscribed to; and it iterates that dict across awaits, which
    crashed a client's session ("dictionary changed size during iteration") whenever another
    client subscribed at the same moment.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self._subscriptions = _SnapshotDict(self._subscriptions)

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int], session: Session) -> None:
        subscribers = self._subscriptions.get(subscription[0], [])
        if not any(s.client_id == session.client_id for s, _ in subscribers):
            return
        await super()._publish_retained_messages_for_subscription(subscription, session)


class _UnacknowledgedDelivery(logging.Filter):
    """Drops amqtt's ERROR traceback for a QoS 1 delivery whose PUBACK never came: the client left
    (seen once in a fresh `edgeswarm demo` as its agents stopped). amqtt only warns when a client
    that left is sent a message, and that warning is already silenced; the broker goes on either way."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, TimeoutError) and "PUBACK" in str(exc):
            log.debug("a client left before acknowledging a message: %s", exc)
            return False
        return True


class EmbeddedBroker:
    """`async with EmbeddedBroker("127.0.0.1", 1883) as broker:` runs amqtt on that address.

    Port 0 takes any free port when the listener binds; `port` is the bound one once started."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        self.host = host
        self.port = port
        self._broker: Broker | None = None

    def _config(self) -> dict[str, Any]:
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }

    async def start(self) -> None:
        # amqtt logs every packet at INFO and warns about each message for a client that just left.
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.ERROR)
        amqtt_broker = logging.getLogger("amqtt.broker")
        if not any(isinstance(f, _UnacknowledgedDelivery) for f in amqtt_broker.filters):
            amqtt_broker.addFilter(_UnacknowledgedDelivery())
        self._broker = _FixedAmqttBroker(self._config())
        await self._broker.start()
        if self.port == 0:
            self.port = self._bound_port(self._broker)
        log.info("embedded MQTT broker listening on %s:%d", self.host, self.port)

    @staticmethod
    def _bound_port(broker: Broker) -> int:
        server = broker._servers["default"].instance  # amqtt keeps its asyncio.Server there; no public accessor
        if not isinstance(server, asyncio.Server) or not server.sockets:
            raise RuntimeError("the embedded broker has no TCP listener")
        return int(server.sockets[0].getsockname()[1])

    async def stop(self, timeout: float = 10.0) -> None:
        if self._broker is None:
            return
        broker, self._broker = self._broker, None
        try:
            async with asyncio.timeout(timeout):
                await broker.shutdown()
        except TimeoutError:
            # amqtt waits for every client's reader to stop; one that never did (seen once at the demo's
            # Ctrl-C on a loaded machine) ended the process with a traceback instead of stopping it.
            log.warning("the embedded broker did not shut down within %.0f s: its listeners are closed and "
                        "its remaining connections dropped with the process", timeout)
            for server in broker._servers.values():  # amqtt keeps its asyncio.Server there; no public accessor
                if isinstance(server.instance, asyncio.Server):
                    server.instance.close()

    async def __aenter__(self) -> EmbeddedBroker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
