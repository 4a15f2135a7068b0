"""The kubo-rpc content backend against a real IPFS RPC daemon (js-ipfs), both directions (issue #8)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from schemas.models import Phase
from services.runtime.content import KuboRpcStore
from tests.support.ports import free_port
from tests.support.harness import Fleet
from tests.support.jsipfs import JsIpfsDaemon, js_ipfs_available

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not js_ipfs_available(), reason="js-ipfs is not installed (bash .ci/run installs it with npm)"),
]
IPC = "ipc-x86_64"


@pytest.fixture
def daemon(tmp_path: Path):  # noqa: ANN201
    d = JsIpfsDaemon(tmp_path / "js-repo", free_port(), free_port(), tmp_path / "js-ipfs.log")
    d.start()
    try:
        yield d
    finally:
        d.stop()


def test_fetch_enforces_the_signed_size_and_stall_timeout(daemon: JsIpfsDaemon, tmp_path: Path) -> None:
    from services.runtime.content import FetchStalled, FetchTooLarge

    payload = tmp_path / "payload"
    payload.write_bytes(b"x" * 300_000)

    async def scenario() -> None:
        async with KuboRpcStore(daemon.api) as store:
            cid = await store.add(payload)
            assert await store.fetch(cid, tmp_path / "ok", max_bytes=300_000, stall_timeout=10, deadline=30) == 300_000
            with pytest.raises(FetchTooLarge):
                await store.fetch(cid, tmp_path / "big", max_bytes=299_999, stall_timeout=10, deadline=30)
            assert not (tmp_path / "big").exists() and not (tmp_path / "big.partial").exists()
            with pytest.raises(FetchStalled):  # a CID nobody has
                await store.fetch("QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG", tmp_path / "none",
                                  max_bytes=1000, stall_timeout=2, deadline=30)

    asyncio.run(scenario())


def test_an_rpc_daemon_origin_updates_embedded_node_devices(daemon: JsIpfsDaemon, tmp_path: Path) -> None:
    fleet = Fleet(tmp_path / "fleet")
    try:
        fleet.start(with_origin=False)
        with open(fleet.operator_config, "a") as config:
            config.write(f'backend = "kubo-rpc"\nrpc_api = "{daemon.api}"\n')  # appended to [content]
        identity = asyncio.run(_identity(daemon.api))
        fleet.release(IPC, "1.0.0")
        device = fleet.add_device("embedded-dev", IPC, origin=identity)
        fleet.watcher.wait("embedded-dev", lambda s: s.phase == Phase.IDLE and s.last_sequence == 1)
        v2 = fleet.release(IPC, "2.0.0")  # added to the daemon over RPC; no seed directory involved
        state = fleet.watcher.wait("embedded-dev", lambda s: s.phase == Phase.DONE, timeout=90)
        assert state.used_delta and device.installed_sha256() == v2.artifact.sha256
        assert state.bytes_from_origin > 0, "the delta came from the daemon"
    finally:
        fleet.stop()


def test_a_device_on_an_rpc_daemon_fetches_from_the_embedded_origin(daemon: JsIpfsDaemon, tmp_path: Path) -> None:
    fleet = Fleet(tmp_path / "fleet")
    try:
        fleet.start()
        fleet.release(IPC, "1.0.0")
        device = fleet.add_device("rpc-dev", IPC, content_settings=(("backend", "kubo-rpc"), ("rpc_api", daemon.api)))
        fleet.watcher.wait("rpc-dev", lambda s: s.phase == Phase.IDLE and s.last_sequence == 1)
        v2 = fleet.release(IPC, "2.0.0")
        state = fleet.watcher.wait("rpc-dev", lambda s: s.phase == Phase.DONE, timeout=90)
        assert state.used_delta and device.installed_sha256() == v2.artifact.sha256
    finally:
        fleet.stop()


async def _identity(api: str) -> str:
    async with KuboRpcStore(api) as store:
        return store.multiaddr if "/p2p/" in store.multiaddr else f"{store.multiaddr}/p2p/{store.peer_id}"
