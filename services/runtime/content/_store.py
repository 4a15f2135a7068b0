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
