"""The fleet service records, shows and rolls out only releases that verify (issue 20, item 6)."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import pytest

from schemas import topics
from services.operator.fleet_service import FleetService, OpsTokens
from services.operator.fleet_store import FleetStore
from services.runtime.keys import SigningKey
from services.runtime.trust import TrustedSet, decode_envelope, payload_bytes
from tests.support.factories import NOW, Keyring, manifest, sign_release, sign_root

RELEASE_TOPIC = topics.release_topic("f1", "ipc")


@pytest.fixture
def keys() -> Keyring:
    return Keyring()


@pytest.fixture
def service(tmp_path: Path, keys: Keyring) -> FleetService:
    root = TrustedSet.load_initial_root(sign_root(keys.root_metadata(), keys.root[:2]))
    store = FleetStore.sqlite(tmp_path / "fleet.sqlite")
    return FleetService("f1", store, OpsTokens.load_or_create(tmp_path / "tokens"), root, clock=lambda: NOW)


def test_a_release_signed_by_the_release_role_is_recorded_with_its_payload_hash(service: FleetService,
                                                                               keys: Keyring) -> None:
    raw = sign_release(manifest(), keys.release[:2])
    service._on_release(RELEASE_TOPIC, raw)
    known = service.releases["ipc"]
    assert known.manifest.version == "2.0.0"
    assert known.payload_sha256 == hashlib.sha256(payload_bytes(decode_envelope(raw))).hexdigest()


@pytest.mark.parametrize("signers", ["strangers", "below-threshold", "root-keys"])
def test_a_release_that_does_not_verify_is_neither_recorded_nor_replaces_the_genuine_one(
        service: FleetService, keys: Keyring, signers: str) -> None:
    genuine = sign_release(manifest(), keys.release[:2])
    service._on_release(RELEASE_TOPIC, genuine)
    chosen = {"strangers": [SigningKey.generate("x"), SigningKey.generate("y")], "below-threshold": keys.release[:1],
              "root-keys": keys.root[:2]}[signers]
    forged = sign_release(manifest(version="9.0.0", sequence=99), chosen)
    service._on_release(RELEASE_TOPIC, forged)
    assert service.releases["ipc"].manifest.sequence == 2


def test_an_expired_or_other_fleet_release_is_refused(service: FleetService, keys: Keyring) -> None:
    service._on_release(RELEASE_TOPIC, sign_release(manifest(expires=NOW), keys.release[:2]))
    service._on_release(RELEASE_TOPIC, sign_release(manifest(fleet="f2"), keys.release[:2]))
    assert service.releases == {}


def test_a_release_signed_by_rotated_keys_verifies_once_the_root_chain_is_walked(service: FleetService,
                                                                                keys: Keyring) -> None:
    new_keys = replace(keys, release=[SigningKey.generate("release") for _ in range(3)])
    root_v2 = sign_root(new_keys.root_metadata(version=2), keys.root[:2])
    raw = sign_release(manifest(sequence=3), new_keys.release[:2])
    service._on_release(RELEASE_TOPIC, raw)  # retained messages arrive in any order: the release first
    assert "ipc" not in service.releases
    service._on_root(topics.root_topic("f1", 2), root_v2)
    assert service.root.version == 2 and service.releases["ipc"].manifest.sequence == 3
    service._on_release(RELEASE_TOPIC, sign_release(manifest(sequence=4), keys.release[:2]))
    assert service.releases["ipc"].manifest.sequence == 3, "the revoked release keys no longer count"


def test_roots_ahead_of_a_gap_are_bounded(service: FleetService, keys: Keyring) -> None:
    junk = b"x" * 1000
    for version in range(3, 1003):
        service._on_root(topics.root_topic("f1", version), junk)
    assert len(service._roots_ahead) <= 8 and service._roots_ahead.lowest() == 3
