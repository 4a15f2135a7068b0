"""The content store interface the rest of edgeswarm sees, and how a fetch fails.

A store adds files, fetches them by CID with a deadline and a size cap, and connects to peers.
The embedded Kubo node and a Kubo daemon over RPC both implement it (see the package docstring).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from schemas.errors import EdgeswarmError, ReasonCode

__all__ = ["ContentStore", "FetchDeadline", "FetchError", "FetchStalled", "FetchTooLarge", "ProgressCallback"]


class FetchError(EdgeswarmError):
    code = ReasonCode.FETCH_FAILED


class FetchTooLarge(FetchError):
    code = ReasonCode.ENDLESS_DATA


class FetchStalled(FetchError):
    code = ReasonCode.SLOW_RETRIEVAL


class FetchDeadline(FetchError):
    code = ReasonCode.FETCH_DEADLINE


ProgressCallback = Callable[[int], None]


class ContentStore(Protocol):
    """What edgeswarm asks of an IPFS node. Implementations raise `FetchError` subclasses from
    `fetch` and RuntimeError when the node itself fails (it could not start, add or pin)."""

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
    ) -> int:
        """Fetch `cid` into `dest` (written whole or not at all); returns its size.

        Raises:
            FetchTooLarge: more than `max_bytes` arrived (endless data).
            FetchStalled: no progress for `stall_timeout` seconds (slow retrieval).
            FetchDeadline: not complete within `deadline` seconds.
            FetchError: anything else the node reported.
        """
        ...

    async def connect(self, multiaddr: str) -> bool: ...

    async def hang_up(self, multiaddr: str) -> None: ...

    def peers(self) -> list[str]: ...

    async def pin(self, cid: str) -> None: ...

    async def release(self, drop: list[str], keep: list[str]) -> int: ...
