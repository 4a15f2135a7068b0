"""Content store on an IPFS daemon's RPC API (a Kubo daemon, or js-ipfs), through ipfshttpclient.

Same interface, deadlines and size caps as the embedded node. Two quirks of ipfshttpclient 0.7.0
(2021) are handled here: `ipfshttpclient.connect()` refuses daemons newer than 0.8, so the client
is constructed directly; and `swarm.connect` passes its first address character by character
(it iterates `address` where it meant `addresses`), so it gets an address object that iterates
as empty.

Bytes are streamed from `cat` with the read timeout as the stall timeout; the stream stops as
soon as it passes the signed size or the overall deadline.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import warnings
from pathlib import Path

import ipfshttpclient
import ipfshttpclient.exceptions

# ipfshttpclient 0.7.0 passes urllib3 a parameter it deprecated, on every request: harmless noise.
warnings.filterwarnings("ignore", message="The 'strict' parameter is no longer needed", category=FutureWarning)

from services.runtime.content._store import FetchDeadline, FetchError, FetchStalled, FetchTooLarge, ProgressCallback

log = logging.getLogger(__name__)


class _OneAddress:
    """`str()` is the address; iterating yields nothing (works around swarm.connect's loop bug)."""

    def __init__(self, address: str) -> None:
        self.address = address

    def __str__(self) -> str:
        return self.address

    def __iter__(self):  # noqa: ANN204
        return iter(())


class KuboRpcStore:
    def __init__(self, api: str, *, connect_timeout: float = 5.0) -> None:
        self.api = api
        self.connect_timeout = connect_timeout
        self._client = ipfshttpclient.Client(api, timeout=(connect_timeout, 120))
        self.peer_id = ""
        self.addresses: list[str] = []

    async def __aenter__(self) -> KuboRpcStore:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._client.close()

    async def start(self) -> None:
        try:
            identity = await asyncio.to_thread(self._client.id)
        except ipfshttpclient.exceptions.Error as exc:
            raise RuntimeError(f"IPFS RPC API at {self.api} does not answer: {exc}") from None
        self.peer_id = identity["ID"]
        self.addresses = list(identity.get("Addresses") or [])

    @property
    def multiaddr(self) -> str:
        tcp = [a for a in self.addresses if "/tcp/" in a and "/ws" not in a and "127.0.0.1" in a]
        return tcp[0] if tcp else (self.addresses[0] if self.addresses else "")

    async def add(self, path: Path) -> str:
        result = await asyncio.to_thread(self._client.add, str(path), pin=True)
        return str(result["Hash"])

    async def connect(self, multiaddr: str) -> bool:
        try:
            await asyncio.to_thread(self._client.swarm.connect, _OneAddress(multiaddr))
        except ipfshttpclient.exceptions.Error as exc:
            log.warning("could not connect to %s: %s", multiaddr, exc)
            return False
        return True

    def peers(self) -> list[str]:
        """The remote address of every connection, ending in /p2p/<peer id>."""
        try:
            listing = self._client.swarm.peers()
        except ipfshttpclient.exceptions.Error:
            return []
        return [f"{p['Addr']}/p2p/{p['Peer']}" for p in (listing.get("Peers") or [])]

    async def hang_up(self, multiaddr: str) -> None:
        try:
            await asyncio.to_thread(self._client.swarm.disconnect, _OneAddress(multiaddr))
        except ipfshttpclient.exceptions.Error as exc:
            log.debug("could not disconnect from %s: %s", multiaddr, exc)

    async def pin(self, cid: str) -> None:
        try:
            await asyncio.to_thread(self._client.pin.add, cid)
        except ipfshttpclient.exceptions.Error as exc:
            raise RuntimeError(f"IPFS could not pin {cid}: {exc}") from None

    async def release(self, drop: list[str], keep: list[str]) -> int:
        """Unpin `drop`. The daemon frees the blocks in its own garbage collection
        (`ipfs daemon --enable-gc`, or `ipfs repo gc`), which knows every pin of a shared daemon."""
        for cid in drop:
            try:
                await asyncio.to_thread(self._client.pin.rm, cid)
            except ipfshttpclient.exceptions.Error as exc:
                log.debug("%s was not pinned: %s", cid, exc)
        return 0

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
        partial = dest.with_name(dest.name + ".partial")
        loop = asyncio.get_running_loop()
        # Called on the download thread: hand each figure to the event loop.
        on_thread = (lambda n: loop.call_soon_threadsafe(progress, n)) if progress is not None else None
        try:
            size = await asyncio.to_thread(self._stream, cid, partial, max_bytes, stall_timeout, deadline, on_thread)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        os.replace(partial, dest)
        return size

    def _stream(self, cid: str, partial: Path, max_bytes: int, stall_timeout: float, deadline: float,
                progress: ProgressCallback | None) -> int:
        started = time.monotonic()
        received = 0
        try:
            chunks = self._client.cat(cid, stream=True, timeout=(self.connect_timeout, stall_timeout))
            with open(partial, "wb") as out:
                for chunk in chunks:
                    received += len(chunk)
                    if received > max_bytes:
                        raise FetchTooLarge(f"{cid} sent more than the signed size of {max_bytes} bytes")
                    if time.monotonic() - started > deadline:
                        raise FetchDeadline(f"{cid} not complete within {deadline:.0f} s")
                    out.write(chunk)
                    if progress is not None:
                        progress(received)
        except ipfshttpclient.exceptions.TimeoutError:
            raise FetchStalled(f"no progress on {cid} for {stall_timeout:.0f} s") from None
        except ipfshttpclient.exceptions.Error as exc:
            raise FetchError(f"IPFS RPC fetch of {cid} failed: {exc}") from None
        return received
