"""The configured content store: the embedded Kubo node or a daemon over RPC, chosen in one place."""

from __future__ import annotations

import contextlib

from services.runtime.content._embedded import EmbeddedKuboNode
from services.runtime.content._kubo_config import KuboConfig

__all__ = ["open_store"]


def open_store(backend: str, *, kubo: KuboConfig, rpc_api: str) -> contextlib.AbstractAsyncContextManager:
    """The configured content store as an async context manager; peers in `kubo.peers` are dialed."""
    if backend == "kubo-rpc":
        from services.runtime.content._rpc import KuboRpcStore  # ipfshttpclient: ~90 ms to import

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
