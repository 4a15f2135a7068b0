"""The production broker: a real Mosquitto with TLS, per-device credentials and ACLs (issue #8)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from schemas import topics
from schemas.models import Phase
from services.runtime.messaging import MqttClient, MqttError
from services.operator.mosquitto import password_hash
from services.operator.pki import Pki
from services.demo.processes import terminate
from tests.support.harness import FLEET, Fleet, MosquittoProcess, credentials, mosquitto_available, mosquitto_dir

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not mosquitto_available(), reason="Mosquitto is not installed (apt-get install mosquitto)"),
]
IPC = "ipc-x86_64"


@pytest.fixture
def locked(tmp_path: Path):  # noqa: ANN201
    fleet = Fleet(tmp_path)
    try:
        fleet.start(with_origin=True, mosquitto_devices=[("dev-a", IPC), ("dev-b", IPC), ("gw-1", "gateway-armv7")])
        yield fleet
    finally:
        fleet.stop()


def client(fleet: Fleet, principal: str, **overrides: object) -> MqttClient:
    """A connection with `principal`'s login, where its credentials say (devices and Home Assistant:
    the public TLS listener; the release and operator logins: the broker host's loopback listener)."""
    c = credentials(fleet.broker_dir, principal)
    options: dict[str, object] = {"username": c["username"], "password": c["password"],
                                  "ca_file": Path(c["ca_file"]) if "ca_file" in c else None}
    options.update(overrides)
    return MqttClient("127.0.0.1", int(c["port"]), f"test-{principal}-{time.monotonic_ns()}", clean_session=True,
                      connect_timeout=5, **options)  # type: ignore[arg-type]


async def delivered(fleet: Fleet, publisher: str, topic: str, observer: str, observe: str) -> bool:
    """Does a retained publish by `publisher` on `topic` reach `observer` subscribed to `observe`?

    Denial is not read from silence: right after the probe the publisher sends a marker on a topic
    it may write and the observer may read. The broker handles one connection's messages in order,
    so once the marker arrives a probe that was let through has arrived too."""
    probe = f"probe-{time.monotonic_ns()}".encode()
    marker, marker_topic = probe + b"-marker", MARKERS[(publisher, observer)]
    seen = False
    async with client(fleet, observer) as watch:
        await watch.subscribe(observe)
        await watch.subscribe(marker_topic)
        async with client(fleet, publisher) as pub:
            await pub.publish(topic, probe, retain=True)
            await pub.publish(marker_topic, marker)
        while True:
            message = await watch.next_message(30)  # a TimeoutError here is a failure, not a denial
            seen = seen or message.payload == probe
            if message.payload == marker:
                return seen


ROOT = f"edgeswarm/{FLEET}"
MARKERS = {  # (publisher, observer) -> a topic the publisher may write and the observer may read
    ("dev-a", "edgeswarm-operator"): f"{ROOT}/devices/dev-a/state",
    ("dev-a", "dev-b"): f"{ROOT}/devices/dev-a/peer",
    ("edgeswarm-homeassistant", "edgeswarm-operator"): f"{ROOT}/ops/device/dev-a/check",
    ("edgeswarm-nodered", "edgeswarm-operator"): f"{ROOT}/ops/rollout/marker",
    ("edgeswarm-release", "dev-a"): f"{ROOT}/releases/{IPC}",
    ("dev-b", "dev-a"): f"{ROOT}/devices/dev-b/peer",
    ("other-release", "dev-a"): f"{ROOT}/devices/other/peer",
}


