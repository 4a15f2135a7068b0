"""Handing on peers' signed reports to the broker: what a device with a broker connection does for
neighbours without one.

The relaying device cannot verify a peer's report (it holds no other device's key; the fleet
service does, services.operator.report_trust), so it checks only what keeps the broker's load
and its own memory bounded: a well-formed signed report of this fleet, on its own device's
topic, newer than the last one it handed on for that device, within a fleet-wide rate.

What it cannot hand on at once (its own broker is away too: a data mule on an isolated LAN; or over
the rate) it holds, the latest report of each device, bounded, and hands on once it can: reports
travel store-and-forward, in memory (a restart of the relaying agent loses them; the devices'
next reports, and their own once they reach a broker, say the same).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import pydantic

from schemas import topics
from schemas.canonical import MalformedDocument
from schemas.models import MAX_REPORT_BYTES, DeviceState

__all__ = ["RelayDecision", "ReportRelay"]


@dataclass(frozen=True)
class RelayDecision:
    hand_on: bool
    forged: str | None = None  # the sender wrote something no device signs: it is struck
    note: str | None = None  # why it is not handed on (said in the log at debug level)


@dataclass
class ReportRelay:
    fleet: str
    device: str  # this device: its own reports go on its own state topic
    rate: float = 20.0  # reports handed on per second, all peers together
    burst: float = 100.0
    max_devices: int = 4096
    max_held: int = 1024  # reports held for devices while they cannot be handed on
    clock: Callable[[], float] = time.monotonic
    _last: OrderedDict[str, int] = field(default_factory=OrderedDict)
    _held: OrderedDict[str, tuple[int, bytes]] = field(default_factory=OrderedDict)
    _tokens: float = -1.0
    _refilled: float = 0.0

    def judge(self, topic: str, raw: bytes) -> RelayDecision:
        """Whether to hand on `raw`, a report a peer gossiped for the state topic `topic`."""
        parsed = topics.device_from_topic(self.fleet, topic)
        if parsed is None or parsed[1] != "state":
            return RelayDecision(False, forged=f"a report for {topic[:80]!r}, not a device's state topic")
        device = parsed[0]
        if device == self.device:
            return RelayDecision(False, note="a report in this device's own name")
        if len(raw) > MAX_REPORT_BYTES:
            return RelayDecision(False, forged=f"a {len(raw)}-byte report (at most {MAX_REPORT_BYTES})")
        try:
            state = DeviceState.from_bytes(raw, max_bytes=MAX_REPORT_BYTES)
        except (MalformedDocument, pydantic.ValidationError) as exc:
            return RelayDecision(False, forged=f"a malformed report: {str(exc)[:160]}")
        if state.device != device or state.fleet != self.fleet:
            return RelayDecision(False, forged=f"a report of {state.fleet}/{state.device} on {device}'s topic")
        if state.counter is None or state.signature is None:
            return RelayDecision(False, note=f"{device}'s report is not signed: only the broker can take it")
        last = self._last.get(device)
        if last is not None and state.counter <= last:
            return RelayDecision(False, note=f"{device}'s report #{state.counter} was handed on already")
        held = self._held.get(device)
        if held is not None and state.counter <= held[0]:
            return RelayDecision(False, note=f"a report of {device} as new as #{state.counter} is held already")
        return RelayDecision(True)

    def hold(self, raw: bytes) -> None:
        """Keep `raw` (judged worth handing on) until it can be: only the latest report of each device."""
        state = DeviceState.model_validate_json(raw)
        assert state.counter is not None
        self._held.pop(state.device, None)
        self._held[state.device] = (state.counter, raw)
        while len(self._held) > self.max_held:
            self._held.popitem(last=False)

    def held(self) -> list[bytes]:
        """The reports held, oldest first; each leaves with `handed_on`."""
        return [raw for _, raw in self._held.values()]

    def take(self) -> bool:
        """Spend one report of the rate; False when the relay is over it (the report is read again later)."""
        now = self.clock()
        if self._tokens < 0:
            self._tokens, self._refilled = self.burst, now
        self._tokens = min(self.burst, self._tokens + (now - self._refilled) * self.rate)
        self._refilled = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def handed_on(self, raw: bytes) -> None:
        """`raw` (judged worth handing on) reached the broker: the same or older is not sent again."""
        state = DeviceState.model_validate_json(raw)
        assert state.counter is not None
        held = self._held.get(state.device)
        if held is not None and held[0] <= state.counter:
            del self._held[state.device]
        self._last[state.device] = state.counter
        self._last.move_to_end(state.device)
        while len(self._last) > self.max_devices:
            self._last.popitem(last=False)
