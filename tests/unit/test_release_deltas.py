"""The release pipeline's delta policy: which bases, and when a delta is not worth shipping."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from services.runtime.content import HashOnlyStore
from services.runtime.delta import apply_delta, patch_info
from services.operator.home import OperatorHome, ReleaseRecord
from services.operator.release import ReleasePipeline, choose_bases


def _record(version: str, sequence: int) -> ReleaseRecord:
    return ReleaseRecord(version=version, sequence=sequence, sha256=f"{sequence:064x}", size=1, cid="c")


HISTORY = [_record(f"1.{i}.0", i + 1) for i in range(6)]


def test_without_fleet_tracking_the_last_releases_are_the_bases() -> None:
    assert [r.version for r in choose_bases(HISTORY, None, "f" * 64, 3)] == ["1.5.0", "1.4.0", "1.3.0"]
    assert [r.version for r in choose_bases(HISTORY, {}, "f" * 64, 3)] == ["1.5.0", "1.4.0", "1.3.0"]


def test_fleet_tracking_picks_the_versions_most_devices_run() -> None:
    fleet = {"1.0.0": 40, "1.4.0": 3, "1.2.0": 40, "9.9.9": 100, "1.5.0": 0}
    # most devices first, newer first on a tie; versions never released (9.9.9) cannot be bases
    assert [r.version for r in choose_bases(HISTORY, fleet, "f" * 64, 3)] == ["1.2.0", "1.0.0", "1.4.0"]
    assert [r.version for r in choose_bases(HISTORY, fleet, "f" * 64, 1)] == ["1.2.0"]


def test_the_new_version_itself_is_never_a_base() -> None:
    assert "1.5.0" not in [r.version for r in choose_bases(HISTORY, {"1.5.0": 9}, HISTORY[5].sha256, 3)]


@pytest.fixture
def pipeline(tmp_path: Path) -> tuple[ReleasePipeline, OperatorHome, HashOnlyStore]:
    home = OperatorHome(tmp_path / "operator")
    home.init("lab")
    store = HashOnlyStore(home.path / "cid-scratch", home.seed_dir)
    return ReleasePipeline(home, store), home, store


def _build(pipeline: ReleasePipeline, store: HashOnlyStore, version: str, image: Path, **kwargs) -> object:
    async def go():
        try:
            return await pipeline.build("ipc", version, image, target="/opt/fw.img", **kwargs)
        finally:
            await store.close()
    return asyncio.run(go())


def test_a_release_ships_esdelta_patches_only_when_they_save_a_fifth(pipeline, tmp_path: Path) -> None:
    pipe, home, store = pipeline
    rng = random.Random(5)
    v1 = tmp_path / "v1"
    v1.write_bytes(rng.randbytes(300_000) + bytes(200_000))
    v2 = tmp_path / "v2"
    v2.write_bytes(v1.read_bytes()[:100_000] + b"patched" * 50 + v1.read_bytes()[100_000:])
    v3 = tmp_path / "v3"
    v3.write_bytes(rng.randbytes(400_000))  # unrelated to both: a delta would cost as much as the artifact
    _build(pipe, store, "1.0.0", v1)
    built2 = _build(pipe, store, "2.0.0", v2)
    (delta,) = built2.manifest.deltas.values()
    assert delta.base_version == "1.0.0" and delta.size < 5_000
    patch = home.release_dir("ipc") / "2.0.0" / "delta-from-1.0.0.esd"
    assert patch_info(patch).new_sha256 == built2.manifest.artifact.sha256
    apply_delta(v1, patch, tmp_path / "out", expected_size=built2.manifest.artifact.installed_size)
    assert (tmp_path / "out").read_bytes() == v2.read_bytes()
    built3 = _build(pipe, store, "3.0.0", v3)
    assert built3.manifest.deltas == {}
    assert not list((home.release_dir("ipc") / "3.0.0").glob("*.esd"))


def test_fleet_tracking_decides_the_bases_of_a_release(pipeline, tmp_path: Path) -> None:
    pipe, home, store = pipeline
    base = random.Random(6).randbytes(200_000)
    images = {}
    for i in range(4):
        images[i] = tmp_path / f"v{i}"
        images[i].write_bytes(base[: 1000 * (i + 1)] + f"release {i}".encode() * 30 + base[1000 * (i + 1):])
        if i < 3:
            _build(pipe, store, f"1.{i}.0", images[i])
    built = _build(pipe, store, "1.3.0", images[3], fleet_versions={"1.0.0": 12, "1.2.0": 1})
    assert sorted(d.base_version for d in built.manifest.deltas.values()) == ["1.0.0", "1.2.0"]