@pytest.mark.parametrize(
    ("topic", "observer", "observe", "allowed"),
    [
        (f"{ROOT}/devices/dev-a/state", "edgeswarm-operator", f"{ROOT}/devices/+/state", True),  # control: its own
        (f"{ROOT}/devices/dev-b/state", "edgeswarm-operator", f"{ROOT}/devices/+/state", False),
        (f"{ROOT}/devices/dev-b/online", "edgeswarm-operator", f"{ROOT}/devices/+/online", False),
        (f"{ROOT}/releases/{IPC}", "edgeswarm-operator", f"{ROOT}/releases/+", False),
        (f"{ROOT}/trust/root/2", "dev-b", f"{ROOT}/trust/root/+", False),
        (f"{ROOT}/timestamp", "edgeswarm-operator", f"{ROOT}/timestamp", False),
        (f"{ROOT}/ops/rollout/start", "edgeswarm-operator", f"{ROOT}/ops/#", False),
        (f"{ROOT}/devices/dev-b/cmd", "dev-b", f"{ROOT}/devices/dev-b/cmd", False),
        (f"{ROOT}/devices/dev-a/relay", "edgeswarm-operator", f"{ROOT}/devices/+/relay", True),  # peers' reports it carries
        (f"{ROOT}/devices/dev-b/relay", "edgeswarm-operator", f"{ROOT}/devices/+/relay", False),
    ],
    ids=["own-state", "other-device-state", "other-device-online", "release", "root", "timestamp", "ops-command",
         "other-device-cmd", "own-relay", "other-device-relay"],
)
def test_a_device_may_publish_only_its_own_topics(locked: Fleet, topic: str, observer: str, observe: str, allowed: bool) -> None:
    assert asyncio.run(delivered(locked, "dev-a", topic, observer, observe)) is allowed


@pytest.mark.parametrize(
    ("publisher", "topic", "allowed"),
    [
        ("edgeswarm-homeassistant", f"{ROOT}/ops/device/dev-a/install", True),
        ("edgeswarm-homeassistant", f"{ROOT}/ops/device/dev-a/retire", False),
        ("edgeswarm-homeassistant", f"{ROOT}/ops/rollout/start", False),
        ("edgeswarm-homeassistant", f"{ROOT}/devices/dev-a/cmd", False),
        ("edgeswarm-nodered", f"{ROOT}/ops/rollout/start", True),
        ("edgeswarm-nodered", f"{ROOT}/ops/device/dev-a/retire", False),
        ("edgeswarm-nodered", f"{ROOT}/devices/dev-a/cmd", False),
    ],
    ids=["ha-install", "ha-retire", "ha-rollout", "ha-device-cmd", "nodered-rollout", "nodered-retire", "nodered-device-cmd"],
)
def test_home_assistant_and_node_red_publish_only_their_operator_requests(
    locked: Fleet, publisher: str, topic: str, allowed: bool
) -> None:
    observe = f"{ROOT}/devices/+/cmd" if "/devices/" in topic else f"{ROOT}/ops/#"
    assert asyncio.run(delivered(locked, publisher, topic, "edgeswarm-operator", observe)) is allowed


def test_a_device_reads_its_class_release_but_not_other_classes_devices_or_fleets(locked: Fleet) -> None:
    passwd = locked.broker_dir / "passwd"
    acl = locked.broker_dir / "acl"
    # A second fleet sharing the broker, with its own release principal.
    passwd.write_text(passwd.read_text() + f"other-release:{password_hash('pw')}\n")
    # (and, for the marker that ends the probe, one topic dev-a may read)
    acl.write_text(acl.read_text() + f"\nuser other-release\ntopic write edgeswarm/other-fleet/#\n"
                   f"topic write {MARKERS[('other-release', 'dev-a')]}\n")
    locked.mosquitto.stop()
    locked.mosquitto.start()

    async def scenario() -> dict[str, bool]:
        results = {}
        results["own-class-release"] = await delivered(locked, "edgeswarm-release", f"{ROOT}/releases/{IPC}", "dev-a", f"{ROOT}/releases/{IPC}")
        results["other-class-release"] = await delivered(locked, "edgeswarm-release", f"{ROOT}/releases/gateway-armv7", "dev-a", f"{ROOT}/releases/+")
        results["other-device-state"] = await delivered(locked, "dev-b", f"{ROOT}/devices/dev-b/state", "dev-a", f"{ROOT}/devices/#")
        other = client(locked, "dev-a")
        marker_topic = MARKERS[("other-release", "dev-a")]
        async with other:
            await other.subscribe("edgeswarm/other-fleet/#")
            await other.subscribe(marker_topic)
            async with MqttClient("127.0.0.1", locked.broker_port, "other", clean_session=True, username="other-release",
                                  password="pw", ca_file=Path(credentials(locked.broker_dir, "dev-a")["ca_file"])) as pub:
                await pub.publish("edgeswarm/other-fleet/releases/x", b"theirs", retain=True)
                await pub.publish(marker_topic, b"marker")
            payloads = []
            while not payloads or payloads[-1] != b"marker":
                payloads.append((await other.next_message(30)).payload)
            results["other-fleet"] = b"theirs" in payloads
        return results

    assert asyncio.run(scenario()) == {
        "own-class-release": True, "other-class-release": False, "other-device-state": False, "other-fleet": False,
    }


