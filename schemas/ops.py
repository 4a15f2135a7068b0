"""Operator requests and results on `edgeswarm/{fleet}/ops/...` (see docs/wire-contract.md).

Requests carry a bearer token that the fleet service checks in addition to the broker's ACL.
The operator token may do everything; the Home Assistant token only asks for one device's install
or check (it sits in retained discovery messages, so it gets the least it needs). None of these
requests can make a device install anything unsigned: they only decide *when* a signed release
that a device verifies by itself is installed.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Annotated, Literal

from pydantic import AwareDatetime, Field, StringConstraints, model_validator

from schemas.models import Identifier, Sequence, ShortText, VersionStr, WireModel

Token = Annotated[str, StringConstraints(min_length=16, max_length=256, pattern=r"^[A-Za-z0-9_-]+$")]
RequestId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class Wave(WireModel):
    """One step of a rollout: a cumulative share of the class (by rollout bucket) or named devices."""

    percent: Annotated[int, Field(ge=1, le=100)] | None = None
    devices: Annotated[list[Identifier], Field(min_length=1, max_length=10_000)] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Wave:
        if (self.percent is None) == (self.devices is None):
            raise ValueError("a wave is either `percent` or `devices`")
        return self


class RolloutPlan(WireModel):
    device_class: Identifier
    version: VersionStr
    waves: Annotated[list[Wave], Field(min_length=1, max_length=32)]
    # Integers: requests are parsed by the same strict JSON rules as signed documents (no floats).
    soak_seconds: Annotated[int, Field(ge=0, le=30 * 86400)] = 0
    max_failed_percent: Annotated[int, Field(ge=0, le=100)] = 20

    @model_validator(mode="after")
    def _percent_grows(self) -> RolloutPlan:
        shares = [w.percent for w in self.waves if w.percent is not None]
        if shares != sorted(shares):
            raise ValueError("wave percentages are cumulative and must not decrease")
        return self


class StartRollout(WireModel):
    token: Token
    request_id: RequestId | None = None
    plan: RolloutPlan


class ControlRollout(WireModel):
    """pause, resume or abort the class's rollout."""

    token: Token
    request_id: RequestId | None = None
    device_class: Identifier
    reason: ShortText = ""


class DeviceRequest(WireModel):
    """install (through the rollout rules), check, or retire one device."""

    token: Token
    request_id: RequestId | None = None


class RolloutState(str, enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    ABORTED = "aborted"
    COMPLETED = "completed"


class RolloutStatus(WireModel):
    """Retained on `ops/rollout/{device_class}/status` after every change."""

    device_class: Identifier
    version: VersionStr
    sequence: Sequence
    state: RolloutState
    wave: Annotated[int, Field(ge=1)]
    waves: Annotated[int, Field(ge=1)]
    wave_devices: Annotated[int, Field(ge=0)]
    class_devices: Annotated[int, Field(ge=0)]
    done: Annotated[int, Field(ge=0)]
    failed: Annotated[int, Field(ge=0)]
    in_progress: Annotated[int, Field(ge=0)]
    waiting: Annotated[int, Field(ge=0)]
    failure_rate: Annotated[float, Field(ge=0, le=1)]
    failed_devices: Annotated[list[Identifier], Field(max_length=10_000)] = []
    reason: ShortText = ""
    soak_until: AwareDatetime | None = None
    updated: AwareDatetime


class OpsResult(WireModel):
    """Published (not retained) on `ops/results` for every request, accepted or not."""

    request_id: RequestId | None = None
    action: Annotated[str, StringConstraints(pattern=r"^[a-z_/]{1,64}$")]
    ok: bool
    message: ShortText
    at: datetime


OpsAction = Literal["rollout/start", "rollout/pause", "rollout/resume", "rollout/abort",
                    "device/install", "device/check", "device/retire"]
