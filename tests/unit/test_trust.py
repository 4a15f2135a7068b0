"""The pure trust rules, attack by attack: bytes in, accepted document or a named refusal out."""

from __future__ import annotations

import base64
import json
from datetime import timedelta

import pytest

from schemas.models import PayloadType, Role, RoleKeys
from services.runtime.keys import SigningKey, sign_envelope
from schemas.models import ReleaseManifest
from services.runtime.trust import (
    BadSignature, DeviceRecord, Expired, FreezeDetected, MalformedMetadata, Rollback, RootChainGap, RootOutdated,
    ThresholdNotMet, TimestampMismatch, TrustedSet, UnknownKey, WrongClass, WrongFleet, WrongTarget, WrongType,
)
from tests.support.factories import (
    NOW, SHA_V1, TARGET, Keyring, manifest, sign_release, sign_root, sign_timestamp, timestamp,
)

ON_V1 = DeviceRecord(installed_version="1.0.0", installed_sha256=SHA_V1, last_sequence=1)


@pytest.fixture
def keys() -> Keyring:
    return Keyring()


@pytest.fixture
def trusted(keys: Keyring) -> TrustedSet:
    root = TrustedSet.load_initial_root(sign_root(keys.root_metadata(), keys.root[:2]))
    return TrustedSet(root, device_class="ipc", install_target=TARGET)


def vouch(trusted: TrustedSet, keys: Keyring, envelope: bytes, m: ReleaseManifest, *, version: int = 1) -> bytes:
    """Have the timestamp role name this release, as the operator does right after releasing it."""
    trusted.update_timestamp(sign_timestamp(timestamp(keys, {m.device_class: (m.sequence, envelope)}, version=version,
                                                      root_version=trusted.root.version), keys.timestamp), NOW)
    return envelope


def offer(trusted: TrustedSet, keys: Keyring, m: ReleaseManifest, signers: list[SigningKey] | None = None,
          record: DeviceRecord = ON_V1) -> ReleaseManifest:
    envelope = sign_release(m, keys.release[:2] if signers is None else signers)
    vouch(trusted, keys, envelope, m, version=trusted.timestamp_floor + 1)
    return trusted.verify_release(envelope, record, NOW)


def test_a_release_signed_by_a_threshold_of_release_keys_is_accepted(trusted: TrustedSet, keys: Keyring) -> None:
    accepted = offer(trusted, keys, manifest())
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
    assert offer(trusted, keys, manifest(), record=on_v2).sequence == 2


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
    update = trusted.update_root(sign_root(rotated, keys.root[:2]))
    assert trusted.root.version == 2 and update.revoked_roles == {Role.RELEASE}
    with pytest.raises(UnknownKey):
        trusted.verify_release(sign_release(manifest(), keys.release[:2]), ON_V1, NOW)
    assert offer(trusted, keys, manifest(), new_release).sequence == 2


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


# -- timestamps and freshness -------------------------------------------------------------------------


def test_a_validly_signed_release_that_no_timestamp_names_is_refused(trusted: TrustedSet, keys: Keyring) -> None:
    old = sign_release(manifest(), keys.release[:2])
    vouch(trusted, keys, old, manifest())
    newer = manifest(sequence=3, version="3.0.0")
    with pytest.raises(TimestampMismatch):
        trusted.verify_release(sign_release(newer, keys.release[:2]), ON_V1, NOW)


def test_a_release_with_the_named_sequence_but_other_content_is_refused(trusted: TrustedSet, keys: Keyring) -> None:
    vouch(trusted, keys, sign_release(manifest(), keys.release[:2]), manifest())
    with pytest.raises(TimestampMismatch):
        trusted.verify_release(sign_release(manifest(summary="other bytes"), keys.release[:2]), ON_V1, NOW)


def test_without_any_timestamp_releases_are_refused_as_frozen(trusted: TrustedSet, keys: Keyring) -> None:
    with pytest.raises(FreezeDetected):
        trusted.verify_release(sign_release(manifest(), keys.release[:2]), ON_V1, NOW)


