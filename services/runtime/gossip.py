"""Signed documents between peers: what a node takes from its fleet's gossip topic, without I/O.

Every device and the origin subscribe, on their IPFS node, to the fleet's pubsub topic
(`schemas.topics.gossip_topic`). A message there is a frame: a header line, the MQTT topic the
document belongs to (its kind, its class, its root version), and the document's bytes, exactly as
they travel on MQTT. The channel is never trusted: what a frame carries goes through the same
trust core as a document from the broker. What this module decides is only what is worth reading
at all, cheaply and with bounded memory, before any parsing:

- a message larger than the document limit (plus the frame's header) is dropped unread;
- a sender over its rate (a token bucket per sender) is dropped unread, and one that stays far over
  it (a flood) is ignored for a while, whatever its messages hold;
- a sender struck too often for invalid documents is ignored for a while (`strike`);
- a message whose bytes were seen recently (from anyone) is a duplicate: peers re-announce;
- every table here is bounded: the oldest entry goes first.

`sender` is the publisher's peer id, which libp2p's message signing vouches for: a relay cannot
put its own messages under another's name, so strikes land on whoever wrote the document.
"""

from __future__ import annotations

import enum
import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from schemas import topics

__all__ = [
    "FRAME_OVERHEAD", "DocumentKind", "GossipFrame", "GossipGate", "GossipLimits", "MalformedFrame", "PeerDocuments",
    "Verdict", "decode_frame", "encode_frame", "kind_of",
]

MAGIC = b"edgeswarm-gossip/1\n"
FRAME_OVERHEAD = len(MAGIC) + 256 + 1  # header line + the longest topic this fleet's names allow + newline


class MalformedFrame(ValueError):
    """Not a frame this fleet's peers write: the sender is struck."""


class DocumentKind(enum.Enum):
    ROOT = "root"
    TIMESTAMP = "timestamp"
    RELEASE = "release"
    REPORT = "report"  # a device's signed state, carried towards a peer with a broker (never trusted here)


@dataclass(frozen=True)
class GossipFrame:
    topic: str  # the MQTT topic the document belongs to
    payload: bytes


def kind_of(fleet: str, topic: str) -> DocumentKind | None:
    """The kind of document `topic` carries, if it is one the fleet gossips."""
    if topic == topics.timestamp_topic(fleet):
        return DocumentKind.TIMESTAMP
    if topics.topic_matches_release(fleet, topic):
        return DocumentKind.RELEASE
    device_topic = topics.device_from_topic(fleet, topic)
    if device_topic is not None and device_topic[1] == "state":
        return DocumentKind.REPORT
    prefix = topics.root_wildcard(fleet)[:-1]
    if topic.startswith(prefix) and topic[len(prefix):].isdigit() and len(topic) - len(prefix) <= 9:
        return DocumentKind.ROOT
    return None


def encode_frame(frame: GossipFrame) -> bytes:
    return MAGIC + frame.topic.encode() + b"\n" + frame.payload


def decode_frame(data: bytes, *, fleet: str) -> tuple[GossipFrame, DocumentKind]:
    """The frame in `data`, if it carries a document kind this fleet gossips.

    Raises:
        MalformedFrame: no frame header, or a topic this fleet does not gossip.
    """
    if not data.startswith(MAGIC):
        raise MalformedFrame("not an edgeswarm gossip frame")
    end = data.find(b"\n", len(MAGIC), FRAME_OVERHEAD)
    if end < 0:
        raise MalformedFrame("frame has no topic line")
    try:
        topic = data[len(MAGIC):end].decode("ascii")
    except UnicodeDecodeError:
        raise MalformedFrame("frame topic is not ASCII") from None
    kind = kind_of(fleet, topic)
    if kind is None:
        raise MalformedFrame(f"frame for {topic[:80]!r}, which fleet {fleet} does not gossip")
    return GossipFrame(topic, data[end + 1:]), kind


class Verdict(enum.Enum):
    READ = "read"  # worth parsing: hand it to the trust core
    TOO_LARGE = "too_large"
    BANNED = "banned"
    RATE_LIMITED = "rate_limited"
    FLOODING = "flooding"  # over its rate so often that it is now ignored (said once, when the ban starts)
    DUPLICATE = "duplicate"


@dataclass(frozen=True)
class GossipLimits:
    max_document_bytes: int = 1 << 20
    rate: float = 20.0  # messages per second each sender may send, sustained
    burst: float = 60.0  # and at once (a re-announcement of a long root chain)
    strikes: int = 5  # invalid documents before a sender is ignored
    ban_seconds: float = 600.0
    # Dropped over its rate this often within `flood_window` s: a flood, whatever it holds. An honest
    # peer's largest burst, a full re-announcement (16 roots, a timestamp, 64 releases, its report),
    # is about 80 messages, over the burst by about 20; it repeats at most every 5 s (a peer joined).
    flood_drops: int = 300
    flood_window: float = 10.0
    seen: int = 4096  # message hashes remembered, for duplicates
    seen_seconds: float = 900.0  # longer than the re-announce interval: a peer's periodic copy is a duplicate
    senders: int = 1024  # senders tracked (rates, strikes, bans)