def test_bad_credentials_and_plain_tcp_are_refused(locked: Fleet) -> None:
    async def attempt(**overrides: object) -> str:
        try:
            async with client(locked, "dev-a", **overrides):
                return "connected"
        except MqttError as exc:
            return str(exc)

    assert asyncio.run(attempt()) == "connected"
    assert "Not authorized" in asyncio.run(attempt(password="guess"))
    assert "Not authorized" in asyncio.run(attempt(username="nobody"))
    assert "could not connect" in asyncio.run(attempt(ca_file=None))  # plain MQTT to the TLS listener


def test_a_device_is_added_and_removed_without_touching_anyone_elses_password(locked: Fleet) -> None:
    """`broker add-device` / `remove-device` on a running broker: every other principal keeps its
    password (before, re-running `broker config` changed them all), and after a reload the new
    device gets in and the removed one is refused while the others stay authorised."""
    import os
    import signal
    import tomllib

    credentials_dir = locked.broker_dir / "credentials"

    def passwords() -> dict[str, str]:
        return {f.stem: tomllib.loads(f.read_text())["mqtt"]["password"] for f in credentials_dir.glob("*.toml")}

    async def attempt(principal: str) -> str:
        try:
            async with client(locked, principal):
                return "connected"
        except MqttError as exc:
            return str(exc)

    before = passwords()
    locked.cli("broker", "add-device", str(locked.broker_dir), f"dev-c:{IPC}")
    after = passwords()
    assert set(after) == set(before) | {"dev-c"}
    assert {k: after[k] for k in before} == before, "nobody else's password changed"
    assert locked.mosquitto.proc is not None
    os.kill(locked.mosquitto.proc.pid, signal.SIGHUP)  # what `systemctl reload edgeswarm-mosquitto` sends
    deadline = time.monotonic() + 10
    while asyncio.run(attempt("dev-c")) != "connected":
        assert time.monotonic() < deadline, "the added device was not let in after a reload"
        time.sleep(0.2)
    assert asyncio.run(attempt("dev-a")) == "connected"

    removed = credentials(locked.broker_dir, "dev-b")
    locked.cli("broker", "remove-device", str(locked.broker_dir), "dev-b")
    assert not (credentials_dir / "dev-b.toml").exists()
    assert {k: v for k, v in passwords().items()} == {k: v for k, v in after.items() if k != "dev-b"}
    os.kill(locked.mosquitto.proc.pid, signal.SIGHUP)
    refused = ""
    deadline = time.monotonic() + 10
    while "Not authorized" not in refused:
        assert time.monotonic() < deadline, f"the removed device still gets in: {refused}"
        refused = asyncio.run(attempt_as(locked, removed))
        time.sleep(0.2)
    assert asyncio.run(attempt("dev-a")) == "connected" and asyncio.run(attempt("dev-c")) == "connected"
    unknown = locked.run_cli("broker", "remove-device", str(locked.broker_dir), "dev-x")
    assert unknown.returncode != 0 and "not in" in unknown.stderr


