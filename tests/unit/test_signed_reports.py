"""Signed device reports (issue 14, item 3): the device's counter and signature, what a relaying
peer hands on, and what the fleet service believes of a report a peer carried."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_client.report_relay import ReportRelay
from device_client.report_signing import ReportCounter, ReportSigner
from schemas import topics
from schemas.errors import ReasonCode
from schemas.models import DeviceState, Phase
from services.operator.fleet import DeviceView, Heard
from services.operator.fleet_store import FleetStore, ReportHeard
from services.operator.identities import DeviceIdentities, IdentityConflict, provision_identity
from services.operator.report_trust import ReportRefused, judge_carried, signed_by
from services.runtime.gossip import DocumentKind, PeerDocuments, kind_of
from services.runtime.keys import SigningKey

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
FLEET = "f1"


def report(device: str = "d1", *, fleet: str = FLEET, phase: Phase = Phase.DONE, version: str = "2.0.0",
           at: datetime = NOW) -> DeviceState:
    return DeviceState(device=device, fleet=fleet, device_class="ipc", installed_version=version,
                       installed_sha256="2" * 64, phase=phase, timestamp=at, target_version=version)


class Counter:
    """A counter that needs no file: the signer's numbers, handed out in order."""

    def __init__(self, start: int = 1) -> None:
        self.value = start - 1

    def next(self) -> int:
        self.value += 1
        return self.value


def signer(key: SigningKey, start: int = 1) -> ReportSigner:
    return ReportSigner(key, Counter(start))  # type: ignore[arg-type]


@pytest.fixture
def key() -> SigningKey:
    return SigningKey.generate("device")


def judge(raw: bytes, keys: dict[str, SigningKey], highest: dict[str, int] | None = None) -> DeviceState:
    registered = {device: k.public_key() for device, k in keys.items()}
    return judge_carried(raw, fleet=FLEET, key_of=registered.get, highest=(highest or {}).get)


# -- the counter ----------------------------------------------------------------------------------


def test_the_counter_grows_across_restarts_even_with_the_clock_set_back(tmp_path: Path) -> None:
    path = tmp_path / "report-counter"
    first = ReportCounter(path, clock=lambda: 2_000_000.0, block=8)
    used = [first.next() for _ in range(20)]  # crosses two reservations
    assert used == sorted(set(used))
    again = ReportCounter(path, clock=lambda: 0.0, block=8)  # an unset clock: 1970
    assert again.next() > used[-1]


