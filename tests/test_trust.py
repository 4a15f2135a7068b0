"""The pure trust rules, attack by attack: bytes in, accepted document or a named refusal out."""

from __future__ import annotations

import base64
import json
from datetime import timedelta

import pytest

from schemas.models import PayloadType, Role, RoleKeys
from services.keys import SigningKey, sign_envelope
from services.trust import (
    BadSignature, DeviceRecord, Expired, MalformedMetadata, Rollback, RootChainGap, ThresholdNotMet,
    TrustedSet, UnknownKey, WrongClass, WrongFleet, WrongTarget, WrongType,
)
from tests.factories import NOW, SHA_V1, TARGET, Keyring, manifest, sign_release, sign_root

ON_V1 = DeviceRecord(installed_version="1.0.0", installed_sha256=SHA_V1, last_sequence=1)


@pytest.fixture
def keys() -> Keyring:
    return Keyring()


@pytest.fixture
def trusted(keys: Keyring) -> TrustedSet:
    root = TrustedSet.load_initial_root(sign_root(keys.root_metadata(), keys.root[:2]))
    return TrustedSet(root, device_class="ipc", install_target=TARGET)


def test_a_release_signed_by_a_threshold_of_release_keys_is_accepted(trusted: TrustedSet, keys: Keyring) -> None:
    accepted = trusted.verify_release(sign_release(manifest(), keys.release[:2]), ON_V1, NOW)
    assert accepted.version == "2.0.0" and accepted.sequence == 2


def test_one_signature_short_of_the_threshold_is_refused(trusted: TrustedSet, keys: Keyring) -> None:
    with pytest.raises(ThresholdNotMet):
        trusted.verify_release(sign_release(manifest(), keys.release[:1]), ON_V1, NOW)


def test_the_same_key_signing_twice_counts_once(trusted: TrustedSet, keys: Keyring) -> None:
    with pytest.raises(ThresholdNotMet):
        trusted.verify_release(sign_release(manifest(), [keys.release[0], keys.release[0]]), ON_V1, NOW)


def test_an_unknown_key_is_refused(trusted: TrustedSet) -> None:
    strangers = [SigningKey.generate("release"), SigningKey.generate("release")]
    with pytest.raises(UnknownKey):
        trusted.verify_release(sign_release(manifest(), strangers), ON_V1, NOW)


def test_a_key_of_the_wrong_role_does_not_count(trusted: TrustedSet, keys: Keyring) -> None:
    with pytest.raises(UnknownKey):
        trusted.verify_release(sign_release(manifest(), keys.root[:2]), ON_V1, NOW)


def test_a_signature_over_other_bytes_is_a_bad_signature(trusted: TrustedSet, keys: Keyring) -> None:
    envelope = json.loads(sign_release(manifest(), keys.release[:2]))
    envelope["payload"] = base64.b64encode(manifest(summary="tampered").canonical_bytes()).decode()
    with pytest.raises(BadSignature):
        trusted.verify_release(json.dumps(envelope).encode(), ON_V1, NOW)


def test_a_root_document_cannot_pass_as_a_release(trusted: TrustedSet, keys: Keyring) -> None:
    with pytest.raises(WrongType):
        trusted.verify_release(sign_root(keys.root_metadata(), keys.root), ON_V1, NOW)


def test_a_release_relabelled_as_root_fails_because_signatures_bind_the_type() -> None:
    # The same keys hold both roles, so only the type inside the signed bytes stops the confusion.
    shared = [SigningKey.generate("root") for _ in range(2)]
    keys = Keyring(root=shared, release=shared)
    trusted = TrustedSet(TrustedSet.load_initial_root(sign_root(keys.root_metadata(), shared)), device_class="ipc",
                         install_target=TARGET)
    envelope = json.loads(sign_release(manifest(), shared))
    envelope["payload_type"] = PayloadType.ROOT.value
    with pytest.raises(BadSignature):
        trusted.update_root(json.dumps(envelope).encode())


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"fleet": "other"}, WrongFleet),
        ({"device_class": "gateway"}, WrongClass),
        ({"install": {"handler": "file", "target": "/etc/passwd"}}, WrongTarget),
        ({"expires": NOW - timedelta(seconds=1)}, Expired),
        ({"sequence": 1}, Rollback),
        ({"sequence": 3, "version": "0.9.0"}, Rollback),
    ],
    ids=["other-fleet", "other-class", "other-target", "expired", "same-sequence-other-content", "older-version"],
)
def test_mix_and_match_replay_and_freeze_are_refused(trusted: TrustedSet, keys: Keyring, changes: dict, error: type) -> None:
    m = manifest()
    if "install" in changes:
        changes = {"install": m.install.model_copy(update=changes["install"])}
    with pytest.raises(error):
        trusted.verify_release(sign_release(m.model_copy(update=changes), keys.release[:2]), ON_V1, NOW)


def test_an_older_sequence_is_a_rollback(trusted: TrustedSet, keys: Keyring) -> None:
    on_seq_5 = DeviceRecord("1.0.0", SHA_V1, 5)
    with pytest.raises(Rollback):
        trusted.verify_release(sign_release(manifest(sequence=4), keys.release[:2]), on_seq_5, NOW)


def test_the_manifest_already_applied_is_accepted_again_harmlessly(trusted: TrustedSet, keys: Keyring) -> None:
    on_v2 = DeviceRecord("2.0.0", "2" * 64, 2)
    assert trusted.verify_release(sign_release(manifest(), keys.release[:2]), on_v2, NOW).sequence == 2


