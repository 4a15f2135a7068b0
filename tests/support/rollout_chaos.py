"""Broker and fleet-service crashes in the middle of a staged rollout (issue 15, items 2 and 3).

A `RolloutLab` is one fleet with real processes: the broker (the embedded one, or Mosquitto with
TLS, per-device logins and autosave), `fleet serve` with its SQLite record, and N devices (A/B,
healthy). Each trial releases a new version staged, starts a rollout of three waves (one device,
half, all), and at a random moment SIGKILLs the broker or the fleet service, then starts it again
after a random pause on the same port and files. Then it waits for the rollout to complete and
checks, in one place:

- every device runs the new version (its bytes) and its state.json says so;
- the rollout says `completed`;
- the fleet record names, for every device, the version the device itself persisted (no report
  lost), and `fleet status --from record` shows it;
- no device installed the version twice (two `done` reports with different times).

Each trial's version is 2.<k>.0, an image made of 2.0.0's bytes and a trailer, so one lab serves
many trials.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from schemas.models import Phase
from services.demo.processes import terminate
from services.runtime.files import sha256_file
from tests.support.deadlines import scaled
from tests.support.harness import FLEET, Fleet, ServiceProcess, credentials, mqtt_section, wait_port

IPC = "ipc-x86_64"
AB = '[install]\nallowed_handlers = ["ab"]\nconfirm_deadline = 3\nhealth_command = ["true"]\n'
FAULTS = ("broker", "service")


@dataclass
class RolloutOutcome:
    fault: str
    broker: str
    kill_at: float  # s after the rollout started
    down_for: float
    completed: bool
    devices_on_new: int
    devices: int
    missing_from_record: list[str]
    installed_twice: list[str]
    problems: list[str]
    seconds: float

    def as_json(self) -> dict:
        return {**self.__dict__, "kill_at": round(self.kill_at, 2), "down_for": round(self.down_for, 2),
                "seconds": round(self.seconds, 1)}


@dataclass
class RolloutLab:
    fleet: Fleet
    broker: str  # embedded | mosquitto
    names: list[str]
    service: ServiceProcess | None = None
    trials: int = 0
    base_image: Path = field(init=False)

    def __post_init__(self) -> None:
        self.base_image = self.fleet.image(IPC, "2.0.0")

    # -- processes -----------------------------------------------------------------------------

    def _service_config(self) -> Path:
        return self.fleet.service_config() if self.broker == "mosquitto" else self.fleet.operator_config

    def _ops_config(self) -> Path:
        """Settings for the rollout commands: on Mosquitto a principal that may publish operator
        requests (Node-RED's login; the release principal may not)."""
        if self.broker != "mosquitto":
            return self.fleet.operator_config
        path = self.fleet.root / "ops.toml"
        if not path.exists():
            login = credentials(self.fleet.broker_dir, "edgeswarm-nodered")
            path.write_text(f'fleet = "{FLEET}"\nhome = "{self.fleet.home.path}"\n[mqtt]\n{mqtt_section(login)}\n')
        return path

    def start_service(self) -> None:
        self.service = ServiceProcess(["fleet", "serve", "--config", str(self._service_config()), "--no-homeassistant"],
                                      self.fleet.root / "fleet-service.log", self.fleet.root)
        self.fleet.processes.append(self.service)

    def kill_service(self) -> None:
        assert self.service is not None
        self.service.proc.kill()
        self.service.proc.wait()

    def kill_broker(self) -> None:
        if self.broker == "mosquitto":
            self.fleet.mosquitto.kill()
        else:
            broker = self.fleet.processes[0]
            broker.proc.kill()
            broker.proc.wait()

    def start_broker(self) -> None:
        if self.broker == "mosquitto":
            self.fleet.mosquitto.start()
            return
        old = self.fleet.processes[0]
        self.fleet.processes[0] = ServiceProcess(["broker", "run", "--port", str(self.fleet.broker_port)],
                                                 self.fleet.root / "broker.log", self.fleet.root)
        terminate(old.proc)
        wait_port(self.fleet.broker_port)

    def stop(self) -> None:
        self.fleet.stop()

    # -- one trial -----------------------------------------------------------------------------

    def rollout(self, *args: str) -> dict:
        return json.loads(self.fleet.cli("rollout", *args, "--config", str(self._ops_config()), "--json").stdout)

    def _status(self) -> dict | None:
        result = self.fleet.run_cli("rollout", "status", IPC, "--wait", "0.5", "--config", str(self._ops_config()), "--json")
        if result.returncode != 0:
            return None  # the service is down, or the broker: asked again
        found = json.loads(result.stdout)["rollouts"]
        return found[0] if found else None

    def trial(self, rng: random.Random, fault: str) -> RolloutOutcome:
        self.trials += 1
        version = f"2.{self.trials}.0"
        image = self.fleet.root / f"image-{version}.img"
        image.write_bytes(self.base_image.read_bytes() + f"\nbuild {version}\n".encode())
        new_sha = sha256_file(image)
        self.fleet.cli("release", IPC, version, str(image), "--config", str(self.fleet.operator_config),
                       "--staged", "--handler", "ab", "--json")
        for name in self.names:
            self.fleet.watcher.wait(name, lambda s, v=version: s.target_version == v and s.phase == Phase.WAITING)
        started = time.monotonic()
        self.rollout("start", IPC, version, "--wave", self.names[0], "--wave", "50%", "--wave", "100%",
                     "--soak", "1", "--max-failed", "30")
        kill_at, down_for = rng.uniform(0, 6), rng.uniform(1, 4) if fault == "broker" else rng.uniform(0.5, 3)
        time.sleep(kill_at)
        (self.kill_broker if fault == "broker" else self.kill_service)()
        time.sleep(down_for)
        (self.start_broker if fault == "broker" else self.start_service)()
        problems: list[str] = []
        status: dict | None = None
        end = time.monotonic() + scaled(120)
        while time.monotonic() < end:
            status = self._status()
            if status is not None and status.get("version") == version and status["state"] in ("completed", "paused"):
                break
            time.sleep(0.5)
        completed = status is not None and status.get("state") == "completed"
        if not completed:
            problems.append(f"the rollout did not complete: {status}")
        on_new, record_wrong, twice = 0, [], []
        record = self._record()
        for name in self.names:
            device = self.fleet.devices[name]
            persisted = json.loads((device.spec.state_dir / "state.json").read_text())
            if sha256_file(device.spec.installed_file) == new_sha and persisted["installed_version"] == version:
                on_new += 1
            else:
                problems.append(f"{name} runs {persisted['installed_version']}")
            if record.get(name) != persisted["installed_version"]:
                record_wrong.append(name)
            done_at = {s.timestamp for s in self.fleet.watcher.history.get(name, [])
                       if s.phase == Phase.DONE and s.installed_version == version}
            if len(done_at) > 1:
                twice.append(name)
        if record_wrong:
            problems.append(f"the fleet record disagrees with {record_wrong}: {record}")
        if twice:
            problems.append(f"installed twice: {twice}")
        return RolloutOutcome(fault, self.broker, kill_at, down_for, completed, on_new, len(self.names),
                              record_wrong, twice, problems, time.monotonic() - started)

    def _record(self, timeout: float = 30) -> dict[str, str]:
        """device -> installed version, as `fleet status --from record` shows it once it has caught up
        with what the devices persisted (reports arrive a moment after the rollout completes)."""
        end = time.monotonic() + scaled(timeout)
        while True:
            out = self.fleet.cli("fleet", "status", "--from", "record", "--all", "--json",
                                 "--config", str(self.fleet.operator_config)).stdout
            versions = {d["device"]: d.get("installed_version") for d in json.loads(out)["devices"]}
            expected = {n: json.loads((self.fleet.devices[n].spec.state_dir / "state.json").read_text())["installed_version"]
                        for n in self.names}
            if all(versions.get(n) == v for n, v in expected.items()) or time.monotonic() > end:
                return versions
            time.sleep(0.5)


def rollout_lab(root: Path, broker: str, devices: int) -> RolloutLab:
    """Started: the broker, the origin, `fleet serve`, and `devices` devices idle on 1.0.0."""
    fleet = Fleet(root)
    names = [f"r{i}" for i in range(1, devices + 1)]
    try:
        if broker == "mosquitto":
            fleet.start(mosquitto_devices=[(n, IPC) for n in names], broker_tls=False)
        else:
            fleet.start()
        fleet.release(IPC, "1.0.0")
        for name in names:
            fleet.add_device(name, IPC, extra_toml=AB)
        for name in names:
            fleet.watcher.wait(name, lambda s: s.phase == Phase.IDLE and s.last_sequence >= 1)
        lab = RolloutLab(fleet, broker, names)
        lab.start_service()
        return lab
    except BaseException:
        fleet.stop()
        raise
