"""Hand-made dag-pb UnixFS blocks written into a flatfs blockstore, as Kubo lays them out: DAGs of
any shape (hostile ones too) without a node."""

from __future__ import annotations

import hashlib
from pathlib import Path

from services.runtime.content import _blockstore as blockstore

varint = blockstore.encode_varint


def pb(*fields: tuple[int, bytes | int]) -> bytes:
    """A protobuf message: integers as varints, bytes length-delimited."""
    out = bytearray()
    for number, value in fields:
        if isinstance(value, int):
            out += varint((number << 3) | 0) + varint(value)
        else:
            out += varint((number << 3) | 2) + varint(len(value)) + value
    return bytes(out)


def put(blocks: Path, block: bytes) -> bytes:
    """Store a dag-pb block; returns its CIDv0 bytes (a sha2-256 multihash)."""
    multihash = b"\x12\x20" + hashlib.sha256(block).digest()
    path = blockstore.block_path(blocks, multihash)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(block)
    return multihash


def cid_text(multihash: bytes) -> str:
    """CIDv0 text (base58btc) of a sha2-256 multihash."""
    return blockstore.b58encode(multihash)


def file_node(data: bytes = b"", links: tuple[bytes, ...] = (), kind: int = 2,
              sizes: tuple[int, ...] | None = None) -> bytes:
    """A UnixFS file node (kind 2; 1 is a directory) with `data` and `links` (binary CIDs), each
    announcing its size in `sizes` (Tsize) when given."""
    entries = [pb((1, link), *([(3, sizes[n])] if sizes is not None else [])) for n, link in enumerate(links)]
    return pb(*[(2, entry) for entry in entries], (1, pb((1, kind), (2, data))))
