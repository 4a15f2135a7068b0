"""The embedded broker with a topic filter that refuses SUBSCRIBE to listed topics, changeable while it
runs (amqtt's own ACL plugin copies its lists at start). A SUBACK failure is what an ACL or a broker at
its subscription limit answers; Mosquitto grants denied subscriptions instead, so it cannot show this."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Any

from amqtt.contexts import Action
from amqtt.plugins.base import BaseTopicPlugin

from services.operator.broker import EmbeddedBroker


class RefuseListedTopics(BaseTopicPlugin):
    @dataclass
    class Config:
        refused: Any = None  # the test's own set, passed through, so that changing it changes the answers

    async def topic_filtering(self, *, session: Any = None, topic: str | None = None,
                              action: Action | None = None) -> bool:
        refused: set[str] = self._get_config_option("refused", set())
        return not (action == Action.SUBSCRIBE and topic in refused)


class RefusingBroker(EmbeddedBroker):
    """Runs on a thread of its own (its own event loop), so that synchronous tests can use it."""

    def __init__(self, refused: set[str], host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host, port)
        self.refused = refused
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="refusing-broker", daemon=True)

    def _config(self) -> dict[str, Any]:
        config = super()._config()
        config["plugins"] = {**config["plugins"], f"{__name__}.RefuseListedTopics": {"refused": self.refused}}
        return config

    def __enter__(self) -> RefusingBroker:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.start(), self._loop).result(30)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.stop(), self._loop).result(30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
            self._loop.close()