def test_an_expired_root_refuses_every_release(keys: Keyring) -> None:
    root = keys.root_metadata(expires=NOW - timedelta(days=1))
    trusted = TrustedSet(TrustedSet.load_initial_root(sign_root(root, keys.root)), device_class="ipc", install_target=TARGET)
    with pytest.raises(Expired):
        trusted.verify_release(sign_release(manifest(), keys.release[:2]), ON_V1, NOW)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"\xff\xfe{}",
        b'{"payload_type": "application/vnd.edgeswarm.release+json", "payload": "", "signatures": [], "extra": 1}',
        b'{"payload_type": "application/vnd.edgeswarm.release+json", "payload": "!!", "signatures": []}',
        b'{"payload_type": 5, "payload": "", "signatures": []}',
        b'{"a": NaN}',
        b'{"a": 1, "a": 2}',
        b"[" * 100 + b"]" * 100,
        b'{"n": ' + b"9" * 5000 + b"}",
    ],
    ids=["empty", "garbage", "bad-utf8", "unknown-field", "bad-base64", "wrong-type", "nan", "duplicate-key", "deep", "huge-int"],
)
def test_malformed_input_is_refused_before_any_signature_check(trusted: TrustedSet, raw: bytes) -> None:
    with pytest.raises(MalformedMetadata):
        trusted.verify_release(raw, ON_V1, NOW)


def test_an_oversized_document_is_refused_before_parsing(trusted: TrustedSet, keys: Keyring) -> None:
    huge = sign_release(manifest(summary="x" * 1000), keys.release[:2]) + b" " * (70 * 1024)
    with pytest.raises(MalformedMetadata, match="exceeds the limit"):
        trusted.verify_release(huge, ON_V1, NOW)


def test_a_non_canonical_payload_is_refused_even_when_signed(trusted: TrustedSet, keys: Keyring) -> None:
    pretty = json.dumps(json.loads(manifest().canonical_bytes()), indent=2).encode()
    envelope = sign_envelope(PayloadType.RELEASE, pretty, keys.release[:2]).canonical_bytes()
    with pytest.raises(MalformedMetadata, match="canonical"):
        trusted.verify_release(envelope, ON_V1, NOW)


def test_a_signed_payload_with_unknown_fields_is_refused(trusted: TrustedSet, keys: Keyring) -> None:
    doc = json.loads(manifest().canonical_bytes())
    doc["run_this"] = "rm -rf /"
    payload = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(MalformedMetadata):
        trusted.verify_release(sign_envelope(PayloadType.RELEASE, payload, keys.release[:2]).canonical_bytes(), ON_V1, NOW)


# -- root rotation ---------------------------------------------------------------------------------


def test_root_rotation_needs_old_and_new_thresholds_and_revokes_old_release_keys(trusted: TrustedSet, keys: Keyring) -> None:
    new_release = [SigningKey.generate("release") for _ in range(2)]
    rotated = Keyring(root=keys.root, release=new_release, timestamp=keys.timestamp).root_metadata(version=2)
    trusted.update_root(sign_root(rotated, keys.root[:2]))
    assert trusted.root.version == 2
    with pytest.raises(UnknownKey):
        trusted.verify_release(sign_release(manifest(), keys.release[:2]), ON_V1, NOW)
    assert trusted.verify_release(sign_release(manifest(), new_release), ON_V1, NOW).sequence == 2


def test_a_new_root_signed_only_by_its_own_new_keys_is_refused(trusted: TrustedSet) -> None:
    usurper = Keyring()
    with pytest.raises(UnknownKey):
        trusted.update_root(sign_root(usurper.root_metadata(version=2), usurper.root))


def test_a_new_root_not_signed_by_its_own_threshold_is_refused(trusted: TrustedSet, keys: Keyring) -> None:
    new_keys = Keyring()
    new_root = new_keys.root_metadata(version=2)  # new root keys never signed it
    with pytest.raises(ThresholdNotMet):
        trusted.update_root(sign_root(new_root, keys.root[:2] + new_keys.root[:1]))


def test_root_versions_must_be_walked_one_step_at_a_time(trusted: TrustedSet, keys: Keyring) -> None:
    with pytest.raises(RootChainGap):
        trusted.update_root(sign_root(keys.root_metadata(version=3), keys.root[:2]))
    with pytest.raises(Rollback):
        trusted.update_root(sign_root(keys.root_metadata(version=1), keys.root[:2]))


def test_a_root_for_another_fleet_is_refused(trusted: TrustedSet, keys: Keyring) -> None:
    with pytest.raises(WrongFleet):
        trusted.update_root(sign_root(keys.root_metadata(version=2, fleet="other"), keys.root[:2]))


def test_a_provisioned_root_must_meet_its_own_threshold(keys: Keyring) -> None:
    with pytest.raises(ThresholdNotMet):
        TrustedSet.load_initial_root(sign_root(keys.root_metadata(root_threshold=3), keys.root[:2]))


def test_a_role_with_no_keys_in_root_signs_nothing(keys: Keyring) -> None:
    root = keys.root_metadata()
    roles = dict(root.roles)
    roles[Role.RELEASE] = RoleKeys(keyids=["f" * 64], threshold=1)
    broken = root.model_copy(update={"roles": roles})
    trusted = TrustedSet(broken, device_class="ipc", install_target=TARGET)
    with pytest.raises(UnknownKey):
        trusted.verify_release(sign_release(manifest(), [keys.release[0]]), ON_V1, NOW)
