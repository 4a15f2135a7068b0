"""MqttClient's receive path, without a broker: what the event loop sees when a message arrives."""

from __future__ import annotations

import asyncio

import pytest

from services.runtime.messaging import Message, MqttClient


def test_a_cancellation_in_the_turn_a_message_arrives_is_not_lost() -> None:
    """On Python 3.11, asyncio.wait_for returned the message and dropped the cancellation when both
    came in the same loop turn: Ctrl-C then let the demo run to its end. The message stays queued."""

    async def scenario() -> None:
        client = MqttClient("127.0.0.1", 1, "test")  # never connected: only its queue is used
        waiting = asyncio.create_task(client.next_message(timeout=30))
        await asyncio.sleep(0)  # the task now waits on the queue
        client._enqueue(Message("t", b"payload", False, 1))  # what paho's thread schedules on the loop
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert (await client.next_message(timeout=1)).payload == b"payload"

    asyncio.run(scenario())


def test_next_message_times_out_when_nothing_arrives() -> None:
    async def scenario() -> None:
        client = MqttClient("127.0.0.1", 1, "test")
        with pytest.raises(TimeoutError):
            await client.next_message(timeout=0.05)

    asyncio.run(scenario())