def test_once_the_timestamp_expires_releases_are_refused_as_frozen(trusted: TrustedSet, keys: Keyring) -> None:
    envelope = vouch(trusted, keys, sign_release(manifest(), keys.release[:2]), manifest())
    later = NOW + timedelta(hours=5)
    with pytest.raises(FreezeDetected):
        trusted.verify_release(envelope, ON_V1, later)


def test_an_expired_timestamp_is_refused(trusted: TrustedSet, keys: Keyring) -> None:
    stale = timestamp(keys, {}, expires=NOW - timedelta(seconds=1))
    with pytest.raises(Expired):
        trusted.update_timestamp(sign_timestamp(stale, keys.timestamp), NOW)


def test_an_older_timestamp_is_a_rollback(trusted: TrustedSet, keys: Keyring) -> None:
    trusted.update_timestamp(sign_timestamp(timestamp(keys, {}, version=5), keys.timestamp), NOW)
    with pytest.raises(Rollback):
        trusted.update_timestamp(sign_timestamp(timestamp(keys, {}, version=4), keys.timestamp), NOW)


def test_a_timestamp_of_the_same_version_with_other_content_is_refused(trusted: TrustedSet, keys: Keyring) -> None:
    trusted.update_timestamp(sign_timestamp(timestamp(keys, {}, version=5), keys.timestamp), NOW)
    other = timestamp(keys, {}, version=5, expires=NOW + timedelta(hours=9))
    with pytest.raises(Rollback):
        trusted.update_timestamp(sign_timestamp(other, keys.timestamp), NOW)


def test_a_timestamp_signed_by_a_release_key_is_refused(trusted: TrustedSet, keys: Keyring) -> None:
    with pytest.raises(UnknownKey):
        trusted.update_timestamp(sign_timestamp(timestamp(keys, {}), keys.release), NOW)


def test_a_timestamp_for_another_fleet_is_refused(trusted: TrustedSet, keys: Keyring) -> None:
    with pytest.raises(WrongFleet):
        trusted.update_timestamp(sign_timestamp(timestamp(keys, {}, fleet="other"), keys.timestamp), NOW)


def test_a_timestamp_under_a_newer_root_asks_for_the_root_first(trusted: TrustedSet, keys: Keyring) -> None:
    with pytest.raises(RootOutdated):
        trusted.update_timestamp(sign_timestamp(timestamp(keys, {}, root_version=2), keys.timestamp), NOW)


def test_a_timestamp_under_an_older_root_is_a_rollback(trusted: TrustedSet, keys: Keyring) -> None:
    trusted.update_root(sign_root(keys.root_metadata(version=2), keys.root[:2]))
    with pytest.raises(Rollback):
        trusted.update_timestamp(sign_timestamp(timestamp(keys, {}, root_version=1, version=2), keys.timestamp), NOW)


def test_the_persisted_timestamp_floor_survives_a_restart(keys: Keyring) -> None:
    root = TrustedSet.load_initial_root(sign_root(keys.root_metadata(), keys.root[:2]))
    restarted = TrustedSet(root, device_class="ipc", install_target=TARGET, timestamp_floor=7)
    with pytest.raises(Rollback):
        restarted.update_timestamp(sign_timestamp(timestamp(keys, {}, version=6), keys.timestamp), NOW)
    assert restarted.update_timestamp(sign_timestamp(timestamp(keys, {}, version=7), keys.timestamp), NOW).version == 7


