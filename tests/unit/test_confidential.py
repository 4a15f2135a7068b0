"""Confidential payloads (per-class encryption) and a private IPFS swarm (issue #4, item 8)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from services.runtime.confidential import DEFAULT_CHUNK, HEADER, DecryptError, decrypt_file, encrypt_file
from services.runtime.content import EmbeddedKuboNode, KuboConfig, generate_swarm_key, load_swarm_key
from services.runtime.files import sha256_file

KEY = bytes(range(32))
RECORD = DEFAULT_CHUNK + 16


@pytest.mark.parametrize("size", [0, 1, DEFAULT_CHUNK - 1, DEFAULT_CHUNK, DEFAULT_CHUNK + 1, 3 * DEFAULT_CHUNK + 17])
def test_encrypted_payloads_round_trip(tmp_path: Path, size: int) -> None:
    plain, sealed, opened = tmp_path / "p", tmp_path / "s", tmp_path / "o"
    plain.write_bytes(os.urandom(size))
    info = encrypt_file(KEY, plain, sealed)
    assert info.plain_size == size and info.plain_sha256 == sha256_file(plain)
    assert decrypt_file(KEY, sealed, opened) == info
    assert opened.read_bytes() == plain.read_bytes()


@pytest.fixture
def sealed(tmp_path: Path) -> Path:
    plain = tmp_path / "plain"
    plain.write_bytes(b"secret firmware " * 20_000)  # five chunks
    out = tmp_path / "sealed"
    encrypt_file(KEY, plain, out)
    return out


def _chunks(data: bytes) -> tuple[bytes, list[bytes]]:
    body = data[HEADER.size:]
    return data[: HEADER.size], [body[i:i + RECORD] for i in range(0, len(body), RECORD)]


@pytest.mark.parametrize("attack", ["wrong-key", "flipped-bit", "dropped-last-chunk", "reordered", "duplicated-chunk", "bad-header"])
def test_altered_ciphertext_or_the_wrong_key_never_decrypts(tmp_path: Path, sealed: Path, attack: str) -> None:
    header, chunks = _chunks(sealed.read_bytes())
    key = KEY
    if attack == "wrong-key":
        key = bytes(32)
    elif attack == "flipped-bit":
        chunks[2] = chunks[2][:100] + bytes([chunks[2][100] ^ 1]) + chunks[2][101:]
    elif attack == "dropped-last-chunk":
        chunks = chunks[:-1]
    elif attack == "reordered":
        chunks[0], chunks[1] = chunks[1], chunks[0]
    elif attack == "duplicated-chunk":
        chunks.insert(1, chunks[1])
    else:
        header = b"NOTBOX\x00\x00" + header[8:]
    sealed.write_bytes(header + b"".join(chunks))
    with pytest.raises(DecryptError):
        decrypt_file(key, sealed, tmp_path / "out")


def test_nodes_without_the_swarm_key_cannot_connect(tmp_path: Path) -> None:
    generate_swarm_key(tmp_path / "swarm.key")
    generate_swarm_key(tmp_path / "other.key")
    fleet_key, other_key = load_swarm_key(tmp_path / "swarm.key"), load_swarm_key(tmp_path / "other.key")
    previous = Path.cwd()
    os.chdir(tmp_path)  # kubo.log

    async def scenario() -> tuple[bool, bool, bool]:
        async with EmbeddedKuboNode(KuboConfig(repo=tmp_path / "a", swarm_port=0, swarm_key=fleet_key)) as a, \
                EmbeddedKuboNode(KuboConfig(repo=tmp_path / "b", swarm_port=0, swarm_key=fleet_key)) as b, \
                EmbeddedKuboNode(KuboConfig(repo=tmp_path / "c", swarm_port=0, swarm_key=other_key)) as c, \
                EmbeddedKuboNode(KuboConfig(repo=tmp_path / "d", swarm_port=0)) as d:
            return await b.connect(a.multiaddr), await c.connect(a.multiaddr), await d.connect(a.multiaddr)

    try:
        same, other, none = asyncio.run(scenario())
    finally:
        os.chdir(previous)
    assert (same, other, none) == (True, False, False)
