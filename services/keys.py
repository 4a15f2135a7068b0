"""Ed25519 keys (PyNaCl): generate, save with 0600 permissions, load, sign and verify envelopes."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import nacl.exceptions
import nacl.signing

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

    def save(self, path: Path) -> None:
        """Write the private key readable by its owner only; the file is created 0600, never widened."""
        path.parent.mkdir(parents=True, exist_ok=True)
        body = json.dumps(
            {"role": self.role, "keyid": self.keyid, "ed25519_seed": bytes(self.private).hex()}
        ).encode()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(body)

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise PermissionError(f"{path} is readable by others (mode {mode:o}); expected 0600")
        data = json.loads(path.read_text())
        key = cls(data["role"], nacl.signing.SigningKey(bytes.fromhex(data["ed25519_seed"])))
        if key.keyid != data["keyid"]:
            raise ValueError(f"{path}: key id does not match the key")
        return key


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