@pytest.mark.parametrize("content", [b"", b"garbage\n", b"-5\n", b"\xff\xfe", b"9" * 40, b"0\n"])
def test_a_corrupt_counter_file_falls_back_on_the_clock(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "report-counter"
    before = ReportCounter(path, clock=lambda: 1_000.0)
    last = before.next()
    path.write_bytes(content)
    after = ReportCounter(path, clock=lambda: 1_001.0)  # a second later
    assert after.next() > last
    assert path.read_text().strip().isdigit(), "a fresh mark replaces the corrupt one"


def test_the_counter_writes_once_per_block_not_once_per_report(tmp_path: Path) -> None:
    path = tmp_path / "report-counter"
    counter = ReportCounter(path, clock=lambda: 5.0, block=100)
    stamp = os.stat(path).st_ino
    for _ in range(90):
        counter.next()
    assert os.stat(path).st_ino == stamp  # atomic_write replaces the file: a new inode means a write
    for _ in range(20):
        counter.next()
    assert os.stat(path).st_ino != stamp


def test_a_counter_that_cannot_save_its_mark_still_counts(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the counter's directory should be")
    counter = ReportCounter(blocked / "report-counter", clock=lambda: 10.0, block=4)  # every write fails
    used = [counter.next() for _ in range(10)]
    assert used == list(range(10_001, 10_011))


# -- what the fleet service believes ---------------------------------------------------------------


def test_a_signed_report_of_a_registered_device_is_believed(key: SigningKey) -> None:
    signed = signer(key, 7).sign(report())
    state = judge(signed.canonical_bytes(), {"d1": key})
    assert state.counter == 7 and state.installed_version == "2.0.0" and signed_by(state, key.public_key())


CHANGES = {
    "installed_version": "9.0.0", "installed_sha256": "9" * 64, "phase": Phase.FAILED, "progress": 50,
    "target_version": "9.0.0", "reason": "made up", "device_class": "other", "timestamp": NOW + timedelta(days=1),
    "counter": 10**9, "bytes_from_origin": 1,
}


@pytest.mark.parametrize("field", sorted(CHANGES))
def test_a_relay_cannot_alter_any_field(key: SigningKey, field: str) -> None:
    signed = signer(key).sign(report())
    altered = signed.model_copy(update={field: CHANGES[field]})
    with pytest.raises(ReportRefused) as refused:
        judge(altered.canonical_bytes(), {"d1": key})
    assert refused.value.code == ReasonCode.BAD_SIGNATURE


@settings(max_examples=200, deadline=None)
@given(position=st.integers(min_value=0), flip=st.integers(min_value=1, max_value=255))
def test_any_flipped_byte_is_refused(position: int, flip: int) -> None:
    key = SigningKey.generate("device")
    raw = bytearray(signer(key).sign(report()).canonical_bytes())
    raw[position % len(raw)] ^= flip
    try:
        state = judge(bytes(raw), {"d1": key})
    except ReportRefused:
        return
    # A flip that still parses and verifies can only be one JSON does not see (none in canonical JSON).
    pytest.fail(f"a changed report was believed: {state}")


def test_a_report_signed_by_another_device_or_a_stranger_is_refused(key: SigningKey) -> None:
    other = SigningKey.generate("device")
    in_d1s_name = signer(other).sign(report("d1")).canonical_bytes()
    with pytest.raises(ReportRefused) as refused:
        judge(in_d1s_name, {"d1": key, "d2": other})
    assert refused.value.code == ReasonCode.BAD_SIGNATURE


def test_replays_and_copies_are_refused_and_a_newer_report_is_believed(key: SigningKey) -> None:
    sign = signer(key, 5)
    older, newer = sign.sign(report(phase=Phase.INSTALLING)), sign.sign(report())
    for raw, highest in ((older.canonical_bytes(), 5), (newer.canonical_bytes(), 6), (older.canonical_bytes(), 6)):
        with pytest.raises(ReportRefused) as refused:
            judge(raw, {"d1": key}, {"d1": highest})
        assert refused.value.code == ReasonCode.REPORT_REPLAYED
    assert judge(newer.canonical_bytes(), {"d1": key}, {"d1": 5}).counter == 6


@pytest.mark.parametrize("case,code", [
    ("unregistered", ReasonCode.NO_IDENTITY), ("unsigned", ReasonCode.UNTRUSTED),
    ("other-fleet", ReasonCode.WRONG_FLEET), ("not-json", ReasonCode.MALFORMED), ("too-large", ReasonCode.MALFORMED),
])
def test_what_no_device_signed_is_refused_with_its_reason(key: SigningKey, case: str, code: ReasonCode) -> None:
    raw = {
        "unregistered": signer(key).sign(report("d9")).canonical_bytes(),
        "unsigned": report().model_copy(update={"counter": 3}).canonical_bytes(),
        "other-fleet": signer(key).sign(report(fleet="f2")).canonical_bytes(),
        "not-json": b"\x00{not json",
        "too-large": signer(key).sign(report()).canonical_bytes()[:-1] + b"," + b" " * 5000 + b"}",
    }[case]
    with pytest.raises(ReportRefused) as refused:
        judge(raw, {"d1": key})
    assert refused.value.code == code


# -- what a relaying device hands on ----------------------------------------------------------------


def test_a_relay_hands_on_each_signed_report_once_and_not_its_own(key: SigningKey) -> None:
    relay = ReportRelay(FLEET, "bridge")
    topic = topics.state_topic(FLEET, "d1")
    raw = signer(key, 3).sign(report()).canonical_bytes()
    assert relay.judge(topic, raw).hand_on
    relay.handed_on(raw)
    assert not relay.judge(topic, raw).hand_on and relay.judge(topic, raw).forged is None
    own = signer(key).sign(report("bridge")).canonical_bytes()
    assert not relay.judge(topics.state_topic(FLEET, "bridge"), own).hand_on


@pytest.mark.parametrize("case", ["other-device-topic", "garbage", "oversize", "other-fleet"])
def test_a_relay_strikes_what_no_device_would_send(key: SigningKey, case: str) -> None:
    relay = ReportRelay(FLEET, "bridge")
    raw = signer(key).sign(report("d1")).canonical_bytes()
    topic, payload = {
        "other-device-topic": (topics.state_topic(FLEET, "d2"), raw),
        "garbage": (topics.state_topic(FLEET, "d1"), b"{]"),
        "oversize": (topics.state_topic(FLEET, "d1"), b"x" * 5000),
        "other-fleet": (topics.state_topic(FLEET, "d1"), signer(key).sign(report(fleet="f2")).canonical_bytes()),
    }[case]
    decision = relay.judge(topic, payload)
    assert not decision.hand_on and decision.forged


def test_an_unsigned_report_is_not_handed_on_and_not_struck() -> None:
    decision = ReportRelay(FLEET, "bridge").judge(topics.state_topic(FLEET, "d1"), report().canonical_bytes())
    assert not decision.hand_on and decision.forged is None


def test_the_relay_rate_is_bounded_for_all_peers_together() -> None:
    now = [0.0]
    relay = ReportRelay(FLEET, "bridge", rate=10, burst=20, clock=lambda: now[0])
    assert sum(relay.take() for _ in range(100)) == 20
    now[0] = 1.0
    assert sum(relay.take() for _ in range(100)) == 10


def test_a_relay_remembers_a_bounded_number_of_devices(key: SigningKey) -> None:
    relay = ReportRelay(FLEET, "bridge", max_devices=10)
    sign = signer(key)
    for n in range(50):
        relay.handed_on(sign.sign(report(f"d{n}")).canonical_bytes())
    assert len(relay._last) == 10


def test_reports_travel_on_the_gossip_topic_and_a_node_carries_only_its_latest(key: SigningKey) -> None:
    topic = topics.state_topic(FLEET, "d1")
    assert kind_of(FLEET, topic) == DocumentKind.REPORT
    assert kind_of(FLEET, topics.relay_topic(FLEET, "d1")) is None
    carried = PeerDocuments(FLEET)
    sign = signer(key)
    for phase in (Phase.DOWNLOADING, Phase.INSTALLING, Phase.DONE):
        carried.add(topic, sign.sign(report(phase=phase)).canonical_bytes())
    frames = [f for f in carried.frames() if f.topic == topic]
    assert len(frames) == 1 and DeviceState.model_validate_json(frames[0].payload).phase == Phase.DONE
    carried.remove(topic)
    assert len(carried) == 0


# -- the register of identity keys ----------------------------------------------------------------


def test_a_device_keeps_its_key_and_a_different_one_needs_replace(tmp_path: Path) -> None:
    identities = DeviceIdentities(tmp_path / "identities")
    first = provision_identity(tmp_path / "b" / "identity.key", "d1", identities)
    again = provision_identity(tmp_path / "b" / "identity.key", "d1", identities)
    assert again.keyid == first.keyid and oct((tmp_path / "b" / "identity.key").stat().st_mode & 0o777) == "0o600"
    with pytest.raises(IdentityConflict):
        provision_identity(tmp_path / "c" / "identity.key", "d1", identities)
    fresh = provision_identity(tmp_path / "c" / "identity.key", "d1", identities, replace=True)
    assert identities.public_key("d1") == fresh.public_key() != first.public_key()


@pytest.mark.parametrize("content", [b"", b"{}", b"not json", b'{"scheme":"ed25519","public":"zz"}', b"x" * 5000])
def test_a_damaged_key_file_believes_nothing(tmp_path: Path, key: SigningKey, content: bytes) -> None:
    identities = DeviceIdentities(tmp_path)
    identities.register("d1", key.public_key())
    raw = signer(key).sign(report()).canonical_bytes()
    assert judge_carried(raw, fleet=FLEET, key_of=identities.public_key, highest=lambda d: None).counter == 1
    identities.path("d1").write_bytes(content)
    assert identities.public_key("d1") is None
    with pytest.raises(ReportRefused) as refused:
        judge_carried(raw, fleet=FLEET, key_of=identities.public_key, highest=lambda d: None)
    assert refused.value.code == ReasonCode.NO_IDENTITY


def test_a_device_name_cannot_leave_the_register(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        DeviceIdentities(tmp_path).path("../root")


# -- what the service keeps ------------------------------------------------------------------------


def test_a_report_queued_offline_does_not_replace_a_later_one_a_peer_carried(key: SigningKey) -> None:
    sign = signer(key)
    installing = sign.sign(report(phase=Phase.INSTALLING, at=NOW))
    done = sign.sign(report(at=NOW + timedelta(seconds=5)))
    view = DeviceView("d1")
    assert view.accept(done, Heard("bridge", NOW))
    assert not view.accept(installing, Heard(None, NOW)), "older by its counter and its time"
    assert view.state == done and view.heard == Heard("bridge", NOW)
    reset = signer(key, 1).sign(report(phase=Phase.IDLE, at=NOW + timedelta(minutes=1)))  # counter file lost
    assert view.accept(reset, Heard(None, NOW)), "a newer time still counts from the device itself"


def test_the_record_shows_how_each_device_was_heard_and_keeps_the_highest_counter(tmp_path: Path,
                                                                                  key: SigningKey) -> None:
    store = FleetStore.sqlite(tmp_path / "fleet.sqlite")
    sign = signer(key, 40)
    carried = sign.sign(report(at=NOW))
    store.record([ReportHeard(carried, Heard("bridge", NOW), carried.counter)])
    line = store.status_lines()[0]
    assert (line.heard, line.heard_at, line.installed_version) == ("relayed by bridge", NOW, "2.0.0")
    direct = sign.sign(report(at=NOW + timedelta(seconds=1)))
    store.record([ReportHeard(direct, Heard(None, NOW + timedelta(seconds=1)), None)])
    assert store.status_lines()[0].heard == "direct"
    assert store.top_counters() == {"d1": 40}, "an unverified counter does not count"
    store.record([ReportHeard(carried, Heard("bridge", NOW), 39)])  # lower: never lowers it
    assert store.top_counters() == {"d1": 40}
    assert store.status_lines()[0].heard == "direct", "an older report does not change how the device was heard"
    tunnelled = sign.sign(report(at=NOW + timedelta(seconds=2)).model_copy(update={"tunnel_via": "gw-7"}))
    store.record([ReportHeard(tunnelled, Heard(None, NOW + timedelta(seconds=2)), None)])
    assert store.status_lines()[0].heard == "tunnel via gw-7"
    assert [r.heard for r in store.reports_json()] == ["tunnel via gw-7"]
    assert Heard(None, NOW).describe(tunnelled) == "tunnel via gw-7"
    assert Heard("bridge", NOW).describe(tunnelled) == "relayed by bridge", "a carried copy is relayed, whatever it says"
    store.retire("d1")
    assert store.top_counters() == {"d1": 40}, "a retired device's old reports stay replays"
    row = store.reports_json()
    assert row == []
    store.close()


def test_the_fleet_service_records_a_carried_report_retains_it_and_a_later_direct_one_is_direct(
        tmp_path: Path, key: SigningKey) -> None:
    """The service's whole path on a real (embedded) broker: a report a peer carried is believed,
    recorded as relayed and retained on the device's own topic; the retained copy coming back is not
    a second report; the device's next direct report is recorded as direct; a replay changes nothing."""
    import asyncio

    from services.operator.broker import EmbeddedBroker
    from services.operator.fleet_service import FleetService, OpsTokens
    from services.runtime.messaging import Message, MqttClient
    from services.runtime.trust import TrustedSet
    from tests.support.factories import Keyring, sign_root

    keys = Keyring()
    root = TrustedSet.load_initial_root(sign_root(keys.root_metadata(fleet=FLEET), keys.root[:2]))
    identities = DeviceIdentities(tmp_path / "identities")
    identities.register("d1", key.public_key())
    store = FleetStore.sqlite(tmp_path / "fleet.sqlite")
    service = FleetService(FLEET, store, OpsTokens.load_or_create(tmp_path / "tokens"), root,
                           identities=identities, clock=lambda: NOW)
    sign = signer(key, 100)
    carried = sign.sign(report(at=NOW))
    direct = sign.sign(report(at=NOW + timedelta(seconds=2)))

    async def scenario() -> bytes:
        async with EmbeddedBroker("127.0.0.1", 0) as broker, \
                MqttClient("127.0.0.1", broker.port, "svc", clean_session=True) as client:
            await client.subscribe(topics.state_topic(FLEET, "d1"))
            relay = topics.relay_topic(FLEET, "bridge")
            await service.handle(client, Message(relay, carried.canonical_bytes(), False, 1))
            retained = await client.next_message(5)  # what the service retained on the device's topic
            await service.handle(client, retained)  # ... and hears back: not a second report
            await service.handle(client, Message(relay, carried.canonical_bytes(), False, 1))  # a replay
            service.flush()
            assert store.status_lines()[0].heard == "relayed by bridge"
            assert store.attempts("d1")[0].outcome == "done" and len(store.attempts("d1")) == 1
            await service.handle(client, Message(topics.state_topic(FLEET, "d1"), direct.canonical_bytes(), True, 1))
            service.flush()
            return retained.payload

    assert asyncio.run(scenario()) == carried.canonical_bytes()
    line = store.status_lines()[0]
    assert (line.heard, line.heard_at, line.reported) == ("direct", None, NOW + timedelta(seconds=2))
    assert store.top_counters() == {"d1": 101}
    assert service.tracker.devices["d1"].heard == Heard(None, NOW)

    # A restarted service first hears the retained copy of a carried report (not newer), then the
    # device's own next report (unsigned here, so only the relayed-then-direct rule records it): direct.
    later = sign.sign(report(at=NOW + timedelta(seconds=3)))
    mine = report(at=NOW + timedelta(seconds=4))

    async def restarted(first: FleetService) -> FleetService:
        async with EmbeddedBroker("127.0.0.1", 0) as broker, \
                MqttClient("127.0.0.1", broker.port, "svc", clean_session=True) as client:
            await first.handle(client, Message(topics.relay_topic(FLEET, "bridge"), later.canonical_bytes(), False, 1))
            first.flush()
            again = FleetService(FLEET, store, OpsTokens.load_or_create(tmp_path / "tokens"), root,
                                 identities=identities, clock=lambda: NOW)
            state_topic = topics.state_topic(FLEET, "d1")
            await again.handle(client, Message(state_topic, later.canonical_bytes(), True, 1))
            again.flush()
            assert store.status_lines()[0].heard == "relayed by bridge"
            await again.handle(client, Message(state_topic, mine.canonical_bytes(), True, 1))
            again.flush()
            return again

    asyncio.run(restarted(service))
    assert store.status_lines()[0].heard == "direct"
    store.close()


def test_a_relay_without_its_broker_holds_the_latest_report_of_each_device_bounded(key: SigningKey) -> None:
    relay = ReportRelay(FLEET, "mule", max_held=3)
    sign = signer(key)
    topic = topics.state_topic(FLEET, "d1")
    older, newer = sign.sign(report(phase=Phase.INSTALLING)), sign.sign(report())
    relay.hold(older.canonical_bytes())
    assert relay.judge(topic, newer.canonical_bytes()).hand_on
    relay.hold(newer.canonical_bytes())
    assert relay.held() == [newer.canonical_bytes()], "only the latest of a device is held"
    assert not relay.judge(topic, older.canonical_bytes()).hand_on, "an older one than held is not taken again"
    for n in range(2, 6):
        relay.hold(sign.sign(report(f"d{n}")).canonical_bytes())
    assert len(relay.held()) == 3 and all(b'"device":"d1"' not in raw for raw in relay.held())
    for raw in relay.held():
        relay.handed_on(raw)
    assert relay.held() == []
