"""What a device hears on its subscriptions, turned into state-machine events through the trust core.

The agent and the device simulator (device_client.simulator) share this: what a root, a
timestamp or a release does to a device's trust is decided once, here and in
services.runtime.trust, whoever carries the bytes. It keeps the root versions that arrived ahead
of a gap and a timestamp that waits for a newer root; the only I/O is the optional `TrustStore`,
which persists what was accepted (the agent's files; nothing for a simulated device).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import pydantic

from device_client import machine
from device_client.local_state import LocalState
from schemas.canonical import MalformedDocument
from schemas.errors import ReasonCode
from schemas.models import CommandName, DeviceCommand, Role
from services.runtime.files import atomic_write
from services.runtime.trust import (
    Admission,
    DeviceRecord,
    FreezeDetected,
    RootOutdated,
    RootsAhead,
    TimestampMismatch,
    TrustedSet,
    TrustError,
    decode_envelope,
    payload_digest,
)


class TrustStore(Protocol):
    """Where accepted trust documents are kept across restarts."""

    def save_root(self, raw: bytes) -> None: ...
    def save_timestamp(self, raw: bytes) -> None: ...
    def forget_timestamp(self) -> None: ...


@dataclass(frozen=True)
class TrustFiles:
    """The agent's: root.json and timestamp.json in its state directory, each written atomically."""

    root_path: Path
    timestamp_path: Path

    def save_root(self, raw: bytes) -> None:
        atomic_write(self.root_path, raw)

    def save_timestamp(self, raw: bytes) -> None:
        atomic_write(self.timestamp_path, raw)

    def forget_timestamp(self) -> None:
        self.timestamp_path.unlink(missing_ok=True)


def utc_now() -> datetime:
    return datetime.now(UTC)


class TrustIntake:
    def __init__(self, trusted: TrustedSet, *, max_message_bytes: int, store: TrustStore | None = None,
                 clock: Callable[[], datetime] = utc_now) -> None:
        self.trusted = trusted
        self.max_message_bytes = max_message_bytes
        self._store = store
        self._clock = clock
        self._roots_ahead = RootsAhead()
        self._pending_timestamp: bytes | None = None

    def root_heard(self, version: int, raw: bytes) -> list[machine.Event]:
        """A root from the retained chain (`version` from its topic): every root it completes is
        verified against its predecessor and accepted in order; a timestamp that waited for it is tried again."""
        if not self._roots_ahead.add(version, raw, self.trusted.root.version):
            return []
        if not self._roots_ahead.has_next(self.trusted.root.version):
            return [machine.TrustDocumentRefused(
                ReasonCode.ROOT_CHAIN_GAP,
                f"root v{version} received, but v{self.trusted.root.version + 1} is missing: waiting for it")]
        events: list[machine.Event] = []
        while (next_raw := self._roots_ahead.take_next(self.trusted.root.version)) is not None:
            try:
                update = self.trusted.update_root(next_raw)
            except TrustError as exc:
                events.append(machine.TrustDocumentRefused(exc.code, f"root v{self.trusted.root.version + 1}: {exc}"))
                return events
            if self._store is not None:
                self._store.save_root(next_raw)
                if Role.TIMESTAMP in update.revoked_roles:
                    self._store.forget_timestamp()  # its floor goes with it (the machine drops it)
            events.append(machine.RootAccepted(update.root.version, frozenset(update.revoked_roles)))
        if self._pending_timestamp is not None:
            waiting, self._pending_timestamp = self._pending_timestamp, None
            events.append(self.timestamp_heard(waiting))
        return events

    def timestamp_heard(self, raw: bytes) -> machine.Event:
        try:
            timestamp = self.trusted.update_timestamp(raw, self._clock())
        except RootOutdated as exc:
            self._pending_timestamp = raw  # tried again once the root chain has been walked
            return machine.TrustDocumentRefused(exc.code, f"{exc}; waiting for the root")
        except TrustError as exc:
            return machine.TrustDocumentRefused(exc.code, f"timestamp: {exc}")
        if self._store is not None:
            self._store.save_timestamp(raw)
        return machine.TimestampAccepted(timestamp.version)

    def verify_release(self, raw: bytes, local: LocalState, *, resuming: bool) -> machine.Event:
        record = DeviceRecord(local.installed_version, local.installed_sha256, local.last_sequence)
        now = self._clock()
        try:
            manifest = self.trusted.verify_release(raw, record, now)
            digest = payload_digest(decode_envelope(raw, max_bytes=self.max_message_bytes))
        except TrustError as exc:
            return machine.ReleaseRefused(exc.code, str(exc), resuming=resuming,
                                          awaits_timestamp=isinstance(exc, (FreezeDetected, TimestampMismatch)))
        return machine.ReleaseVerified(manifest, raw, digest, resuming=resuming,
                                       vouched=self.trusted.vouches_for(manifest, raw, now))

    def check_fresh(self) -> machine.Event | None:
        try:
            self.trusted.check_fresh(self._clock())
        except TrustError as exc:
            return machine.FreshnessLost(exc.code, str(exc))
        return None

    def seconds_until_stale(self) -> float | None:
        """Until the accepted timestamp expires (0 once it has); None without one."""
        timestamp = self.trusted.timestamp
        if timestamp is None:
            return None
        return max(0.0, (timestamp.expires - self._clock()).total_seconds())


def command_event(raw: bytes, *, max_bytes: int) -> machine.Event:
    """A command on the device's own topic. An install command is only an admission: the release it
    names must still arrive signed and verify like any other."""
    try:
        command = DeviceCommand.from_bytes(raw, max_bytes=max_bytes)
    except (MalformedDocument, pydantic.ValidationError) as exc:
        return machine.TrustDocumentRefused(ReasonCode.MALFORMED_COMMAND, f"bad command: {exc}"[:1000])
    if command.command == CommandName.INSTALL and command.sequence is not None and command.release_sha256:
        return machine.AdmissionReceived(Admission(command.sequence, command.release_sha256))
    if command.command == CommandName.CHECK:
        return machine.CheckRequested()
    return machine.StatusRequested()