@dataclass
class _Sender:
    tokens: float
    refilled: float
    strikes: int = 0
    banned_until: float = 0.0
    dropped: int = 0  # over its rate since `dropped_since`
    dropped_since: float = 0.0


@dataclass
class GossipGate:
    """Decides, before parsing, whether a message from a peer is read; remembers strikes and bans."""

    limits: GossipLimits = field(default_factory=GossipLimits)
    clock: Callable[[], float] = time.monotonic
    _senders: OrderedDict[str, _Sender] = field(default_factory=OrderedDict)
    _seen: OrderedDict[bytes, float] = field(default_factory=OrderedDict)

    def admit(self, sender: str, data: bytes) -> Verdict:
        now = self.clock()
        state = self._sender(sender, now)
        if state.banned_until > now:
            return Verdict.BANNED
        if len(data) > self.limits.max_document_bytes + FRAME_OVERHEAD:
            return Verdict.TOO_LARGE
        state.tokens = min(self.limits.burst, state.tokens + (now - state.refilled) * self.limits.rate)
        state.refilled = now
        if state.tokens < 1:
            if now - state.dropped_since > self.limits.flood_window:
                state.dropped, state.dropped_since = 0, now
            state.dropped += 1
            if state.dropped >= self.limits.flood_drops:
                state.dropped = 0
                state.banned_until = now + self.limits.ban_seconds
                return Verdict.FLOODING
            return Verdict.RATE_LIMITED
        state.tokens -= 1
        digest = hashlib.sha256(data).digest()
        seen_at = self._seen.get(digest)
        if seen_at is not None and now - seen_at < self.limits.seen_seconds:
            return Verdict.DUPLICATE
        self._seen[digest] = now
        self._seen.move_to_end(digest)
        while len(self._seen) > self.limits.seen:
            self._seen.popitem(last=False)
        return Verdict.READ

    def forget(self, data: bytes) -> None:
        """Let the same bytes be read again (they were dropped before the trust core saw them)."""
        self._seen.pop(hashlib.sha256(data).digest(), None)

    def strike(self, sender: str) -> bool:
        """`sender` sent an invalid document; True when that makes it ignored for `ban_seconds`."""
        now = self.clock()
        state = self._sender(sender, now)
        state.strikes += 1
        if state.strikes >= self.limits.strikes:
            state.strikes = 0
            state.banned_until = now + self.limits.ban_seconds
            return True
        return False

    def banned(self, sender: str) -> bool:
        state = self._senders.get(sender)
        return state is not None and state.banned_until > self.clock()

    def _sender(self, sender: str, now: float) -> _Sender:
        state = self._senders.get(sender)
        if state is None:
            state = self._senders[sender] = _Sender(tokens=self.limits.burst, refilled=now)
            while len(self._senders) > self.limits.senders:
                # The oldest sender that is not banned goes (a flood of new names must not lift a ban).
                oldest = next((k for k, v in self._senders.items() if v.banned_until <= now), None)
                if oldest is None or oldest == sender:
                    break
                del self._senders[oldest]
        self._senders.move_to_end(sender)
        return state


@dataclass
class PeerDocuments:
    """The signed documents a node carries for its peers: what it re-announces, newest of each kind.

    Only documents the trust core accepted (or, for other classes' releases, whose signatures it
    checked) come in here, and the device's own latest signed report while its broker is away;
    roots are kept as a chain, so a peer that is behind can walk it."""

    fleet: str
    max_roots: int = 16
    max_releases: int = 64
    max_reports: int = 1
    _frames: dict[str, GossipFrame] = field(default_factory=dict)

    def add(self, topic: str, payload: bytes) -> bool:
        """Keep `payload` for `topic`; False when it is what was kept already."""
        kind = kind_of(self.fleet, topic)
        if kind is None:
            raise ValueError(f"{topic} is not a document the fleet gossips")
        old = self._frames.get(topic)
        if old is not None and old.payload == payload:
            return False
        self._frames.pop(topic, None)
        self._frames[topic] = GossipFrame(topic, payload)
        self._trim(DocumentKind.ROOT, self.max_roots)
        self._trim(DocumentKind.RELEASE, self.max_releases)
        self._trim(DocumentKind.REPORT, self.max_reports)
        return True

    def remove(self, topic: str) -> None:
        self._frames.pop(topic, None)

    def _trim(self, kind: DocumentKind, limit: int) -> None:
        of_kind = [t for t in self._frames if kind_of(self.fleet, t) == kind]
        if kind == DocumentKind.ROOT:
            of_kind.sort(key=lambda t: topics.root_version(t) or 0)  # the oldest roots go first
        for topic in of_kind[:max(0, len(of_kind) - limit)]:  # (insertion order: the oldest first)
            del self._frames[topic]

    def frames(self) -> list[GossipFrame]:
        """Roots first, in version order (a peer accepts them one after another), then the rest."""
        def order(frame: GossipFrame) -> tuple[int, int]:
            kind = kind_of(self.fleet, frame.topic)
            return (0, topics.root_version(frame.topic) or 0) if kind == DocumentKind.ROOT else (1, 0)
        return sorted(self._frames.values(), key=order)

    def __len__(self) -> int:
        return len(self._frames)
