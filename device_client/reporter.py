"""Publishes the device's state, retained, on its state topic after every transition."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from device_client.local_state import LocalState
from device_client.machine import Report
from device_client.report_signing import ReportSigner
from schemas import topics
from schemas.models import DeviceState, Phase
from services.runtime.messaging import MqttClient, MqttError

log = logging.getLogger(__name__)


class ReportCarrier(Protocol):
    """What hands this device's reports to its peers (services.runtime.peer_channel.GossipChannel)."""

    def carry(self, topic: str, payload: bytes) -> None: ...
    def drop(self, topic: str) -> None: ...


class Reporter:
    """`signer` numbers and signs each report; `peers` carry a signed report made while the broker is
    away to a peer that reaches one, until a report reaches the broker directly again."""

    def __init__(self, client: MqttClient, *, fleet: str, device: str, device_class: str,
                 signer: ReportSigner | None = None, peers: ReportCarrier | None = None,
                 tunnel: Callable[[], str | None] | None = None) -> None:
        self.client = client
        self.tunnel = tunnel  # the peer whose tunnel carries this device to its broker now, if one does
        self.signer = signer
        self.peers = peers
        self.topic = topics.state_topic(fleet, device)
        self._base: dict[str, Any] = {"fleet": fleet, "device": device, "device_class": device_class}
        self._last_progress_at = 0.0
        self._progress_task: asyncio.Task[DeviceState] | None = None
        self.last: DeviceState | None = None

    async def report(self, *, phase: Phase, installed_version: str, installed_sha256: str, **fields: Any) -> DeviceState:
        if self._progress_task is not None and not self._progress_task.done():
            # A progress report not yet sent must not arrive after this newer transition.
            self._progress_task.cancel()
        return await self._publish(phase=phase, installed_version=installed_version, installed_sha256=installed_sha256, **fields)

    async def report_transition(self, report: Report, local: LocalState) -> DeviceState:
        """What the state machine decided to report, with what the device runs now."""
        fields = {k: v for k, v in report.figures.items() if v is not None}
        for name in ("target_version", "reason", "progress"):
            if (value := getattr(report, name)) is not None:
                fields[name] = value
        if report.reason_code is not None:
            fields["reason_code"] = report.reason_code.value
        return await self.report(phase=report.phase, installed_version=local.installed_version,
                                 installed_sha256=local.installed_sha256, last_sequence=local.last_sequence, **fields)

    async def again(self) -> DeviceState:
        """The last report once more, made now: the broker hears this device by another path."""
        assert self.last is not None
        fields = self.last.model_dump(exclude={"fleet", "device", "device_class", "timestamp", "counter", "signature",
                                               "tunnel_via"}, exclude_none=True)
        return await self.report(**fields)

    def report_progress(self, **fields: Any) -> None:
        """Schedule a progress report without waiting; rate-limited, superseded by the next report()."""
        now = time.monotonic()
        if not self.client.connected:
            return  # queued offline they would pile up for nothing: the next transition says where it stands
        if now - self._last_progress_at < 0.25 or (self._progress_task is not None and not self._progress_task.done()):
            return
        self._last_progress_at = now
        self._progress_task = asyncio.ensure_future(self._publish(**fields))

    async def _publish(self, *, phase: Phase, installed_version: str, installed_sha256: str, **fields: Any) -> DeviceState:
        if isinstance(fields.get("reason"), str) and len(fields["reason"]) > 1000:
            fields["reason"] = fields["reason"][:999] + "…"  # the wire contract caps reasons at 1024 characters
        state = DeviceState(
            **self._base,
            phase=phase,
            installed_version=installed_version,
            installed_sha256=installed_sha256,
            timestamp=datetime.now(UTC),
            tunnel_via=self.tunnel() if self.tunnel is not None else None,
            **fields,
        )
        if self.signer is not None:
            state = self.signer.sign(state)
        self.last = state
        if state.phase in (Phase.REFUSED, Phase.FAILED):
            log.warning("%s: %s (%s)", state.phase.value, state.reason, state.reason_code)
        else:
            log.info("phase %s progress %d%%", state.phase.value, state.progress)
        payload = state.canonical_bytes()
        if self.peers is not None and state.signature is not None:
            if self.client.connected:
                self.peers.drop(self.topic)
            else:
                self.peers.carry(self.topic, payload)
        try:
            # Offline (an uplink down, a broker away), waiting for an acknowledgement would hold the update
            # up for nothing: paho keeps the report and sends it once the broker answers again.
            await self.client.publish(self.topic, payload, qos=1, retain=True,
                                      wait=self.client.connected)
        except MqttError as exc:
            # The broker may be away; the state is retained locally and sent again on the next report.
            log.warning("could not report state: %s", exc)
        return state
