"""The user's story, with a real broker, a real origin node and real device agents (issue #3)."""

from __future__ import annotations

import json
import time

import pytest

from schemas.models import Phase, ReleaseManifest
from services.runtime.delta import patch_info
from tests.support.harness import Fleet

pytestmark = pytest.mark.integration

IPC, GATEWAY = "ipc-x86_64", "gateway-armv7"


def on_version(version: str):  # noqa: ANN201
    return lambda s: s.installed_version == version and s.phase == Phase.DONE


def idle_on(version: str, sequence: int = 1):  # noqa: ANN201
    return lambda s: s.installed_version == version and s.phase == Phase.IDLE and s.last_sequence >= sequence


def test_devices_of_one_class_update_through_deltas_and_the_other_class_is_untouched(fleet: Fleet) -> None:
    fleet.release(IPC, "1.0.0")
    fleet.release(GATEWAY, "1.0.0")
    names = ["ipc-a", "ipc-b", "ipc-c"]
    for name in names:
        fleet.add_device(name, IPC)
    fleet.add_device("gw-a", GATEWAY)
    for name in [*names, "gw-a"]:
        fleet.watcher.wait(name, idle_on("1.0.0"))
        fleet.watcher.wait_online(name, b"online")
    gateway_before = fleet.devices["gw-a"].installed_sha256()

    v2 = fleet.release(IPC, "2.0.0")
    assert v2.deltas, "the release must carry a delta from 1.0.0"
    # the demo images are tars of code: an LZ match against the old image beats bsdiff on them, so
    # devices here apply a format-2 patch (segment codecs), the path the release pipeline takes
    (patch,) = fleet.home.release_dir(IPC).joinpath("2.0.0").glob("delta-from-1.0.0.esd")
    assert patch_info(patch).format == 2 and {s.codec for s in patch_info(patch).segments} & {"lzma-dict", "lzma-dict-x86"}

    for name in names:
        state = fleet.watcher.wait(name, on_version("2.0.0"))
        assert state.used_delta is True
        assert state.installed_sha256 == v2.artifact.sha256
        assert fleet.devices[name].installed_sha256() == v2.artifact.sha256
        assert state.bytes_from_origin + state.bytes_from_peers > 0
        local = fleet.devices[name].local_state()
        assert local["installed_version"] == "2.0.0" and local["last_sequence"] == v2.sequence and local["pending"] is None
        phases = [s.phase for s in fleet.watcher.history[name]]
        assert phases.index(Phase.DOWNLOADING) < phases.index(Phase.PATCHING) < phases.index(Phase.INSTALLING) < phases.index(Phase.DONE)
        previous = fleet.devices[name].spec.installed_file.with_name("firmware.img.previous")
        assert previous.exists(), "the previous version is kept for rollback"

    time.sleep(1.0)
    gateway = fleet.watcher.states["gw-a"]
    assert gateway.installed_version == "1.0.0" and gateway.phase == Phase.IDLE
    assert fleet.devices["gw-a"].installed_sha256() == gateway_before

    status = json.loads(fleet.cli("fleet", "status", "--json", "--config", str(fleet.operator_config)).stdout)
    versions = {d["device"]: d["installed_version"] for d in status["devices"]}
    assert versions == {"ipc-a": "2.0.0", "ipc-b": "2.0.0", "ipc-c": "2.0.0", "gw-a": "1.0.0"}


@pytest.fixture
def device_on_v1(fleet: Fleet) -> Fleet:
    fleet.release(IPC, "1.0.0")
    fleet.add_device("dev-1", IPC)
    fleet.watcher.wait("dev-1", idle_on("1.0.0"))
    return fleet


def _refused_with(fleet: Fleet, code: str, since: int) -> None:
    state = fleet.watcher.wait("dev-1", lambda s: s.phase == Phase.REFUSED and s.reason_code == code and s.timestamp.timestamp() >= since)
    assert state.installed_version == "1.0.0"
    assert state.reason, "a refusal says why"
    assert fleet.devices["dev-1"].process.alive(), "the device keeps running"


