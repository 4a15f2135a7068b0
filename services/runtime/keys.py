"""Ed25519 keys (PyNaCl): generate, save with 0600 permissions, load, sign and verify envelopes."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import nacl.exceptions
import nacl.pwhash
import nacl.secret
import nacl.signing
import nacl.utils

from schemas.errors import EdgeswarmError, ReasonCode
from schemas.models import PayloadType, PublicKey, Signature, SignedEnvelope


def key_id(public: bytes) -> str:
    return hashlib.sha256(public).hexdigest()


def pre_auth_encoding(payload_type: str, payload: bytes) -> bytes:
    """Bind a signature to the payload's type and length (DSSE's PAE) so bytes cannot be reinterpreted."""
    kind = payload_type.encode()
    return b"EDGESWARMv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


@dataclass(frozen=True)
class SigningKey:
    role: str
    private: nacl.signing.SigningKey

    @classmethod
    def generate(cls, role: str) -> SigningKey:
        return cls(role, nacl.signing.SigningKey.generate())

    @property
    def public_bytes(self) -> bytes:
        return bytes(self.private.verify_key)

    @property
    def keyid(self) -> str:
        return key_id(self.public_bytes)

    def public_key(self) -> PublicKey:
        return PublicKey(public=self.public_bytes.hex())

    def sign(self, payload_type: PayloadType, payload: bytes) -> Signature:
        sig = self.private.sign(pre_auth_encoding(payload_type.value, payload)).signature
        return Signature(keyid=self.keyid, sig=sig.hex())

    def save(self, path: Path, passphrase: str | None = None) -> None:
        """Write the private key readable by its owner only (created 0600, never widened).

        With a passphrase the seed is sealed with XSalsa20-Poly1305 (SecretBox) under a key
        derived by Argon2id, so a copied key file alone signs nothing.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        record: dict[str, object] = {"role": self.role, "keyid": self.keyid}
        seed = bytes(self.private)
        if passphrase is None:
            record["ed25519_seed"] = seed.hex()
        else:
            salt = nacl.utils.random(nacl.pwhash.argon2id.SALTBYTES)
            box = nacl.secret.SecretBox(_derive(passphrase, salt, KDF_OPS, KDF_MEM))
            record["sealed_seed"] = {
                "kdf": "argon2id", "opslimit": KDF_OPS, "memlimit": KDF_MEM, "salt": salt.hex(),
                "ciphertext": bytes(box.encrypt(seed)).hex(),
            }
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(json.dumps(record).encode())

    @staticmethod
    def is_sealed(path: Path) -> bool:
        return "sealed_seed" in json.loads(path.read_text())

    @classmethod
    def load(cls, path: Path, passphrase: str | None = None) -> SigningKey:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise PermissionError(f"{path} is readable by others (mode {mode:o}); expected 0600")
        data = json.loads(path.read_text())
        if "sealed_seed" in data:
            if passphrase is None:
                raise KeyLocked(f"{path} is encrypted: a passphrase is needed")
            sealed = data["sealed_seed"]
            box = nacl.secret.SecretBox(_derive(passphrase, bytes.fromhex(sealed["salt"]), sealed["opslimit"], sealed["memlimit"]))
            try:
                seed = box.decrypt(bytes.fromhex(sealed["ciphertext"]))
            except nacl.exceptions.CryptoError:
                raise KeyLocked(f"{path}: wrong passphrase") from None
        else:
            seed = bytes.fromhex(data["ed25519_seed"])
        key = cls(data["role"], nacl.signing.SigningKey(seed))
        if key.keyid != data["keyid"]:
            raise ValueError(f"{path}: key id does not match the key")
        return key


class KeyLocked(EdgeswarmError):
    """An encrypted key file and no (or the wrong) passphrase."""

    code = ReasonCode.KEY_LOCKED


# Argon2id cost for key files: interactive limits (about 0.1 s, 64 MiB) keep CLI use snappy.
KDF_OPS = nacl.pwhash.argon2id.OPSLIMIT_INTERACTIVE
KDF_MEM = nacl.pwhash.argon2id.MEMLIMIT_INTERACTIVE


def _derive(passphrase: str, salt: bytes, opslimit: int, memlimit: int) -> bytes:
    return nacl.pwhash.argon2id.kdf(
        nacl.secret.SecretBox.KEY_SIZE, passphrase.encode(), salt, opslimit=opslimit, memlimit=memlimit
    )


def verify_signature(public: PublicKey, signature: Signature, payload_type: str, payload: bytes) -> bool:
    try:
        nacl.signing.VerifyKey(bytes.fromhex(public.public)).verify(
            pre_auth_encoding(payload_type, payload), bytes.fromhex(signature.sig)
        )
    except (nacl.exceptions.BadSignatureError, ValueError):
        return False
    return True


def sign_envelope(payload_type: PayloadType, payload: bytes, keys: list[SigningKey]) -> SignedEnvelope:
    return SignedEnvelope(
        payload_type=payload_type,
        payload=base64.b64encode(payload).decode(),
        signatures=[key.sign(payload_type, payload) for key in keys],
    )