def test_fast_forward_recovery_rotating_timestamp_keys_drops_the_pushed_up_floor(trusted: TrustedSet, keys: Keyring) -> None:
    # A stolen timestamp key pushed the version to the maximum: devices would refuse all honest timestamps.
    trusted.update_timestamp(sign_timestamp(timestamp(keys, {}, version=2**53), keys.timestamp), NOW)
    fresh_keys = Keyring(root=keys.root, release=keys.release, timestamp=[SigningKey.generate("timestamp")])
    update = trusted.update_root(sign_root(fresh_keys.root_metadata(version=2), keys.root[:2]))
    assert Role.TIMESTAMP in update.revoked_roles and trusted.timestamp is None
    honest = timestamp(fresh_keys, {}, version=1, root_version=2)
    assert trusted.update_timestamp(sign_timestamp(honest, fresh_keys.timestamp), NOW).version == 1
    with pytest.raises(UnknownKey):  # the stolen key is worthless now
        trusted.update_timestamp(sign_timestamp(timestamp(keys, {}, version=2**53, root_version=2), keys.timestamp), NOW)


def test_a_compromised_old_release_key_is_refused_after_a_rotation_walked_step_by_step(keys: Keyring) -> None:
    # Device provisioned with root v1; rotations v2 (new release keys) and v3 (new root keys) happen later.
    trusted = TrustedSet(TrustedSet.load_initial_root(sign_root(keys.root_metadata(), keys.root[:2])),
                         device_class="ipc", install_target=TARGET)
    new_release = [SigningKey.generate("release") for _ in range(2)]
    v2_keys = Keyring(root=keys.root, release=new_release, timestamp=keys.timestamp)
    new_root_keys = [SigningKey.generate("root") for _ in range(3)]
    v3_keys = Keyring(root=new_root_keys, release=new_release, timestamp=keys.timestamp)
    trusted.update_root(sign_root(v2_keys.root_metadata(version=2), keys.root[:2]))
    trusted.update_root(sign_root(v3_keys.root_metadata(version=3), v2_keys.root[:2] + new_root_keys[:2]))
    stolen = sign_release(manifest(sequence=9, version="9.0.0"), keys.release[:2])
    vouch(trusted, v3_keys, stolen, manifest(sequence=9, version="9.0.0"))
    with pytest.raises(UnknownKey):
        trusted.verify_release(stolen, ON_V1, NOW)


def test_non_canonical_base64_of_the_same_payload_is_refused(trusted: TrustedSet, keys: Keyring) -> None:
    envelope = json.loads(sign_release(manifest(), keys.release[:2]))
    payload = envelope["payload"]
    assert payload.endswith("=")  # the last character before padding carries unused bits
    stripped = payload.rstrip("=")
    last = stripped[-1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    envelope["payload"] = stripped[:-1] + alphabet[alphabet.index(last) ^ 1] + payload[len(stripped):]
    assert base64.b64decode(envelope["payload"]) == base64.b64decode(payload)
    with pytest.raises(MalformedMetadata, match="canonical base64"):
        trusted.verify_release(json.dumps(envelope).encode(), ON_V1, NOW)


def test_a_release_of_the_installed_bytes_is_accepted_but_vouched_only_by_a_timestamp_naming_it(
        trusted: TrustedSet, keys: Keyring) -> None:
    """The release role alone may say "this is what you run" (the device says idle), but only the
    timestamp role's vouching lets that move a floor (issue 20: a sequence of 2^53 signed by the
    release keys alone would otherwise refuse every later release)."""
    same = manifest(sequence=2**53, version="1.0.0", artifact=manifest().artifact.model_copy(update={"sha256": SHA_V1}))
    envelope = sign_release(same, keys.release[:2])
    assert trusted.verify_release(envelope, ON_V1, NOW).sequence == 2**53
    assert not trusted.vouches_for(same, envelope, NOW), "no timestamp at all"
    other = sign_release(manifest(sequence=5), keys.release[:2])
    vouch(trusted, keys, other, manifest(sequence=5))
    assert not trusted.vouches_for(same, envelope, NOW), "a timestamp naming another release"
    vouch(trusted, keys, envelope, same, version=2)
    assert trusted.vouches_for(same, envelope, NOW)
    assert not trusted.vouches_for(same, envelope, NOW + timedelta(days=1)), "an expired timestamp vouches for nothing"
