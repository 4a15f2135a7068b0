"""Properties of the trust core that must hold for every input, checked with hypothesis."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.models import Role, RoleKeys, RootMetadata
from services.runtime.keys import SigningKey
from services.runtime.trust import DeviceRecord, TrustedSet, TrustError, UnknownKey
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
