"""The embedded MQTT broker (amqtt, in-process): zero set-up for demos, tests and small sites.

Production fleets run Mosquitto or a clustered broker; edgeswarm only needs MQTT 3.1.1 with
retained messages, QoS 1 and last wills, so the same clients work against either.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from amqtt.broker import Broker

log = logging.getLogger(__name__)


class EmbeddedBroker:
    """`async with EmbeddedBroker("127.0.0.1", 1883) as broker:` runs amqtt on that address."""

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
        # amqtt logs every packet at INFO; its own warnings are enough for operators.
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self._broker = Broker(self._config())
        await self._broker.start()
        log.info("embedded MQTT broker listening on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        if self._broker is not None:
            broker, self._broker = self._broker, None
            await asyncio.wait_for(broker.shutdown(), timeout=10)

    async def __aenter__(self) -> EmbeddedBroker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