def test_forged_and_replayed_manifests_are_refused_and_the_device_stays_on_v1(device_on_v1: Fleet) -> None:
    fleet = device_on_v1
    v1_sha = fleet.devices["dev-1"].installed_sha256()
    built = fleet.build_only(IPC, "2.0.0")  # signed and stored, never published as is
    good: ReleaseManifest = built.manifest
    from services.runtime.keys import SigningKey

    cases: list[tuple[str, bytes]] = [
        ("unknown_key", fleet.sign_manifest(good, [SigningKey.generate("release")])),
        ("wrong_fleet", fleet.sign_manifest(good.model_copy(update={"fleet": "another-fleet"}))),
        ("wrong_class", fleet.sign_manifest(good.model_copy(update={"device_class": GATEWAY}))),
        ("rollback", fleet.sign_manifest(good.model_copy(update={"sequence": 1}))),
        ("malformed", b'{"payload_type": "application/vnd.edgeswarm.release+json", "payload": '),
    ]
    for code, payload in cases:
        since = int(time.time()) - 1
        fleet.publish_release(IPC, payload)
        _refused_with(fleet, code, since)
        assert fleet.devices["dev-1"].installed_sha256() == v1_sha

    # Still alive and listening: the genuine release goes through.
    fleet.publish_timestamp()
    fleet.publish_release(IPC, built.envelope)
    state = fleet.watcher.wait("dev-1", on_version("2.0.0"))
    assert fleet.devices["dev-1"].installed_sha256() == good.artifact.sha256 == state.installed_sha256


def test_delta_bytes_that_do_not_match_the_signed_hash_are_refused_and_nothing_is_installed(device_on_v1: Fleet) -> None:
    fleet = device_on_v1
    v1_sha = fleet.devices["dev-1"].installed_sha256()
    good = fleet.build_only(IPC, "2.0.0").manifest
    (base, delta), = good.deltas.items()
    lying = good.model_copy(update={"deltas": {base: delta.model_copy(update={"sha256": "0" * 64})}})
    fleet.vouch_and_publish(IPC, lying)
    state = fleet.watcher.wait("dev-1", lambda s: s.reason_code == "hash_mismatch")
    assert state.phase == Phase.REFUSED
    assert state.installed_version == "1.0.0"
    assert fleet.devices["dev-1"].installed_sha256() == v1_sha
    assert fleet.devices["dev-1"].local_state()["installed_version"] == "1.0.0"
    assert not any(p.name.startswith(".firmware.img.staged") for p in fleet.devices["dev-1"].spec.installed_file.parent.iterdir())


def test_a_device_offline_during_the_release_gets_it_when_it_comes_back(fleet: Fleet) -> None:
    fleet.release(IPC, "1.0.0")
    fleet.add_device("sleepy", IPC)
    fleet.watcher.wait("sleepy", idle_on("1.0.0"))
    fleet.devices["sleepy"].process.kill()  # power cut: the broker publishes its last will
    fleet.watcher.wait_online("sleepy", b"offline", timeout=40)

    v1 = fleet.devices["sleepy"].installed_sha256()
    v2 = fleet.release(IPC, "2.0.0")
    # The premise, on the device's disk (a dead process reports nothing either way): still 1.0.0.
    assert not fleet.devices["sleepy"].process.alive() and fleet.devices["sleepy"].installed_sha256() == v1

    fleet.start_device("sleepy")
    fleet.watcher.wait_online("sleepy", b"online")
    state = fleet.watcher.wait("sleepy", on_version("2.0.0"))
    assert state.installed_sha256 == v2.artifact.sha256 == fleet.devices["sleepy"].installed_sha256()


def test_a_device_restarted_mid_update_resumes_from_its_persisted_state(tmp_path) -> None:  # noqa: ANN001
    # No origin yet: the device accepts the release and then waits for bytes nobody serves.
    fleet = Fleet(tmp_path)
    try:
        fleet.start(with_origin=False)
        fleet.release(IPC, "1.0.0")
        device = fleet.add_device("phoenix", IPC, stall_timeout=600)
        fleet.watcher.wait("phoenix", idle_on("1.0.0"))
        v2 = fleet.release(IPC, "2.0.0")
        fleet.watcher.wait("phoenix", lambda s: s.phase == Phase.DOWNLOADING and s.target_version == "2.0.0")
        pending = device.local_state()["pending"]
        assert pending is not None and pending["phase"] == "downloading"

        device.process.kill()  # power cut mid-download
        fleet.start_origin()
        fleet.start_device("phoenix")
        state = fleet.watcher.wait("phoenix", on_version("2.0.0"), timeout=90)
        assert state.installed_sha256 == v2.artifact.sha256 == device.installed_sha256()
        assert "resuming the update interrupted in phase downloading" in fleet.log("phoenix")
        assert device.local_state()["pending"] is None
    finally:
        fleet.stop()
