"""A real fleet for integration tests: broker, origin and device agents as processes, watched over MQTT.

Nothing is mocked: the broker is `edgeswarm broker run` (amqtt), the origin is `edgeswarm origin`
(embedded Kubo), each device is `edgeswarm device run` with its own Kubo node. Every process is
stopped by its PID at teardown.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from schemas import topics
from schemas.canonical import MalformedDocument
from schemas.models import DeviceState, InstallSpec, PayloadType, ReleaseManifest, Role
from services.runtime.content import HashOnlyStore
from services.runtime.files import sha256_file
from services.runtime.keys import SigningKey, sign_envelope
from services.operator.home import OperatorHome
from tests.support.ports import free_port
from services.demo.processes import AgentProcess, terminate
from services.demo.provision import DeviceSpec, provision
from services.operator.release import BuiltRelease, ReleasePipeline
from services.demo.sample_images import build_image
from tests.support.deadlines import scaled

FLEET = "testfleet"


def wait_port(port: int, timeout: float = 20.0) -> None:
    timeout = scaled(timeout)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


def wait_port_file(path: Path, log_file: Path, timeout: float = 20.0) -> int:
    """The port a service wrote to `path` once it listened (it bound port 0)."""
    timeout = scaled(timeout)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists():
            return int(path.read_text())
        time.sleep(0.05)
    raise TimeoutError(f"no port in {path} after {timeout} s: " + log_file.read_text()[-2000:])


class ServiceProcess:
    def __init__(self, args: list[str], log_file: Path, cwd: Path) -> None:
        self.log_file = log_file
        with open(log_file, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, cwd=cwd, start_new_session=True,
            )

    def stop(self) -> None:
        terminate(self.proc)


class StateWatcher:
    """Latest retained state and online flag of every device, collected on paho's thread."""

    def __init__(self, port: int, auth: dict[str, str] | None = None) -> None:
        self.states: dict[str, DeviceState] = {}
        self.history: dict[str, list[DeviceState]] = {}
        self.online: dict[str, bytes] = {}
        self._cond = threading.Condition()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"watcher-{os.getpid()}-{port}",
                                  protocol=MQTTProtocolVersion.MQTTv311)
        self.client.on_connect = lambda c, *a: c.subscribe([
            (topics.all_devices_wildcard(FLEET, "state"), 1), (topics.all_devices_wildcard(FLEET, "online"), 1)
        ])
        self.client.on_message = self._on_message
        if auth:
            self.client.username_pw_set(auth["username"], auth["password"])
            if "ca_file" in auth:
                self.client.tls_set(ca_certs=auth["ca_file"])
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:  # noqa: ANN001
        parsed = topics.device_from_topic(FLEET, msg.topic)
        if parsed is None:
            return
        device, leaf = parsed
        with self._cond:
            if leaf == "state":
                try:
                    state = DeviceState.from_bytes(msg.payload, max_bytes=65536)
                except (MalformedDocument, ValueError):
                    return  # ACL probes publish markers on state topics
                self.states[device] = state
                self.history.setdefault(device, []).append(state)
            elif leaf == "online":
                self.online[device] = bytes(msg.payload)
            self._cond.notify_all()

    def wait(self, device: str, predicate: Callable[[DeviceState], bool], timeout: float = 60.0) -> DeviceState:
        timeout = scaled(timeout)
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                state = self.states.get(device)
                if state is not None and predicate(state):
                    return state
                remaining = end - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"{device} did not reach the expected state in {timeout} s; last: {state}")
                self._cond.wait(remaining)

    def heard(self, device: str) -> int:
        """How many reports of `device` arrived so far (a mark for `first_after`)."""
        with self._cond:
            return len(self.history.get(device, []))

    def first_after(self, device: str, after: int, predicate: Callable[[DeviceState], bool],
                    timeout: float = 60.0) -> DeviceState | None:
        """The first report after the first `after` ones that satisfies `predicate`, by order of
        arrival (a device with a wrong clock stamps its reports wrong); None if none came in time."""
        end = time.monotonic() + scaled(timeout)
        with self._cond:
            while True:
                found = next((s for s in self.history.get(device, [])[after:] if predicate(s)), None)
                remaining = end - time.monotonic()
                if found is not None or remaining <= 0:
                    return found
                self._cond.wait(remaining)

    def wait_online(self, device: str, value: bytes, timeout: float = 30.0) -> None:
        end = time.monotonic() + scaled(timeout)
        with self._cond:
            while self.online.get(device) != value:
                remaining = end - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"{device} online flag is {self.online.get(device)!r}, expected {value!r}")
                self._cond.wait(remaining)

    def publish(self, topic: str, payload: bytes, retain: bool = True) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@dataclass