async def attempt_as(fleet: Fleet, login: dict[str, str]) -> str:
    try:
        async with MqttClient("127.0.0.1", fleet.broker_port, f"test-{time.monotonic_ns()}", clean_session=True,
                              connect_timeout=5, username=login["username"], password=login["password"],
                              ca_file=Path(login["ca_file"])):
            return "connected"
    except MqttError as exc:
        return str(exc)


def test_a_device_cannot_take_over_another_devices_client_id(locked: Fleet) -> None:
    """With its own valid login, dev-b connects under dev-a's client id. Mosquitto names every client
    on the public listener after its login, so dev-a stays connected (before, the two kicked each
    other off, and dev-b could take over dev-a's queued session)."""
    import threading

    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    def connect(principal: str, client_id: str, dropped: threading.Event, up: threading.Event) -> paho.Client:
        login = credentials(locked.broker_dir, principal)
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False,
                        protocol=paho.MQTTv311)
        c.username_pw_set(login["username"], login["password"])
        c.tls_set(ca_certs=login["ca_file"])
        c.on_connect = lambda *a: up.set()
        c.on_disconnect = lambda *a: dropped.set()
        c.connect("127.0.0.1", int(login["port"]))
        c.loop_start()
        return c

    victim_id = f"edgeswarm-{FLEET}-dev-a"
    a_dropped, a_up, b_dropped, b_up = (threading.Event() for _ in range(4))
    a = connect("dev-a", victim_id, a_dropped, a_up)
    try:
        assert a_up.wait(10)
        b = connect("dev-b", victim_id, b_dropped, b_up)
        try:
            assert b_up.wait(10), "dev-b's own login is valid: it connects (as dev-b)"
            assert not a_dropped.wait(3), "dev-a was kicked off by a client using its client id"
        finally:
            b.loop_stop()
            b.disconnect()
    finally:
        a.loop_stop()
        a.disconnect()


def test_fleet_serve_with_a_login_that_may_not_read_the_ops_topics_says_so_and_exits(locked: Fleet) -> None:
    """The release principal cannot read ops/# or write commands; Mosquitto grants the subscription
    and drops the messages, so the service would run and do nothing. It says which login it needs."""
    started = time.monotonic()
    result = locked.run_cli("fleet", "serve", "--config", str(locked.operator_config))  # the release login
    assert result.returncode == 2, result.stdout + result.stderr
    assert "edgeswarm-release" in result.stderr and "credentials/edgeswarm-operator.toml" in result.stderr
    assert "Traceback" not in result.stderr and time.monotonic() - started < 60
    ok = subprocess.Popen([sys.executable, "-m", "services.cli", "fleet", "serve", "--config", str(locked.service_config())],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=locked.root,
                          start_new_session=True)
    try:
        assert ok.stdout is not None
        deadline = time.monotonic() + 30
        seen = b""
        while b"broker login checked" not in seen:
            assert time.monotonic() < deadline and ok.poll() is None, seen.decode()
            seen += ok.stdout.readline()
    finally:
        terminate(ok)


