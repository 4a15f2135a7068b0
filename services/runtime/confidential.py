"""Confidential payloads: per-class symmetric encryption of artifacts and deltas, streamed in chunks.

Peers cache and serve whatever they fetched; with a class key, what they hold is ciphertext. The
manifest signs the ciphertext's sha256 and size (what travels) and the plaintext's (what gets
installed), so a device checks both.

Format `secretbox-stream-v1`:

    header  b"ESBOX1\\0\\0" | chunk size (u32 BE) | 16-byte random nonce prefix
    chunks  SecretBox(key).encrypt(plaintext chunk, nonce = prefix | u64 BE (index, top bit = last))

The chunk index and the "last" flag inside each nonce make reordering, dropping or truncating
chunks fail authentication; memory use is one chunk whatever the file size.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import nacl.exceptions
import nacl.secret
import nacl.utils

from schemas.errors import EdgeswarmError, ReasonCode

MAGIC = b"ESBOX1\x00\x00"
HEADER = struct.Struct(">8sI16s")
LAST = 1 << 63
DEFAULT_CHUNK = 64 * 1024
MAX_CHUNK = 16 * 1024 * 1024
KEY_SIZE = nacl.secret.SecretBox.KEY_SIZE


class DecryptError(EdgeswarmError, ValueError):
    code = ReasonCode.DECRYPT_FAILED


def generate_class_key(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(nacl.utils.random(KEY_SIZE).hex() + "\n")


def load_class_key(path: Path) -> bytes:
    if path.stat().st_mode & 0o077:
        raise PermissionError(f"{path} is readable by others; expected 0600")
    key = bytes.fromhex(path.read_text().strip())
    if len(key) != KEY_SIZE:
        raise ValueError(f"{path}: a class key is {KEY_SIZE} bytes")
    return key


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    return prefix + struct.pack(">Q", index | (LAST if last else 0))


@dataclass(frozen=True)
class Sealed:
    plain_sha256: str
    plain_size: int


def encrypt_file(key: bytes, source: Path, dest: Path, *, chunk_size: int = DEFAULT_CHUNK) -> Sealed:
    box = nacl.secret.SecretBox(key)
    prefix = nacl.utils.random(16)
    digest = hashlib.sha256()
    size = 0
    with open(source, "rb") as src, open(dest, "wb") as out:
        out.write(HEADER.pack(MAGIC, chunk_size, prefix))
        chunk = src.read(chunk_size)
        index = 0
        while True:
            following = src.read(chunk_size)
            last = not following
            digest.update(chunk)
            size += len(chunk)
            out.write(box.encrypt(chunk, _nonce(prefix, index, last)).ciphertext)
            if last:
                break
            chunk, index = following, index + 1
    return Sealed(digest.hexdigest(), size)


def decrypt_file(key: bytes, source: Path, dest: Path) -> Sealed:
    box = nacl.secret.SecretBox(key)
    digest = hashlib.sha256()
    size = 0
    with open(source, "rb") as src, open(dest, "wb") as out:
        header = src.read(HEADER.size)
        if len(header) != HEADER.size:
            raise DecryptError("encrypted payload truncated in its header")
        magic, chunk_size, prefix = HEADER.unpack(header)
        if magic != MAGIC or not 0 < chunk_size <= MAX_CHUNK:
            raise DecryptError("not a secretbox-stream-v1 payload")
        record = chunk_size + nacl.secret.SecretBox.MACBYTES
        current = src.read(record)
        index = 0
        while True:
            following = src.read(record)
            last = not following
            try:
                plain = box.decrypt(current, _nonce(prefix, index, last))
            except nacl.exceptions.CryptoError:
                raise DecryptError(f"chunk {index} does not authenticate (wrong key, or altered, reordered or truncated)") from None
            digest.update(plain)
            size += len(plain)
            out.write(plain)
            if last:
                break
            current, index = following, index + 1
    return Sealed(digest.hexdigest(), size)
