"""Properties of the trust core that must hold for every input, checked with hypothesis."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from schemas.canonical import MalformedDocument, canonical_json, strict_loads
from schemas.errors import ReasonCode
from schemas.models import PayloadType, Role, RoleKeys, RootMetadata
from services.runtime.keys import SigningKey, sign_envelope
from services.runtime.trust import DeviceRecord, MalformedMetadata, TrustedSet, TrustError, UnknownKey
from tests.support.factories import NOW, SHA_V1, TARGET, Keyring, manifest, sign_release, sign_root, sign_timestamp, timestamp

ON_V1 = DeviceRecord("1.0.0", SHA_V1, 1)
KEYS = Keyring()
ROOT_V1 = sign_root(KEYS.root_metadata(), KEYS.root[:2])
RELEASE = sign_release(manifest(), KEYS.release[:2])  # exactly the threshold: every signature matters
TIMESTAMP = sign_timestamp(timestamp(KEYS, {"ipc": (2, RELEASE)}), KEYS.timestamp)
ROOT_V2 = sign_root(KEYS.root_metadata(version=2), KEYS.root[:2])


def fresh_set() -> TrustedSet:
    trusted = TrustedSet(TrustedSet.load_initial_root(ROOT_V1), device_class="ipc", install_target=TARGET)
    trusted.update_timestamp(TIMESTAMP, NOW)
    return trusted


def test_the_unmodified_documents_are_accepted() -> None:
    trusted = fresh_set()
    assert trusted.verify_release(RELEASE, ON_V1, NOW).sequence == 2
    assert trusted.update_root(ROOT_V2).root.version == 2


def flip(raw: bytes, position: int, value: int) -> bytes:
    changed = bytearray(raw)
    changed[position % len(raw)] = value
    return bytes(changed)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(position=st.integers(min_value=0), value=st.integers(min_value=0, max_value=255), which=st.sampled_from(["release", "root", "timestamp"]))
def test_any_single_byte_change_to_a_signed_document_is_refused(position: int, value: int, which: str) -> None:
    original = {"release": RELEASE, "root": ROOT_V2, "timestamp": TIMESTAMP}[which]
    mutated = flip(original, position, value)
    if mutated == original:
        return
    trusted = fresh_set()
    with pytest.raises(TrustError):
        if which == "release":
            trusted.verify_release(mutated, ON_V1, NOW)
        elif which == "root":
            trusted.update_root(mutated)
        else:
            bumped = TrustedSet(trusted.root, device_class="ipc", install_target=TARGET)
            bumped.update_timestamp(mutated, NOW)


@dataclass
class Rotation:
    role: Role
    count: int
    threshold: int


rotations = st.lists(
    st.builds(
        lambda role, count, slack: Rotation(role, count, max(1, count - slack)),
        st.sampled_from(list(Role)), st.integers(min_value=1, max_value=3), st.integers(min_value=0, max_value=2),
    ),
    min_size=1, max_size=5,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chain=rotations)
def test_every_valid_chain_of_rotations_is_walked_and_only_current_keys_sign(chain: list[Rotation]) -> None:
    keys = {Role.ROOT: KEYS.root[:2], Role.RELEASE: KEYS.release[:2], Role.TIMESTAMP: KEYS.timestamp}
    thresholds = {Role.ROOT: 2, Role.RELEASE: 2, Role.TIMESTAMP: 1}
    current = KEYS.root_metadata()
    trusted = TrustedSet(TrustedSet.load_initial_root(sign_root(current, KEYS.root[:2])), device_class="ipc", install_target=TARGET)
    retired: list[SigningKey] = []
    for step in chain:
        old_root_signers = keys[Role.ROOT][: thresholds[Role.ROOT]]
        retired += keys[step.role]
        keys[step.role] = [SigningKey.generate(step.role.value) for _ in range(step.count)]
        thresholds[step.role] = step.threshold
        current = RootMetadata(
            fleet="f1", version=current.version + 1, expires=current.expires,
            keys={k.keyid: k.public_key() for ks in keys.values() for k in ks},
            roles={r: RoleKeys(keyids=[k.keyid for k in ks], threshold=thresholds[r]) for r, ks in keys.items()},
        )
        signers = {k.keyid: k for k in old_root_signers + keys[Role.ROOT][: thresholds[Role.ROOT]]}
        assert trusted.update_root(sign_root(current, list(signers.values()))).root == current
    envelope = sign_release(manifest(), keys[Role.RELEASE][: thresholds[Role.RELEASE]])
    trusted.update_timestamp(sign_timestamp(timestamp(KEYS, {"ipc": (2, envelope)}, version=99, root_version=current.version),
                                            keys[Role.TIMESTAMP][: thresholds[Role.TIMESTAMP]]), NOW)
    assert trusted.verify_release(envelope, ON_V1, NOW).sequence == 2
    stale = [k for k in retired if k.role == "release" and k.keyid not in current.keys]
    if stale:
        with pytest.raises(UnknownKey):
            trusted.verify_release(sign_release(manifest(), stale), ON_V1, NOW)


# -- canonical JSON over arbitrary unicode (issue 20: a lone surrogate was an internal error) -------

any_text = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF, categories=None), max_size=12)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(10**6), 10**6), any_text),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(any_text, inner, max_size=3)),
    max_leaves=8,
)


@settings(max_examples=400, deadline=None)
@given(json_values)
@example({"\ud800": "\udfff x"})
@example(["\ud83d\ude00", "\ud83d"])
def test_the_canonical_check_gives_a_typed_answer_for_any_unicode_including_surrogates(value: object) -> None:
    """Every JSON text (escaped with ensure_ascii, so lone surrogates travel as \\ud800) either parses
    to a document whose canonical form parses back to itself, or is refused as malformed."""
    raw = json.dumps(value, ensure_ascii=True).encode()
    try:
        parsed = strict_loads(raw, max_bytes=1 << 20)
    except MalformedDocument:
        assert _has_surrogate(value)
        return
    assert not _has_surrogate(value)
    canonical = canonical_json(parsed)
    assert strict_loads(canonical, max_bytes=1 << 20) == parsed and canonical_json(strict_loads(canonical, max_bytes=1 << 20)) == canonical


@settings(max_examples=200, deadline=None)
@given(any_text)
@example("\ud800")
@example("plain")
def test_a_signed_payload_with_any_string_is_accepted_or_refused_as_malformed(text: str) -> None:
    """The payload is signed as given, so only the trust core's own checks stand between it and the parser."""
    payload = json.dumps({**manifest().model_dump(mode="json"), "summary": text}, sort_keys=True, separators=(",", ":"),
                         ensure_ascii=_has_surrogate(text)).encode()
    envelope = sign_envelope(PayloadType.RELEASE, payload, KEYS.release[:2]).canonical_bytes()
    try:
        fresh_set().verify_release(envelope, ON_V1, NOW)
    except MalformedMetadata:
        assert _has_surrogate(text)  # no canonical form: the only reason to refuse it as malformed
    except TrustError as exc:
        assert exc.code == ReasonCode.TIMESTAMP_MISMATCH and not _has_surrogate(text), exc  # just not the named release
    else:
        raise AssertionError("a release no timestamp names was accepted")


def _has_surrogate(value: object) -> bool:
    if isinstance(value, str):
        return any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if isinstance(value, list):
        return any(_has_surrogate(v) for v in value)
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    return False
