"""Trust over time, with a real device: slow retrieval, freeze, restarts, root rotation by the CLI."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import pytest

from schemas import topics
from schemas.models import PayloadType, Phase, Role
from services.runtime.files import sha256_file
from services.runtime.keys import sign_envelope
from tests.support.harness import FLEET, Fleet

pytestmark = pytest.mark.integration
IPC = "ipc-x86_64"


def idle_on_v1(s):  # noqa: ANN001, ANN201
    return s.phase == Phase.IDLE and s.installed_version == "1.0.0" and s.last_sequence >= 1


def test_a_fetch_that_makes_no_progress_is_abandoned_and_retried_later(fleet: Fleet, tmp_path) -> None:  # noqa: ANN001
    fleet.release(IPC, "1.0.0")
    device = fleet.add_device("patient", IPC, stall_timeout=2.0, retry_interval=2.0)
    fleet.watcher.wait("patient", idle_on_v1)
    v1 = device.installed_sha256()
    good = fleet.build_only(IPC, "2.0.0").manifest
    # A CID nobody serves: bytes that exist only on the attacker's side of a partition.
    from services.runtime.content import HashOnlyStore
    import asyncio

    orphan = tmp_path / "orphan.bin"
    orphan.write_bytes(b"not served anywhere " * 50_000)
    store = HashOnlyStore(tmp_path / "scratch", tmp_path / "not-seeded")

    async def cid() -> str:
        try:
            return await store.add(orphan)
        finally:
            await store.close()

    withheld = good.model_copy(update={"deltas": {}, "artifact": good.artifact.model_copy(update={"cid": asyncio.run(cid())})})
    fleet.vouch_and_publish(IPC, withheld)
    first = fleet.watcher.wait("patient", lambda s: s.reason_code == "slow_retrieval", timeout=30)
    assert first.phase == Phase.FAILED and "retry 2 of" in (first.reason or "")
    assert first.installed_version == "1.0.0" and device.installed_sha256() == v1
    again = fleet.watcher.wait("patient", lambda s: s.reason_code == "slow_retrieval" and "retry 3 of" in (s.reason or ""), timeout=30)
    assert again.timestamp > first.timestamp
    assert device.process.alive()


def test_a_device_reports_frozen_when_no_fresh_timestamp_arrives_and_recovers(fleet: Fleet) -> None:
    fleet.release(IPC, "1.0.0")
    fleet.add_device("watchful", IPC)
    fleet.watcher.wait("watchful", idle_on_v1)
    fleet.publish_timestamp("--expires-hours", "0.001")  # 3.6 s of freshness, then nothing
    frozen = fleet.watcher.wait("watchful", lambda s: s.phase == Phase.FROZEN, timeout=30)
    assert frozen.reason_code == "frozen" and frozen.installed_version == "1.0.0"
    fleet.publish_timestamp()
    fleet.watcher.wait("watchful", lambda s: s.phase == Phase.IDLE and s.timestamp > frozen.timestamp, timeout=30)


def test_a_restart_never_lowers_the_persisted_floors(fleet: Fleet) -> None:
    fleet.release(IPC, "1.0.0")
    device = fleet.add_device("steady", IPC)
    fleet.watcher.wait("steady", idle_on_v1)
    for _ in range(3):
        fleet.publish_timestamp()
    floor = json.loads((fleet.home.path / "timestamp-version").read_text())
    end = time.monotonic() + 30  # the device has taken the last one: the event itself, not a pause
    while device.local_state()["timestamp_version"] != floor and time.monotonic() < end:
        time.sleep(0.1)
    assert device.local_state()["timestamp_version"] == floor
    old = (fleet.home.timestamp_file).read_bytes()  # keep a copy of the newest, then make an older one
    device.process.kill()
    restarted = datetime.now(UTC)
    fleet.start_device("steady")
    fleet.watcher.wait("steady", lambda s: s.phase == Phase.IDLE and s.timestamp > restarted, timeout=30)
    assert device.local_state()["timestamp_version"] == floor
    # An older, validly signed timestamp replayed after the restart:
    from schemas.models import TimestampMetadata
    from services.runtime.trust import decode_envelope, payload_bytes

    newest = TimestampMetadata.model_validate_json(payload_bytes(decode_envelope(old)))
    older = newest.model_copy(update={"version": floor - 1})
    replay = sign_envelope(PayloadType.TIMESTAMP, older.canonical_bytes(), fleet.home.signing_keys(Role.TIMESTAMP)).canonical_bytes()
    sent = fleet.publish(topics.timestamp_topic(FLEET), replay)
    state = fleet.watcher.wait("steady", lambda s: s.timestamp >= sent and s.reason_code == "rollback", timeout=30)
    assert state.installed_version == "1.0.0"
    assert device.local_state()["timestamp_version"] == floor and device.local_state()["last_sequence"] == 1


def test_root_rotation_by_the_cli_is_walked_by_devices_and_revokes_the_old_release_keys(fleet: Fleet) -> None:
    fleet.release(IPC, "1.0.0")
    device = fleet.add_device("loyal", IPC)
    fleet.watcher.wait("loyal", idle_on_v1)
    old_release_keys = fleet.home.signing_keys(Role.RELEASE)
    config = str(fleet.operator_config)
    rotated = json.loads(fleet.cli("keys", "rotate", "release", "--config", config, "--json").stdout)
    assert rotated["committed"] and rotated["version"] == 2 and rotated["revoked_roles"] == ["release"]
    published_at = datetime.now(UTC)
    out = fleet.cli("root", "publish", "--config", config).stdout
    assert "re-signed the latest release of ipc-x86_64" in out
    end = time.monotonic() + 30
    while json.loads(__import__("base64").b64decode(json.loads((device.spec.state_dir / "root.json").read_text() if (device.spec.state_dir / "root.json").exists() else '{"payload": "e30="}')["payload"])).get("version") != 2:
        assert time.monotonic() < end, "device did not walk to root v2"
        time.sleep(0.2)

    time.sleep(1.0)
    after_rotation = [h for h in fleet.watcher.history["loyal"] if h.timestamp >= published_at]
    assert all(h.phase != Phase.REFUSED for h in after_rotation), "the re-signed current release is still accepted"

    # The compromised old release keys sign 2.0.0; even a valid timestamp naming it does not help.
    stolen = fleet.build_only(IPC, "2.0.0").manifest
    envelope = sign_envelope(PayloadType.RELEASE, stolen.canonical_bytes(), old_release_keys).canonical_bytes()
    (fleet.home.release_dir(IPC) / "latest.json").write_bytes(envelope)
    fleet.publish_timestamp()
    sent = datetime.now(UTC)
    fleet.publish_release(IPC, envelope)
    refused = fleet.watcher.wait("loyal", lambda s: s.timestamp >= sent and s.reason_code == "unknown_key", timeout=30)
    assert refused.installed_version == "1.0.0" and device.installed_sha256() == refused.installed_sha256 == sha256_file(
        fleet.image(IPC, "1.0.0")), "refused: the working version is intact, byte for byte"

    # The operator's next release, signed with the new keys, goes through.
    v3 = fleet.release(IPC, "3.0.0")
    state = fleet.watcher.wait("loyal", lambda s: s.phase == Phase.DONE and s.installed_version == "3.0.0", timeout=60)
    assert state.installed_sha256 == v3.artifact.sha256 == device.installed_sha256()


def test_timestamp_republish_gives_a_broker_that_lost_everything_the_roots_and_releases_again(fleet: Fleet) -> None:
    """Large fleets' brokers save every few seconds (docs/scale.md): a crash between two saves loses the
    retained release documents. `edgeswarm timestamp --republish` publishes them again, in order."""
    import asyncio

    from services.operator.broker import EmbeddedBroker
    from services.runtime.messaging import MqttClient

    fleet.release(IPC, "1.0.0")
    release = fleet.home.path / "releases" / IPC / "latest.json"

    async def scenario() -> dict[str, bytes]:
        async with EmbeddedBroker("127.0.0.1", 0) as empty:  # what the crashed broker came back with
            done = await asyncio.to_thread(fleet.run_cli, "timestamp", "--config", str(fleet.operator_config), "--republish",
                                           env={"EDGESWARM_MQTT__PORT": str(empty.port)})
            assert done.returncode == 0, done.stderr
            assert "latest release of 1 class(es)" in done.stderr
            seen: dict[str, bytes] = {}
            async with MqttClient("127.0.0.1", empty.port, "late-device", clean_session=True) as device:
                for topic in (topics.root_wildcard(FLEET), topics.timestamp_topic(FLEET), topics.release_topic(FLEET, IPC)):
                    await device.subscribe(topic)
                try:
                    while True:
                        message = await device.next_message(1.5)
                        seen[message.topic] = message.payload
                except TimeoutError:
                    return seen

    seen = asyncio.run(scenario())
    assert seen[topics.release_topic(FLEET, IPC)] == release.read_bytes()
    assert topics.root_topic(FLEET, 1) in seen and topics.timestamp_topic(FLEET) in seen
