"""The operator side of `edgeswarm/{fleet}/ops/...`: send one request, wait for its result."""

from __future__ import annotations

import asyncio
import uuid

from pydantic import BaseModel

from schemas import topics
from schemas.errors import EdgeswarmError, ReasonCode
from schemas.ops import OpsResult, RolloutStatus
from services.runtime.messaging import MqttClient


class NoAnswer(EdgeswarmError):
    code = ReasonCode.NO_ANSWER


async def request(client: MqttClient, fleet: str, topic: str, body: BaseModel, *, timeout: float = 10.0) -> OpsResult:
    """Publish `body` (which has a request_id field) on `topic`; the fleet service's OpsResult for it."""
    request_id = uuid.uuid4().hex
    body = body.model_copy(update={"request_id": request_id})
    await client.subscribe(topics.ops_results_topic(fleet))
    await client.publish(topic, body.model_dump_json(exclude_none=True).encode())
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        try:
            message = await client.next_message(max(0.0, end - loop.time()))
        except TimeoutError:
            raise NoAnswer(f"no answer from the fleet service within {timeout:.0f} s: is `edgeswarm fleet serve` "
                           "running, and may this principal publish on ops/ (broker ACL)?") from None
        if message.topic != topics.ops_results_topic(fleet):
            continue
        try:
            result = OpsResult.model_validate_json(message.payload)
        except ValueError:
            continue
        if result.request_id == request_id:
            return result


async def rollout_statuses(client: MqttClient, fleet: str, *, wait: float = 1.5) -> list[RolloutStatus]:
    """Every class's retained rollout status."""
    await client.subscribe(topics.rollout_status_wildcard(fleet))
    found: dict[str, RolloutStatus] = {}
    loop = asyncio.get_running_loop()
    end = loop.time() + wait
    while (left := end - loop.time()) > 0:
        try:
            message = await client.next_message(left)
        except TimeoutError:
            break
        if not message.payload:
            continue
        try:
            status = RolloutStatus.model_validate_json(message.payload)
        except ValueError:
            continue
        found[status.device_class] = status
    return [found[k] for k in sorted(found)]
