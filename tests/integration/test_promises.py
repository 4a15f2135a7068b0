"""Promises the docs make that no other test held to (issue 22): the fallback from an unusable
delta to the full artifact, the signed canary share of a staged release, `timestamp --every`
keeping a fleet out of `frozen`, and the total fetch deadline against a peer that trickles."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from schemas.models import Delta, Phase, ReleaseManifest
from services.demo.processes import terminate
from services.runtime.content import HashOnlyStore
from services.runtime.trust import BUCKETS, decode_envelope, payload_bytes, rollout_bucket
from tests.support.harness import Fleet
from tests.support.trickle_proxy import trickling_origin

pytestmark = pytest.mark.integration
IPC = "ipc-x86_64"


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path)
    try:
        fleet.start()
        yield fleet
    finally:
        fleet.stop()


def seed(fleet: Fleet, path: Path) -> str:
    """Hand a file to the origin to serve; its CID."""
    store = HashOnlyStore(fleet.home.path / "cid-scratch", fleet.home.seed_dir)

    async def add() -> str:
        try:
            return await store.add(path)
        finally:
            await store.close()

    return asyncio.run(add())


def test_a_delta_that_is_not_a_usable_patch_falls_back_to_the_full_artifact(fleet: Fleet, tmp_path: Path) -> None:
    """Signed and served as signed (its hash checks out), but not a patch: the device fetches the
    full artifact instead and installs it (docs/device-agent.md)."""
    fleet.release(IPC, "1.0.0")
    device = fleet.add_device("fallback", IPC)
    fleet.watcher.wait("fallback", lambda s: s.phase == Phase.IDLE and s.last_sequence == 1)
    good = fleet.build_only(IPC, "2.0.0").manifest
    junk = tmp_path / "not-a-patch.esd"
    junk.write_bytes(b"ESDELTA1 but nothing after it " * 100)
    (base, delta), = good.deltas.items()
    unusable = Delta(cid=seed(fleet, junk), sha256=hashlib.sha256(junk.read_bytes()).hexdigest(),
                     size=junk.stat().st_size, base_version=delta.base_version)
    fleet.vouch_and_publish(IPC, good.model_copy(update={"deltas": {base: unusable}}))
    state = fleet.watcher.wait("fallback", lambda s: s.phase == Phase.DONE, timeout=90)
    assert state.installed_version == "2.0.0" and state.used_delta is False
    assert device.installed_sha256() == good.artifact.sha256 == state.installed_sha256
    assert "delta unusable" in fleet.log("fallback")


def test_a_staged_release_installs_at_once_on_its_signed_canary_share_and_waits_elsewhere(fleet: Fleet) -> None:
    fleet.release(IPC, "1.0.0")
    names = [f"stage-{i}" for i in range(6)]
    for name in names:
        fleet.add_device(name, IPC)
    for name in names:
        fleet.watcher.wait(name, lambda s: s.phase == Phase.IDLE and s.last_sequence == 1)
    fleet.cli("release", IPC, "2.0.0", str(fleet.image(IPC, "2.0.0")), "--staged", "--canary-percent", "50",
              "--config", str(fleet.operator_config))
    rule = ReleaseManifest.from_bytes(payload_bytes(decode_envelope(fleet.home.latest_manifest(IPC) or b"")),
                                      max_bytes=1 << 20).rollout
    assert rule is not None and rule.canary_percent == 50
    canaries = {n for n in names if rollout_bucket(rule.salt, n) < 50 * BUCKETS // 100}
    for name in names:
        if name in canaries:
            state = fleet.watcher.wait(name, lambda s: s.phase == Phase.DONE, timeout=90)
            assert state.installed_version == "2.0.0"
        else:
            state = fleet.watcher.wait(name, lambda s: s.phase == Phase.WAITING, timeout=90)
            assert state.reason_code == "awaiting_rollout" and state.installed_version == "1.0.0"
    time.sleep(2)  # the waiting ones stay waiting: nobody admitted them
    assert all(fleet.watcher.states[n].installed_version == "1.0.0" for n in set(names) - canaries)


def test_timestamp_every_keeps_devices_out_of_frozen_and_stopping_it_freezes_them(fleet: Fleet) -> None:
    fleet.release(IPC, "1.0.0")
    fleet.add_device("fresh", IPC)
    fleet.watcher.wait("fresh", lambda s: s.phase == Phase.IDLE and s.last_sequence == 1)
    lifetime_hours = 4 / 3600  # each timestamp lives 4 s, re-signed every second
    signer = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "timestamp", "--config", str(fleet.operator_config), "--every", "1",
         "--expires-hours", f"{lifetime_hours:.6f}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, cwd=fleet.root,
        start_new_session=True)
    try:
        started = datetime.now(UTC)
        time.sleep(12)  # three lifetimes
        assert signer.poll() is None
        frozen = [s for s in fleet.watcher.history["fresh"] if s.timestamp >= started and s.phase == Phase.FROZEN]
        assert not frozen, frozen
    finally:
        terminate(signer)
    stopped = datetime.now(UTC)
    state = fleet.watcher.wait("fresh", lambda s: s.timestamp >= stopped and s.phase == Phase.FROZEN, timeout=30)
    assert state.reason_code in ("frozen", "expired")


def test_a_peer_that_trickles_is_stopped_by_the_total_fetch_deadline(fleet: Fleet) -> None:
    """docs/security.md: slow retrieval is abandoned after stall_timeout without progress *and* a
    total deadline. A peer sending ~100 KB/s never stalls (a block every few seconds), so only the
    deadline stops it; the device fails the attempt (retried later) and keeps its version."""
    fleet.release(IPC, "1.0.0")
    with trickling_origin(fleet.origin_addr, 100_000, count=fleet.root / "trickled") as through_proxy:
        device = fleet.add_device("trickled", IPC, start=False, stall_timeout=30.0, origin=through_proxy)
        config = device.process.config
        config.write_text(config.read_text().replace("stall_timeout = 30.0\n", "stall_timeout = 30.0\nfetch_deadline = 8\n"))
        fleet.start_device("trickled")
        fleet.watcher.wait("trickled", lambda s: s.phase == Phase.IDLE and s.last_sequence == 1)
        v1 = device.installed_sha256()
        full_only = fleet.build_only(IPC, "2.0.0").manifest.model_copy(update={"deltas": {}})  # ~6 MB to fetch
        assert full_only.artifact.size > 2_000_000
        sent = datetime.now(UTC)
        fleet.vouch_and_publish(IPC, full_only)
        state = fleet.watcher.wait("trickled", lambda s: s.timestamp >= sent and s.reason_code == "fetch_deadline",
                                   timeout=60)
        elapsed = (state.timestamp - sent).total_seconds()
        assert state.phase == Phase.FAILED and state.retrying and state.installed_version == "1.0.0"
        # It trickled (the peer kept sending, far from all of it), and the 8 s deadline ended it, not
        # the 30 s stall timeout.
        passed = int((fleet.root / "trickled").read_text())
        assert 200_000 < passed < full_only.artifact.size / 2, passed
        assert 7.5 <= elapsed < 30, elapsed
        assert device.installed_sha256() == v1
