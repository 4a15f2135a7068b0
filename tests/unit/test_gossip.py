"""The gossip rules (services.runtime.gossip) and what the trust intake does with a peer's document
(device_client.trust_intake.TrustIntake.from_peer): pure, no node, no broker."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_client import machine
from device_client.local_state import LocalState
from device_client.trust_intake import TrustIntake
from schemas import topics
from schemas.errors import ReasonCode
from services.runtime.gossip import (
    FRAME_OVERHEAD,
    DocumentKind,
    GossipFrame,
    GossipGate,
    GossipLimits,
    MalformedFrame,
    PeerDocuments,
    Verdict,
    decode_frame,
    encode_frame,
    kind_of,
)
from services.runtime.keys import SigningKey
from services.runtime.trust import TrustedSet
from tests.support.factories import (
    NOW, SHA_V1, TARGET, Keyring, manifest, sign_release, sign_root, sign_timestamp, timestamp,
)

FLEET = "f1"
RELEASES = topics.release_topic(FLEET, "ipc")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- frames -------------------------------------------------------------------------------------


@pytest.mark.parametrize("topic, kind", [
    (topics.root_topic(FLEET, 7), DocumentKind.ROOT),
    (topics.timestamp_topic(FLEET), DocumentKind.TIMESTAMP),
    (RELEASES, DocumentKind.RELEASE),
])
def test_a_frame_round_trips_with_the_kind_of_its_topic(topic: str, kind: DocumentKind) -> None:
    frame = GossipFrame(topic, b'{"signed": "bytes"}\n\x00')
    assert decode_frame(encode_frame(frame), fleet=FLEET) == (frame, kind)


@pytest.mark.parametrize("topic", [
    topics.root_topic("other", 1), topics.timestamp_topic("other"), topics.release_topic("other", "ipc"),
    topics.command_topic(FLEET, "d1"), topics.relay_topic(FLEET, "d1"), f"{topics.root_wildcard(FLEET)[:-1]}x",
    f"{topics.root_wildcard(FLEET)[:-1]}", f"{topics.root_wildcard(FLEET)[:-1]}1234567890", "edgeswarm/f1/releases/A",
])
def test_only_the_fleets_signed_document_topics_are_gossiped(topic: str) -> None:
    assert kind_of(FLEET, topic) is None
    with pytest.raises(MalformedFrame):
        decode_frame(encode_frame(GossipFrame(topic, b"{}")), fleet=FLEET)


@given(st.binary(max_size=600))
@settings(max_examples=300, deadline=None)
def test_any_bytes_decode_to_a_gossiped_topic_or_are_refused(data: bytes) -> None:
    for candidate in (data, b"edgeswarm-gossip/1\n" + data):
        try:
            frame, kind = decode_frame(candidate, fleet=FLEET)
        except MalformedFrame:
            continue
        assert kind_of(FLEET, frame.topic) == kind
        assert encode_frame(frame) == candidate


def test_a_frame_whose_topic_line_never_ends_is_refused_without_reading_on() -> None:
    with pytest.raises(MalformedFrame, match="no topic line"):
        decode_frame(b"edgeswarm-gossip/1\n" + b"a" * (1 << 20), fleet=FLEET)


# -- the gate -----------------------------------------------------------------------------------


def gate(clock: Clock, **limits: float) -> GossipGate:
    return GossipGate(GossipLimits(**{"max_document_bytes": 1000, "rate": 2.0, "burst": 4.0, **limits}), clock)


def test_the_same_bytes_are_read_once_from_whoever_sends_them_until_they_are_forgotten() -> None:
    g = gate(Clock())
    assert g.admit("a", b"doc") == Verdict.READ
    assert g.admit("b", b"doc") == Verdict.DUPLICATE
    g.forget(b"doc")
    assert g.admit("b", b"doc") == Verdict.READ


def test_a_duplicate_is_read_again_once_its_memory_expires() -> None:
    clock = Clock()
    g = gate(clock, seen_seconds=10)
    assert g.admit("a", b"doc") == Verdict.READ
    clock.now += 11
    assert g.admit("a", b"doc") == Verdict.READ


def test_a_message_over_the_document_limit_is_dropped_unread() -> None:
    g = gate(Clock())
    assert g.admit("a", b"x" * (1000 + FRAME_OVERHEAD)) == Verdict.READ
    assert g.admit("a", b"y" * (1001 + FRAME_OVERHEAD)) == Verdict.TOO_LARGE


def test_each_sender_has_its_own_rate_and_its_burst_refills_over_time() -> None:
    clock = Clock()
    g = gate(clock)
    assert [g.admit("flood", b"%d" % i) for i in range(6)] == [Verdict.READ] * 4 + [Verdict.RATE_LIMITED] * 2
    assert g.admit("honest", b"doc") == Verdict.READ
    clock.now += 1.0  # two more at 2/s
    assert [g.admit("flood", b"x%d" % i) for i in range(3)] == [Verdict.READ, Verdict.READ, Verdict.RATE_LIMITED]


def test_a_sender_struck_for_invalid_documents_is_ignored_until_its_ban_ends() -> None:
    clock = Clock()
    g = gate(clock, strikes=3, ban_seconds=60)
    assert not g.strike("bad") and not g.strike("bad")
    assert g.strike("bad") and g.banned("bad")
    assert g.admit("bad", b"a valid document now") == Verdict.BANNED
    assert g.admit("good", b"a valid document now") == Verdict.READ
    clock.now += 61
    assert not g.banned("bad") and g.admit("bad", b"another") == Verdict.READ


def test_a_sender_far_over_its_rate_is_ignored_as_a_flood_whatever_it_sends() -> None:
    clock = Clock()
    g = gate(clock, flood_drops=100, flood_window=10, ban_seconds=60)
    g.admit("flood", b"the one genuine document")
    verdicts = [g.admit("flood", b"the one genuine document") for _ in range(200)]
    assert verdicts.count(Verdict.FLOODING) == 1 and g.banned("flood")
    assert verdicts[verdicts.index(Verdict.FLOODING) + 1:] == [Verdict.BANNED] * (199 - verdicts.index(Verdict.FLOODING))
    assert g.admit("honest", b"the one genuine document!") == Verdict.READ


def test_drops_over_the_rate_spread_wider_than_the_flood_window_are_no_flood() -> None:
    clock = Clock()
    g = gate(clock, flood_drops=100, flood_window=10)
    for _ in range(12):  # 60 drops every 11 s: a burst too large, again and again, but no flood
        verdicts = [g.admit("bursty", b"%d" % i) for i in range(64)]
        assert Verdict.FLOODING not in verdicts and not g.banned("bursty")
        clock.now += 11


def test_every_table_is_bounded_and_a_flood_of_new_names_does_not_lift_a_ban() -> None:
    clock = Clock()
    g = gate(clock, strikes=1, senders=50, seen=100)
    g.strike("bad")
    for i in range(5000):
        g.admit(f"sybil-{i}", b"m%d" % i)
    assert len(g._senders) <= 51 and len(g._seen) <= 100
    assert g.banned("bad")


# -- what a node carries ------------------------------------------------------------------------


def test_carried_documents_are_announced_roots_first_in_order_and_bounded() -> None:
    docs = PeerDocuments(FLEET, max_roots=3, max_releases=2)
    assert docs.add(topics.timestamp_topic(FLEET), b"t1")
    for v in (5, 2, 4, 3, 1):
        docs.add(topics.root_topic(FLEET, v), b"r%d" % v)
    for cls in ("a", "b", "c"):
        docs.add(topics.release_topic(FLEET, cls), cls.encode())
    assert not docs.add(topics.timestamp_topic(FLEET), b"t1")  # nothing new: nothing to publish
    assert docs.add(topics.timestamp_topic(FLEET), b"t2")
    frames = docs.frames()
    assert [f.topic for f in frames[:3]] == [topics.root_topic(FLEET, v) for v in (3, 4, 5)]
    assert {f.payload for f in frames[3:]} == {b"t2", b"b", b"c"}
    with pytest.raises(ValueError):
        docs.add(topics.command_topic(FLEET, "d1"), b"{}")


# -- the trust intake, for documents from peers ---------------------------------------------------


@pytest.fixture
def keys() -> Keyring:
    return Keyring()


def intake_for(keys: Keyring, *, device_class: str = "ipc") -> TrustIntake:
    root = TrustedSet.load_initial_root(sign_root(keys.root_metadata(), keys.root))
    trusted = TrustedSet(root, device_class=device_class, install_target=TARGET)
    return TrustIntake(trusted, max_message_bytes=64 * 1024, clock=lambda: NOW)


LOCAL = LocalState(installed_version="1.0.0", installed_sha256=SHA_V1)


def from_peer(intake: TrustIntake, topic: str, raw: bytes, last_release: bytes | None = None,
              local: LocalState = LOCAL):  # noqa: ANN201
    kind = kind_of(FLEET, topic)
    assert kind is not None
    return intake.from_peer(kind, topic, raw, last_release=last_release, local=local)


def test_a_valid_release_from_a_peer_is_heard_and_carried(keys: Keyring) -> None:
    raw = sign_release(manifest(), keys.release[:2])
    verdict = from_peer(intake_for(keys), RELEASES, raw)
    assert verdict.events == (machine.ReleaseHeard(raw),) and verdict.carry and verdict.forged is None


@pytest.mark.parametrize("forge", ["bad_signature", "garbage", "other_fleet", "root_as_release"])
def test_a_forged_release_is_refused_with_a_reason_strikes_its_sender_and_is_not_carried(keys: Keyring, forge: str) -> None:
    genuine = sign_release(manifest(), keys.release[:2])
    raw = {
        # The fleet's own signatures over other bytes.
        "bad_signature": lambda: genuine.replace(b'"payload":"', b'"payload":"AAAA', 1),
        "garbage": lambda: b'{"payload_type": "release", "payload": "!!"}',
        "other_fleet": lambda: sign_release(manifest(fleet="f2"), keys.release[:2]),
        "root_as_release": lambda: sign_root(keys.root_metadata(version=2), keys.root),
    }[forge]()
    verdict = from_peer(intake_for(keys), RELEASES, raw)
    assert verdict.forged and not verdict.carry
    assert len(verdict.events) == 1 and isinstance(verdict.events[0], machine.TrustDocumentRefused)
    assert not any(isinstance(e, machine.ReleaseHeard) for e in verdict.events)  # the last release heard stays


@pytest.mark.parametrize("signers", ["one_of_two", "strangers"])
def test_a_release_signed_by_keys_the_root_does_not_name_waits_for_a_newer_root(keys: Keyring, signers: str) -> None:
    """It may be a forgery, or a release of a root the device has not walked to yet (a rotation):
    not used, not reported, its sender not struck, and read again when re-announced."""
    raw = sign_release(manifest(), keys.release[:1] if signers == "one_of_two"
                       else [SigningKey.generate("x"), SigningKey.generate("y")])
    verdict = from_peer(intake_for(keys), RELEASES, raw)
    assert verdict.events == () and verdict.forged is None and verdict.held and not verdict.carry


def test_an_expired_release_is_not_used_but_its_sender_is_not_struck(keys: Keyring) -> None:
    raw = sign_release(manifest(expires=NOW - timedelta(seconds=1)), keys.release[:2])
    verdict = from_peer(intake_for(keys), RELEASES, raw)
    assert verdict.events == () and verdict.forged is None and "expired" in verdict.note


def test_another_classes_release_is_carried_for_its_devices_and_not_heard(keys: Keyring) -> None:
    raw = sign_release(manifest(device_class="arm"), keys.release[:2])
    verdict = from_peer(intake_for(keys), topics.release_topic(FLEET, "arm"), raw)
    assert verdict.events == () and verdict.carry and verdict.forged is None


def test_a_release_not_newer_than_what_the_device_heard_or_applied_is_dropped_quietly(keys: Keyring) -> None:
    newer = sign_release(manifest(sequence=5, version="5.0.0"), keys.release[:2])
    older = sign_release(manifest(sequence=3, version="3.0.0"), keys.release[:2])
    intake = intake_for(keys)
    for raw, last, local in ((older, newer, LOCAL), (newer, newer, LOCAL),
                             (older, None, LOCAL.model_copy(update={"last_sequence": 4}))):
        verdict = from_peer(intake, RELEASES, raw, last_release=last, local=local)
        assert verdict.events == () and verdict.forged is None and "not newer" in verdict.note
    assert from_peer(intake, RELEASES, newer, last_release=older).events == (machine.ReleaseHeard(newer),)


def test_timestamps_from_peers_forged_stale_and_ahead_of_the_root(keys: Keyring) -> None:
    intake = intake_for(keys)
    release = sign_release(manifest(), keys.release[:2])
    ts = lambda **kw: sign_timestamp(timestamp(keys, {"ipc": (2, release)}, **kw), keys.timestamp)  # noqa: E731
    v2 = from_peer(intake, topics.timestamp_topic(FLEET), ts(version=2))
    assert v2.events == (machine.TimestampAccepted(2),)
    again = from_peer(intake, topics.timestamp_topic(FLEET), ts(version=2))
    assert again.events == () and again.forged is None and "trusted already" in again.note
    stale = from_peer(intake, topics.timestamp_topic(FLEET), ts(version=1))
    assert stale.events == () and stale.forged is None and not stale.held
    forged = from_peer(intake, topics.timestamp_topic(FLEET), b'{"payload_type": "timestamp"}')
    assert forged.forged and forged.events[0].code == ReasonCode.MALFORMED  # type: ignore[union-attr]
    strangers = from_peer(intake, topics.timestamp_topic(FLEET), sign_timestamp(
        timestamp(keys, {"ipc": (2, release)}, version=3), [SigningKey.generate("timestamp")]))
    assert strangers.held and strangers.events == () and strangers.forged is None
    ahead = from_peer(intake, topics.timestamp_topic(FLEET), ts(version=4, root_version=2))
    assert ahead.held and ahead.events == () and ahead.forged is None


def test_roots_from_peers_a_gap_waits_quietly_and_a_forged_next_root_strikes(keys: Keyring) -> None:
    intake = intake_for(keys)
    root_v = lambda v: sign_root(keys.root_metadata(version=v), keys.root)  # noqa: E731
    assert from_peer(intake, topics.root_topic(FLEET, 1), root_v(1)).note.startswith("root v1 is not newer")
    gap = from_peer(intake, topics.root_topic(FLEET, 3), root_v(3))
    assert gap.held and gap.events == () and gap.forged is None
    walked = from_peer(intake, topics.root_topic(FLEET, 2), root_v(2))
    assert [e.version for e in walked.events if isinstance(e, machine.RootAccepted)] == [2, 3]
    forged = from_peer(intake, topics.root_topic(FLEET, 4), sign_root(keys.root_metadata(version=4),
                                                                        [SigningKey.generate("root")]))
    assert forged.forged and intake.trusted.root.version == 3


def test_every_accepted_root_and_timestamp_is_handed_on_whoever_sent_it(keys: Keyring) -> None:
    intake = intake_for(keys)
    carried: list[str] = []
    intake.on_accepted = lambda topic, raw: carried.append(topic)
    intake.root_heard(2, sign_root(keys.root_metadata(version=2), keys.root))
    release = sign_release(manifest(), keys.release[:2])
    intake.timestamp_heard(sign_timestamp(timestamp(keys, {"ipc": (2, release)}, root_version=2), keys.timestamp))
    assert carried == [topics.root_topic(FLEET, 2), topics.timestamp_topic(FLEET)]


def test_a_document_over_the_limit_from_a_peer_is_forged_before_parsing(keys: Keyring) -> None:
    verdict = from_peer(intake_for(keys), RELEASES, b"{" * (64 * 1024 + 1))
    assert verdict.forged and "over the limit" in verdict.forged and verdict.events == ()
