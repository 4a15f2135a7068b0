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
from schemas import topics
from schemas.canonical import MalformedDocument
from schemas.errors import ReasonCode
from schemas.models import CommandName, DeviceCommand, Role
from services.runtime.files import atomic_write
from services.runtime.gossip import DocumentKind
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
    open_release,
    payload_digest,
)

# What only a forger (or a broken peer) sends: a document that does not parse, or a signature by a
# key the device knows that does not verify. A validly signed one that is old, expired or for another
# root is what an honest peer that is behind re-announces: not used, but its sender is not struck.
FORGED = frozenset({
    ReasonCode.MALFORMED, ReasonCode.WRONG_TYPE, ReasonCode.BAD_SIGNATURE, ReasonCode.WRONG_FLEET,
    ReasonCode.UNTRUSTED,
})
# Signed by keys this device's root does not name (or too few of them): a forgery, or a document of a
# root the device has not walked to yet (a peer ahead of it during a key rotation). Not used, not
# reported, its sender not struck; read again when re-announced, once the root may have arrived.
NEWER_KEYS = frozenset({ReasonCode.UNKNOWN_KEY, ReasonCode.THRESHOLD_NOT_MET})


@dataclass(frozen=True)
class PeerVerdict:
    """What a signed document from a peer does.

    `events` go to the state machine (none for a copy that is not newer); `forged` strikes its
    sender; `held` means it waits for another document (a root ahead of a gap, a timestamp of a newer
    root), so the same bytes must be read again when re-announced; `carry` passes a release on to
    other peers (roots and timestamps are carried once accepted, `on_accepted`); `note` says why it
    was not used."""

    events: tuple[machine.Event, ...] = ()
    forged: str | None = None
    held: bool = False
    carry: bool = False
    note: str = ""


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
        # Told (MQTT topic, bytes) of every root and timestamp accepted, from any source: what peers are sent.
        self.on_accepted: Callable[[str, bytes], None] | None = None
        self._timestamp_raw: bytes | None = None  # the bytes of the timestamp accepted last

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
            if self.on_accepted is not None:
                self.on_accepted(topics.root_topic(update.root.fleet, update.root.version), next_raw)
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
        self._timestamp_raw = raw
        if self.on_accepted is not None:
            self.on_accepted(topics.timestamp_topic(timestamp.fleet), raw)
        return machine.TimestampAccepted(timestamp.version)

    # -- documents from peers ------------------------------------------------------------------

    def from_peer(self, kind: DocumentKind, topic: str, raw: bytes, *, last_release: bytes | None,
                  local: LocalState) -> PeerVerdict:
        """A document a peer gossiped for `topic`: the same trust rules as from the broker, but a copy
        that is not newer than what the device holds is dropped quietly (peers re-announce), and only
        a forgery is reported."""
        if len(raw) > self.max_message_bytes:
            return PeerVerdict(forged=f"{len(raw)} bytes, over the limit of {self.max_message_bytes}")
        match kind:
            case DocumentKind.ROOT:
                return self._root_from_peer(topics.root_version(topic) or 0, raw)
            case DocumentKind.TIMESTAMP:
                return self._timestamp_from_peer(raw)
            case DocumentKind.RELEASE:
                return self._release_from_peer(raw, last_release, local)

    def _root_from_peer(self, version: int, raw: bytes) -> PeerVerdict:
        trusted = self.trusted.root.version
        if version <= trusted:
            return PeerVerdict(note=f"root v{version} is not newer than trusted v{trusted}")
        events = self.root_heard(version, raw)
        forged = None
        if version == trusted + 1 and events and isinstance(events[0], machine.TrustDocumentRefused):
            first = events[0]
            forged = first.reason if first.code in FORGED | NEWER_KEYS else None  # root N+1 must carry N's keys
        gap = [e for e in events if isinstance(e, machine.TrustDocumentRefused) and e.code == ReasonCode.ROOT_CHAIN_GAP]
        kept = tuple(e for e in events if e not in gap)  # a gap closes when the peer's chain arrives: not a fault
        return PeerVerdict(kept, forged=forged, held=bool(gap), note=gap[0].reason if gap else "")

    def _timestamp_from_peer(self, raw: bytes) -> PeerVerdict:
        if raw == self._timestamp_raw:  # (heard from the broker too: accepting it again would re-check the release)
            return PeerVerdict(note="the timestamp trusted already")
        event = self.timestamp_heard(raw)
        if not isinstance(event, machine.TrustDocumentRefused):
            return PeerVerdict((event,))
        if event.code in FORGED:
            return PeerVerdict((event,), forged=event.reason)
        held = event.code == ReasonCode.ROOT_OUTDATED or event.code in NEWER_KEYS
        return PeerVerdict(held=held, note=event.reason)

    def _release_from_peer(self, raw: bytes, last_release: bytes | None, local: LocalState) -> PeerVerdict:
        now = self._clock()
        try:
            manifest, _ = open_release(self.trusted.root, raw, now, max_bytes=self.max_message_bytes)
        except TrustError as exc:
            if exc.code in FORGED:
                reason = f"release: {exc}"
                return PeerVerdict((machine.TrustDocumentRefused(exc.code, reason),), forged=reason)
            return PeerVerdict(held=exc.code in NEWER_KEYS, note=f"release: {exc}")
        if manifest.device_class != self.trusted.device_class:
            return PeerVerdict(carry=True, note=f"release of class {manifest.device_class}: carried for its devices")
        heard = self._sequence_of(last_release, now)
        if raw == last_release or manifest.sequence <= max(heard, local.last_sequence):
            return PeerVerdict(carry=True, note=f"release sequence {manifest.sequence} is not newer than "
                                                f"sequence {max(heard, local.last_sequence)} already heard")
        return PeerVerdict((machine.ReleaseHeard(raw),), carry=True)

    def _sequence_of(self, raw: bytes | None, now: datetime) -> int:
        """The sequence of a release the device heard before, if it still opens (-1 otherwise)."""
        if raw is None:
            return -1
        try:
            return open_release(self.trusted.root, raw, now, max_bytes=self.max_message_bytes)[0].sequence
        except TrustError:
            return -1

    def carriable_release(self, raw: bytes) -> bool:
        """Whether a release heard from the broker opens (for any class): worth passing on to peers."""
        try:
            open_release(self.trusted.root, raw, self._clock(), max_bytes=self.max_message_bytes)
        except TrustError:
            return False
        return True

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