def test_mutual_tls_refuses_certificates_from_another_ca(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.support.ports import free_port

    port = free_port()
    run = lambda *a: subprocess.run([sys.executable, "-m", "services.cli", *a], check=True, capture_output=True)  # noqa: E731
    run("pki", "init", "--out", str(tmp_path / "pki"), "--fleet", FLEET)
    run("pki", "client", "dev-a", "--out", str(tmp_path / "pki"))
    run("pki", "init", "--out", str(tmp_path / "rogue"), "--fleet", FLEET)
    run("pki", "client", "dev-a", "--out", str(tmp_path / "rogue"))
    broker_dir = mosquitto_dir()
    run("broker", "config", "--out", str(broker_dir), "--fleet", FLEET, "--port", str(port),
        "--pki", str(tmp_path / "pki"), "--mutual-tls", "--device", f"dev-a:{IPC}")
    broker = MosquittoProcess(broker_dir / "mosquitto.conf", port, tmp_path / "mosquitto.log")
    broker.start()
    fleet_ca = Pki(tmp_path / "pki")

    async def attempt(bundle: Pki | None) -> str:
        cert = dict(cert_file=bundle.client_cert("dev-a"), key_file=bundle.client_key("dev-a")) if bundle else {}
        try:
            async with MqttClient("127.0.0.1", port, "dev-a", clean_session=True, ca_file=fleet_ca.ca_cert,
                                  connect_timeout=4, **cert):  # type: ignore[arg-type]
                return "connected"
        except MqttError:
            return "refused"

    try:
        assert asyncio.run(attempt(fleet_ca)) == "connected"
        assert asyncio.run(attempt(Pki(tmp_path / "rogue"))) == "refused"
        assert asyncio.run(attempt(None)) == "refused"
    finally:
        broker.stop()
        shutil.rmtree(broker_dir.parent, ignore_errors=True)


def test_the_update_flows_over_tls_and_survives_a_broker_crash_mid_rollout(locked: Fleet) -> None:
    locked.release(IPC, "1.0.0")
    for name in ("dev-a", "dev-b"):
        locked.add_device(name, IPC)
        locked.watcher.wait(name, lambda s: s.phase == Phase.IDLE and s.last_sequence == 1)
    v2 = locked.release(IPC, "2.0.0")
    locked.mosquitto.kill()  # kill -9 right after the release: only what was saved survives
    time.sleep(1.0)
    locked.mosquitto.start()
    for name in ("dev-a", "dev-b"):
        state = locked.watcher.wait(name, lambda s: s.installed_version == "2.0.0" and s.phase == Phase.DONE, timeout=90)
        assert state.installed_sha256 == v2.artifact.sha256 == locked.devices[name].installed_sha256()

    async def retained() -> set[str]:
        seen: set[str] = set()
        async with client(locked, "dev-a") as fresh:
            for topic in (topics.release_topic(FLEET, IPC), topics.timestamp_topic(FLEET), topics.root_wildcard(FLEET)):
                await fresh.subscribe(topic)
            try:
                while True:
                    seen.add((await fresh.next_message(1.5)).topic)
            except TimeoutError:
                return seen

    assert {topics.release_topic(FLEET, IPC), topics.timestamp_topic(FLEET), topics.root_topic(FLEET, 1)} <= asyncio.run(retained())


def test_a_site_broker_bridged_to_the_central_one_delivers_central_releases_to_its_devices(tmp_path: Path) -> None:
    from tests.support.ports import free_port

    fleet = Fleet(tmp_path)
    site_dir = mosquitto_dir()
    site = None
    try:
        fleet.start(mosquitto_devices=[], broker_args=("--bridge-site", "plant-7"))
        site_port = free_port()
        fleet.cli("broker", "config", "--out", str(site_dir), "--fleet", FLEET, "--port", str(site_port),
                  "--pki", str(tmp_path / "pki"), "--device", f"site-dev:{IPC}",
                  "--bridge-to", f"127.0.0.1:{fleet.broker_port}",
                  "--bridge-credentials", str(fleet.broker_dir / "credentials" / "edgeswarm-bridge-plant-7.toml"))
        site = MosquittoProcess(site_dir / "mosquitto.conf", site_port, tmp_path / "site-mosquitto.log")
        site.start()
        fleet.release(IPC, "1.0.0")  # published on the central broker only
        device = fleet.add_device("site-dev", IPC, broker=(site_port, site_dir))
        # The device's reports cross the bridge: the watcher is on the central broker.
        fleet.watcher.wait("site-dev", lambda s: s.phase == Phase.IDLE and s.last_sequence == 1, timeout=60)
        v2 = fleet.release(IPC, "2.0.0")
        state = fleet.watcher.wait("site-dev", lambda s: s.phase == Phase.DONE, timeout=90)
        assert state.installed_version == "2.0.0" and device.installed_sha256() == v2.artifact.sha256
    finally:
        fleet.stop()
        if site is not None:
            site.stop()
        shutil.rmtree(site_dir.parent, ignore_errors=True)
