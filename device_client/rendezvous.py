"""The MQTT rendezvous: devices tell each other where their IPFS nodes can be dialed.

Each device publishes, retained on its own `peer` topic, its node's addresses: the external one
its router mapped (NAT-PMP) and its LAN one. Every device of the same class dials the peers it
hears about, so a device behind any NAT reaches peers behind UPnP routers (through their mappings)
and neighbours on its own LAN without waiting for a DHT. Dials run in the background: the agent's
loop never waits for a slow or unreachable address. The peers it connected to are remembered
(device_client.peer_memory) and dialed again at the next start, before the broker answers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from datetime import UTC, datetime

import pydantic

from device_client.peer_memory import RememberedPeers
from schemas import topics
from schemas.canonical import MalformedDocument
from schemas.models import PeerAnnouncement
from services.runtime.content import ContentStore
from services.runtime.messaging import Message, MqttClient

log = logging.getLogger(__name__)


class Rendezvous:
    def __init__(self, client: MqttClient, store: ContentStore, *, fleet: str, device: str, device_class: str,
                 max_message_bytes: int, max_peers: int, memory: RememberedPeers | None = None) -> None:
        self.client = client
        self.store = store
        self.fleet = fleet
        self.device = device
        self.device_class = device_class
        self.max_message_bytes = max_message_bytes
        self.max_peers = max_peers  # dialed by us; others dial us too, so a device ends up with more
        self.dialed: dict[str, str] = {}  # peer id -> dialing, connected or unreachable (dialed again when it re-announces)
        self._tasks: set[asyncio.Task[None]] = set()
        self.memory = memory

    def dial_remembered(self) -> None:
        """Dial, in the background, the peers the rendezvous connected this device to last time."""
        addresses = self.memory.load() if self.memory is not None else []
        if addresses:
            log.info("rendezvous: dialing %d peer(s) remembered from the last run", len(addresses))
        for address in addresses:
            self._background(self._dial_remembered(address))

    async def _dial_remembered(self, address: str) -> None:
        peer_id = address.rsplit("/", 1)[-1]
        if self.dialed.get(peer_id) in ("dialing", "connected"):
            return
        self.dialed[peer_id] = "dialing"
        try:
            connected = await self.store.connect(address)
        except Exception as exc:  # noqa: BLE001 - an address that no longer works must not stop the others
            log.debug("rendezvous: remembered peer %s unreachable: %s", address, exc)
            connected = False
        if self.dialed.get(peer_id) == "dialing":  # (an announcement may have connected it meanwhile)
            self.dialed[peer_id] = "connected" if connected else "unreachable"
        log.info("rendezvous: remembered peer %s %s", address, "connected" if connected else "is not reachable")

    def _background(self, work: Coroutine[None, None, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self, peer_id: str, addrs: list[str]) -> None:
        await self.announce(peer_id, addrs)
        await self.client.subscribe(topics.all_devices_wildcard(self.fleet, "peer"))

    async def announce(self, peer_id: str, addrs: list[str], *, confirm: bool = True) -> None:
        """Publish (again, e.g. once the router mapped our port) where this node can be dialed.
        `confirm=False`: do not wait for the broker's acknowledgement (after a move the connection
        may have gone with the old address; paho sends it again once it reconnects)."""
        announcement = PeerAnnouncement(device=self.device, device_class=self.device_class, peer_id=peer_id,
                                        addrs=addrs, timestamp=datetime.now(UTC))
        await self.client.publish(topics.device_topic(self.fleet, self.device, "peer"), announcement.canonical_bytes(),
                                  retain=True, wait=confirm and self.client.connected)  # offline: sent once it answers
        log.info("rendezvous: announced %s", ", ".join(addrs))

    def handles(self, message: Message) -> bool:
        parsed = topics.device_from_topic(self.fleet, message.topic)
        if parsed is None or parsed[1] != "peer":
            return False
        if parsed[0] != self.device and message.payload:
            self._on_announcement(parsed[0], message.payload)
        return True

    def _on_announcement(self, sender: str, raw: bytes) -> None:
        try:
            peer = PeerAnnouncement.from_bytes(raw, max_bytes=self.max_message_bytes)
        except (MalformedDocument, pydantic.ValidationError) as exc:
            log.info("ignoring a malformed peer announcement from %s: %s", sender, exc)
            return
        if peer.device != sender or peer.device_class != self.device_class:
            return
        if self.dialed.get(peer.peer_id) in ("dialing", "connected"):
            return
        if sum(state in ("dialing", "connected") for state in self.dialed.values()) >= self.max_peers:
            return
        self.dialed[peer.peer_id] = "dialing"
        self._background(self._dial(peer))

    async def _dial(self, peer: PeerAnnouncement) -> None:
        for addr in peer.addrs:
            try:
                if await self.store.connect(addr):
                    self.dialed[peer.peer_id] = "connected"
                    log.info("rendezvous: connected to %s at %s", peer.device, addr)
                    if self.memory is not None:
                        self.memory.remember(addr if "/p2p/" in addr else f"{addr}/p2p/{peer.peer_id}")
                    return
            except Exception as exc:  # noqa: BLE001 - one bad address must not stop the others
                log.debug("rendezvous: %s unreachable at %s: %s", peer.device, addr, exc)
        self.dialed[peer.peer_id] = "unreachable"
        log.info("rendezvous: %s is not reachable from here (%d addresses tried)", peer.device, len(peer.addrs))

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