class Device:
    spec: DeviceSpec
    process: AgentProcess

    @property
    def name(self) -> str:
        return self.spec.device_id

    def installed_sha256(self) -> str:
        return sha256_file(self.spec.installed_file)

    def local_state(self) -> dict:
        return json.loads((self.spec.state_dir / "state.json").read_text())


@dataclass
class Fleet:
    """The operator home, broker, origin, and any number of devices under one temporary directory."""

    root: Path
    broker_port: int = 0
    home: OperatorHome = field(init=False)
    processes: list[ServiceProcess] = field(default_factory=list)
    devices: dict[str, Device] = field(default_factory=dict)
    origin_process: ServiceProcess | None = None
    origin_addr: str = ""

    def __post_init__(self) -> None:
        self.home = OperatorHome(self.root / "operator")
        self.images = self.root / "images"
        self.images.mkdir(parents=True, exist_ok=True)

    # -- infrastructure ------------------------------------------------------------------------

    def start(self, *, with_origin: bool = True, init_args: tuple[str, ...] = (),
              mosquitto_devices: list[tuple[str, str]] | None = None, broker_args: tuple[str, ...] = (),
              broker_tls: bool = True, origin_gossip: bool = True) -> None:
        """Start the embedded broker, or (with `mosquitto_devices`) a locked-down Mosquitto, over TLS by default.
        `origin_gossip=False`: the origin does not gossip signed documents (only devices carry them)."""
        operator_mqtt = ""
        if mosquitto_devices is None:
            # Port 0: the broker binds a free port itself and says which (no window for another process to take it).
            port_file = self.root / "broker.port"
            self.processes.append(ServiceProcess(["broker", "run", "--port", "0", "--port-file", str(port_file)],
                                                 self.root / "broker.log", self.root))
            self.broker_port = wait_port_file(port_file, self.root / "broker.log")
            watcher_auth = None
        else:
            # Mosquitto's listener port must be in its config (and every client's) before it starts.
            self.broker_port = free_port()
            # Mosquitto drops to user `mosquitto`, which cannot traverse pytest's 0700 directories.
            self.broker_dir = mosquitto_dir()
            if broker_tls:
                self.cli("pki", "init", "--out", str(self.root / "pki"), "--fleet", FLEET)
            self.cli("broker", "config", "--out", str(self.broker_dir), "--fleet", FLEET, "--port", str(self.broker_port),
                     "--local-port", str(free_port()),
                     *(("--pki", str(self.root / "pki")) if broker_tls else ()), *sum((["--device", f"{d}:{c}"] for d, c in mosquitto_devices), []),
                     *broker_args)
            self.mosquitto = MosquittoProcess(self.broker_dir / "mosquitto.conf", self.broker_port, self.root / "mosquitto.log")
            self.mosquitto.start()
            self.processes.append(self.mosquitto)  # type: ignore[arg-type]
            # The operator side's logins as `broker config` wrote them (the loopback listener for these two).
            operator_mqtt = mqtt_section(credentials(self.broker_dir, "edgeswarm-release"))
            watcher_auth = credentials(self.broker_dir, "edgeswarm-operator")
        self.operator_config = self.root / "operator.toml"
        self.origin_port = 0  # any free port, named in the origin's multiaddr file; see origin_multiaddr_from_repo
        self.operator_config.write_text(
            f'fleet = "{FLEET}"\nhome = "{self.home.path}"\n[mqtt]\n{operator_mqtt or f"port = {self.broker_port}"}\n'
            f"[content]\nswarm_port = {self.origin_port}\n" + ("" if origin_gossip else "gossip = false\n")
        )
        self.cli("keys", "init", "--config", str(self.operator_config), *init_args)
        self.watcher = StateWatcher(int(watcher_auth["port"]) if watcher_auth else self.broker_port, watcher_auth)
        if with_origin:
            self.start_origin()

    def start_origin(self) -> None:
        address_file = self.home.path / "origin" / "multiaddr"
        address_file.unlink(missing_ok=True)
        self.origin_process = ServiceProcess(["origin", "--config", str(self.operator_config)], self.root / "origin.log", self.root)
        self.processes.append(self.origin_process)
        end = time.monotonic() + scaled(30)
        while not address_file.exists():
            if time.monotonic() > end:
                raise TimeoutError("origin did not start: " + (self.root / "origin.log").read_text()[-2000:])
            time.sleep(0.05)
        self.origin_addr = address_file.read_text().splitlines()[0]  # the best of the addresses, one per line

    def origin_multiaddr_from_repo(self) -> str:
        """The origin's address before it ever ran: identity from the repo config it will use, and a
        port fixed now in the operator settings (a device configured with it cannot learn a later one)."""
        from services.runtime.content import create_repo

        if self.origin_port == 0:
            self.origin_port = free_port()
            settings = self.operator_config.read_text()
            assert "swarm_port = 0\n" in settings
            self.operator_config.write_text(settings.replace("swarm_port = 0\n", f"swarm_port = {self.origin_port}\n", 1))
        peer_id = create_repo(self.home.path / "origin" / "ipfs")
        return f"/ip4/127.0.0.1/tcp/{self.origin_port}/p2p/{peer_id}"

    def run_cli(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """`edgeswarm ARGS` as an operator runs it, whatever its exit code."""
        return subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True, text=True,
                              cwd=self.root, timeout=120, stdin=subprocess.DEVNULL,
                              env={**os.environ, "COLUMNS": "400", **(env or {})})

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = self.run_cli(*args)
        if result.returncode != 0:
            raise AssertionError(f"edgeswarm {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def service_config(self, *, homeassistant: bool = False) -> Path:
        """Settings for `fleet serve` as the broker's operator principal (it may publish ops results,
        device commands and discovery, which the release principal of `operator_config` may not)."""
        operator = credentials(self.broker_dir, "edgeswarm-operator")
        path = self.root / "service.toml"
        path.write_text(
            f'fleet = "{FLEET}"\nhome = "{self.home.path}"\n[mqtt]\n{mqtt_section(operator)}\n'
            + ("[homeassistant]\nenabled = true\n" if homeassistant else "")
        )
        return path

    def stop(self) -> None:
        """Stop everything this fleet started, each step even if an earlier one failed (a test that
        errors must not leave a broker, an origin or agents running); the first failure is raised last."""
        steps: list[Callable[[], object]] = [device.process.stop for device in self.devices.values()]
        if hasattr(self, "watcher"):
            steps.append(self.watcher.close)
        steps += [process.stop for process in reversed(self.processes)]
        if hasattr(self, "broker_dir"):
            steps.append(lambda: shutil.rmtree(self.broker_dir.parent, ignore_errors=True))
        failures: list[BaseException] = []
        for step in steps:
            try:
                step()
            except BaseException as exc:  # noqa: BLE001 - every process gets its stop; the first error is raised below
                failures.append(exc)
        if failures:
            raise failures[0]

    # -- images and releases ---------------------------------------------------------------------

    def image(self, device_class: str, version: str) -> Path:
        path = self.images / f"{device_class}-{version}.img"
        if not path.exists():
            recipe_class = "ipc-x86_64" if device_class.startswith("ipc") else "gateway-armv7"
            build_image(recipe_class, version, path)
        return path

    def release(self, device_class: str, version: str) -> ReleaseManifest:
        """Release through the operator CLI, exactly as an operator would."""
        out = self.cli("release", device_class, version, str(self.image(device_class, version)),
                       "--config", str(self.operator_config), "--json")
        summary = json.loads(out.stdout)
        assert summary["version"] == version
        return ReleaseManifest.from_bytes(
            _payload(self.home.latest_manifest(device_class) or b""), max_bytes=1 << 20
        )

    def release_with(self, device_class: str, version: str, install: InstallSpec) -> BuiltRelease:
        """Build a release with this install spec, then publish its timestamp and the release."""
        built = self.build_only(device_class, version, install=install)
        self.publish_timestamp()
        self.publish_release(device_class, built.envelope)
        return built

    def build_only(self, device_class: str, version: str, install: InstallSpec | None = None) -> BuiltRelease:
        """Build and sign a release without publishing it (the test decides what reaches the broker)."""
        store = HashOnlyStore(self.home.path / "cid-scratch", self.home.seed_dir)
        pipeline = ReleasePipeline(self.home, store)

        async def build() -> BuiltRelease:
            try:
                return await pipeline.build(device_class, version, self.image(device_class, version),
                                            target="/opt/edgeswarm/firmware.img", install=install)
            finally:
                await store.close()

        return asyncio.run(build())

    def sign_manifest(self, manifest: ReleaseManifest, keys: list[SigningKey] | None = None) -> bytes:
        signers = keys if keys is not None else self.home.signing_keys(Role.RELEASE)
        return sign_envelope(PayloadType.RELEASE, manifest.canonical_bytes(), signers).canonical_bytes()

    def publish_release(self, device_class: str, envelope: bytes) -> None:
        self.watcher.publish(topics.release_topic(FLEET, device_class), envelope)

    def vouch_and_publish(self, device_class: str, manifest: ReleaseManifest) -> bytes:
        """Sign `manifest` with the release keys, make it the class's latest, timestamp it, publish it.

        This is what an attacker holding the release *and* timestamp keys could do; tests use it
        for manifests that are validly signed but lie about their content.
        """
        envelope = self.sign_manifest(manifest)
        (self.home.release_dir(device_class) / "latest.json").write_bytes(envelope)
        history = self.home.history(device_class)
        history.releases[-1] = history.releases[-1].model_copy(update={"sequence": manifest.sequence})
        self.home.save_history(device_class, history)
        self.publish_timestamp()
        self.publish_release(device_class, envelope)
        return envelope

    def publish_timestamp(self, *extra: str) -> None:
        """Sign a timestamp naming the latest built release of every class, through the CLI."""
        self.cli("timestamp", "--config", str(self.operator_config), *extra)

    def publish(self, topic: str, payload: bytes) -> datetime:
        """Publish (not retained) as an attacker on the broker would; returns when it was sent."""
        sent = datetime.now(UTC)
        self.watcher.publish(topic, payload, retain=False)
        return sent

    # -- devices -------------------------------------------------------------------------------

    def add_device(self, device_id: str, device_class: str, *, version: str = "1.0.0", start: bool = True,
                   stall_timeout: float = 30.0, retry_interval: float = 2.0, swarm_key_file: Path | None = None,
                   class_key_file: Path | None = None, extra_toml: str = "",
                   broker: tuple[int, Path] | None = None, content_settings: tuple[tuple[str, str], ...] = (),
                   origin: str | None = None, peers: tuple[str, ...] | None = None,
                   mqtt_extra: tuple[tuple[str, str], ...] = ()) -> Device:
        """`broker`: (port, broker config directory) of another broker than the fleet's own; `peers`:
        dialed at start instead of the origin; `mqtt_extra`: further [mqtt] keys (e.g. tunnel_after)."""
        broker_port, creds_dir = broker or (self.broker_port, getattr(self, "broker_dir", None))
        origin = origin or self.origin_addr or self.origin_multiaddr_from_repo()
        spec = DeviceSpec(
            device_id=device_id, fleet=FLEET, device_class=device_class, base_dir=self.root / "devices" / device_id,
            # Port 0: the node binds a free one itself. With a daemon (kubo-rpc) the port is the daemon's.
            swarm_port=free_port() if ("backend", "kubo-rpc") in content_settings else 0, broker_host="127.0.0.1", broker_port=broker_port,
            root_file=self.home.root_file, firmware=self.image(device_class, version), firmware_version=version,
            peers=peers if peers is not None else (origin,), origin=origin, stall_timeout=stall_timeout, retry_interval=retry_interval,
            swarm_key_file=swarm_key_file, class_key_file=class_key_file, extra_toml=extra_toml,
            content_settings=content_settings,
            identities_dir=self.home.identities_dir,
            mqtt_settings=(tuple(
                (k, v) for k, v in credentials(creds_dir, device_id).items() if k in ("username", "password", "ca_file")
            ) if creds_dir is not None else ()) + mqtt_extra,
        )
        device = Device(spec, AgentProcess(provision(spec), spec.base_dir / "agent.log"))
        self.devices[device_id] = device
        if start:
            self.start_device(device_id)
        return device

    def start_device(self, device_id: str) -> None:
        self.devices[device_id].process.start()

    def log(self, device_id: str) -> str:
        return (self.devices[device_id].spec.base_dir / "agent.log").read_text()

    def node_address(self, device_id: str, timeout: float = 30.0) -> str:
        """The multiaddr a device's IPFS node listens on (from its log, once it started)."""
        end = time.monotonic() + scaled(timeout)
        while time.monotonic() < end:
            for line in self.log(device_id).splitlines():
                if "IPFS node" in line and " listening on " in line:
                    return line.rsplit(" listening on ", 1)[1].strip()
            time.sleep(0.1)
        raise TimeoutError(f"{device_id}'s IPFS node did not start: " + self.log(device_id)[-2000:])


def _payload(envelope: bytes) -> bytes:
    import base64

    return base64.b64decode(json.loads(envelope)["payload"])


class MosquittoProcess:
    """A real Mosquitto (Debian's package) with a config from `edgeswarm broker config`."""

    def __init__(self, config: Path, port: int, log_file: Path) -> None:
        self.config, self.port, self.log_file = config, port, log_file
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen([binary, "-c", str(self.config)], stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        wait_port(self.port)

    def stop(self) -> None:
        terminate(self.proc)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def mosquitto_dir() -> Path:
    """A fresh directory the `mosquitto` user can reach (its parent is /tmp); the caller removes it."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="edgeswarm-mosquitto-"))
    path.chmod(0o755)
    return path / "broker"


def mosquitto_available() -> bool:
    return bool(shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists())


def mqtt_section(login: dict[str, str]) -> str:
    """A settings file's [mqtt] lines for a login of `broker config`."""
    return "\n".join(f"{k} = {json.dumps(login[k]) if k != 'port' else int(login[k])}"
                     for k in ("host", "port", "username", "password", "ca_file") if k in login)


def credentials(directory: Path, principal: str) -> dict[str, str]:
    import tomllib

    return tomllib.loads((directory / "credentials" / f"{principal}.toml").read_text())["mqtt"]
