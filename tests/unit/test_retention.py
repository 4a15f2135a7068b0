"""What a device keeps serving to its peers: the pure rule, the blockstore sweep on a real Kubo
repo, and two device agents letting go of old releases (issue #7, swarming)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from device_client.retention import HeldRelease, releases_to_drop
from services.runtime.content import _blockstore as blockstore
from services.runtime.content import EmbeddedKuboNode, FetchStalled, KuboConfig
from tests.support.dag_blocks import cid_text, file_node, put


def held(sequence: int, size: int = 10) -> HeldRelease:
    return HeldRelease(sequence=sequence, version=f"{sequence}.0", cids=(f"cid-{sequence}",), size=size)


def sequences(releases: list[HeldRelease]) -> list[int]:
    return [r.sequence for r in releases]


# -- the rule -----------------------------------------------------------------------------------

def test_keeps_the_newest_releases_up_to_the_installed_one() -> None:
    releases = [held(1), held(2), held(3), held(4)]
    assert sequences(releases_to_drop(releases, installed_sequence=4, keep_releases=2, budget_bytes=None)) == [1, 2]
    assert sequences(releases_to_drop(releases, installed_sequence=4, keep_releases=1, budget_bytes=None)) == [1, 2, 3]
    assert releases_to_drop(releases, installed_sequence=4, keep_releases=4, budget_bytes=None) == []


def test_an_update_under_way_is_kept_on_top_of_the_count() -> None:
    # Sequence 5 was fetched but not installed (failed, to be retried): its blocks are the resume.
    releases = [held(3), held(4), held(5)]
    assert sequences(releases_to_drop(releases, installed_sequence=4, keep_releases=1, budget_bytes=None)) == [3]


def test_the_budget_drops_the_oldest_first_and_a_release_bigger_than_it_entirely() -> None:
    releases = [held(1, 40), held(2, 40), held(3, 40)]
    assert sequences(releases_to_drop(releases, installed_sequence=3, keep_releases=3, budget_bytes=100)) == [1]
    assert sequences(releases_to_drop(releases, installed_sequence=3, keep_releases=3, budget_bytes=40)) == [1, 2]
    assert sequences(releases_to_drop(releases, installed_sequence=3, keep_releases=3, budget_bytes=39)) == [1, 2, 3]


def test_keep_zero_serves_nothing_once_installed() -> None:
    assert sequences(releases_to_drop([held(1), held(2)], installed_sequence=2, keep_releases=0, budget_bytes=None)) == [1, 2]


@given(
    st.lists(st.tuples(st.integers(1, 30), st.integers(0, 100)), unique_by=lambda t: t[0], max_size=8),
    st.integers(0, 30), st.integers(0, 5), st.one_of(st.none(), st.integers(0, 400)),
)
def test_the_rule_partitions_what_is_held_and_honours_count_and_budget(
    spec: list[tuple[int, int]], installed: int, keep: int, budget: int | None
) -> None:
    releases = [held(seq, size) for seq, size in spec]
    dropped = releases_to_drop(releases, installed_sequence=installed, keep_releases=keep, budget_bytes=budget)
    kept = [r for r in releases if r not in dropped]
    assert sorted(sequences(dropped) + sequences(kept)) == sorted(sequences(releases))
    assert sequences(dropped) == sorted(sequences(dropped))
    assert len([r for r in kept if r.sequence <= installed]) <= keep
    if budget is not None:
        assert sum(r.size for r in kept) <= budget
    # Nothing newer than a kept release is dropped for age or size: the oldest go first.
    if kept and dropped:
        newest_dropped = max(r.sequence for r in dropped if r.sequence > installed) if any(
            r.sequence > installed for r in dropped) else None
        if newest_dropped is not None:
            assert all(r.sequence > newest_dropped for r in kept)


# -- the blockstore, on a real Kubo repo --------------------------------------------------------

def test_cids_and_links_parse_like_kubo_writes_them() -> None:
    v0 = blockstore.parse_cid("QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG")
    assert v0.codec == blockstore.DAG_PB and v0.multihash[:2] == b"\x12\x20" and len(v0.multihash) == 34
    v1 = blockstore.parse_cid("bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku")  # raw leaf of "hello world"
    assert v1.codec == blockstore.RAW and v1.multihash[:2] == b"\x12\x20"
    assert blockstore.decode_cid_bytes(v0.multihash) == v0
    for bad in ("Qm0000000000000000000000000000000000000000000l", "zb2rh", "b!!!", ""):
        with pytest.raises(blockstore.BadCid):
            blockstore.parse_cid(bad)
    with pytest.raises(blockstore.BadCid):
        blockstore.dag_pb_links(b"\x12\xff\x01")  # a link longer than the block


def test_sweep_frees_only_what_no_kept_release_shares(tmp_path: Path) -> None:
    old, new = tmp_path / "old.bin", tmp_path / "new.bin"
    shared = os.urandom(3 << 20)
    old.write_bytes(shared + os.urandom(2 << 20))
    new.write_bytes(shared + os.urandom(1 << 20))
    blocks = tmp_path / "repo" / "blocks"
    previous = Path.cwd()
    os.chdir(tmp_path)  # kubo.log

    async def scenario() -> tuple[dict, dict, int, int, bytes]:
        # fetch_in_memory_bytes=0: the fetch below pins and writes the file from the store.
        config = KuboConfig(repo=tmp_path / "repo", swarm_port=0, routing="none", fetch_in_memory_bytes=0)
        async with EmbeddedKuboNode(config) as node:
            before = blockstore.stored_bytes(blocks)
            old_cid, new_cid = await node.add(old), await node.add(new)
            old_dag, new_dag = blockstore.local_dag(blocks, [old_cid]), blockstore.local_dag(blocks, [new_cid])
            freed = await node.release([old_cid], [new_cid])
            left = blockstore.stored_bytes(blocks) - before
            out = tmp_path / "again.bin"
            await node.fetch(new_cid, out, max_bytes=new.stat().st_size, stall_timeout=10, deadline=30)
            # A CID nobody has stalls; the restart ends the blocked pin, and the node fetches again.
            with pytest.raises(FetchStalled):
                await node.fetch("QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG", tmp_path / "none", max_bytes=1 << 20,
                                 stall_timeout=2, deadline=30)
            assert not (tmp_path / "none").exists() and not (tmp_path / "none.partial").exists()
            (tmp_path / "again.bin").unlink()
            await node.fetch(new_cid, out, max_bytes=new.stat().st_size, stall_timeout=10, deadline=30)
            return old_dag, new_dag, freed, left, out.read_bytes()

    try:
        old_dag, new_dag, freed, left, again = asyncio.run(scenario())
    finally:
        os.chdir(previous)
    shared_blocks = set(old_dag) & set(new_dag)
    assert len(shared_blocks) >= 12, "the 3 MiB both files share are the same 256 KiB blocks"
    assert freed == sum(size for mh, size in old_dag.items() if mh not in shared_blocks)
    assert sum(new_dag.values()) <= left < sum(new_dag.values()) + 4096  # plus Kubo's own pin-set blocks
    assert all(not blockstore.block_path(blocks, mh).exists() for mh in set(old_dag) - shared_blocks)
    assert again == new.read_bytes(), "the kept release is intact"


def test_the_keeper_unpins_only_what_no_kept_release_names(tmp_path: Path) -> None:
    """The same bytes re-released under a new version have the same CID: dropping the old release
    must not unpin (or sweep) what the new one serves."""
    from device_client.content_keeper import ContentKeeper

    image, other = tmp_path / "image.bin", tmp_path / "other.bin"
    image.write_bytes(os.urandom(1 << 20))
    other.write_bytes(os.urandom(1 << 20))
    previous = Path.cwd()
    os.chdir(tmp_path)  # kubo.log

    async def scenario() -> tuple[list, list, list, int]:
        config = KuboConfig(repo=tmp_path / "repo", swarm_port=0, routing="none")
        async with EmbeddedKuboNode(config) as node:
            same, gone = await node.add(image), await node.add(other)  # adding pins both
            keeper = ContentKeeper(tmp_path / "held.json", keep_releases=1, budget_bytes=None)
            keeper.hold(1, "1.0.0", gone, 1 << 20)
            keeper.hold(1, "1.0.0", same, 1 << 20)
            keeper.hold(2, "1.0.1", same, 1 << 20)
            dropped = await keeper.settle(node, installed_sequence=2)
            blocks = blockstore.local_dag(tmp_path / "repo" / "blocks", [same])
            return [r.version for r in dropped], node.pinned(), [same, gone], sum(blocks.values())

    try:
        dropped, pins, (same, gone), kept_bytes = asyncio.run(scenario())
    finally:
        os.chdir(previous)
    assert dropped == ["1.0.0"]
    assert same in pins and gone not in pins
    assert kept_bytes >= 1 << 20


# -- device agents letting go of old releases ----------------------------------------------------


# -- writing a file from the store, one block at a time -----------------------------------------

def test_a_file_is_its_data_then_its_children_in_link_order(tmp_path: Path) -> None:
    blocks = tmp_path / "blocks"
    a, b = put(blocks, file_node(b"aaa")), put(blocks, file_node(b"bbbb"))
    inner = put(blocks, file_node(b"", (b, a)))
    root = put(blocks, file_node(b"head-", (a, inner, b)))
    out = tmp_path / "out"
    with open(out, "wb") as handle:
        assert blockstore.write_file(blocks, cid_text(root), handle, max_bytes=100) == 5 + 3 + 4 + 3 + 4
    assert out.read_bytes() == b"head-aaabbbbaaabbbb"


def test_hostile_dags_are_refused_without_writing_past_the_limit(tmp_path: Path) -> None:
    blocks = tmp_path / "blocks"
    leaf = put(blocks, file_node(b"x" * 1000))
    fan = put(blocks, file_node(b"", (leaf,) * 100))
    bomb = put(blocks, file_node(b"", (fan,) * 100))  # 10 MB of output from two small blocks
    empty = put(blocks, file_node(b""))
    empty_fan = put(blocks, file_node(b"", (empty,) * 1000))
    empty_bomb = put(blocks, file_node(b"", (empty_fan,) * 1000))  # a million blocks, not one byte
    directory = put(blocks, file_node(b"", (leaf,), kind=1))
    missing = put(blocks, file_node(b"", (b"\x12\x20" + bytes(32),)))
    sink = tmp_path / "sink"
    with open(sink, "wb") as handle:
        with pytest.raises(blockstore.TooLarge):
            blockstore.write_file(blocks, cid_text(bomb), handle, max_bytes=50_000)
    assert sink.stat().st_size <= 50_000
    with open(sink, "wb") as handle, pytest.raises(blockstore.TooLarge, match="links more than"):
        blockstore.write_file(blocks, cid_text(empty_bomb), handle, max_bytes=50_000)
    for cid in (directory, missing):
        with open(sink, "wb") as handle, pytest.raises(blockstore.NotAFile):
            blockstore.write_file(blocks, cid_text(cid), handle, max_bytes=50_000)
