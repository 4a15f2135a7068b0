"""The shipped Node-RED flow (config/node-red/edgeswarm-rollout.json) in a real Node-RED 4.1 (issue #6).

Node-RED logs in to Mosquitto as `edgeswarm-nodered` (it may only publish rollout requests) and
carries the operator token in its environment, as docs/node-red.md describes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from schemas.models import Phase
from tests.support.ports import free_port
from tests.support import nodered
from tests.support.harness import FLEET, Fleet, ServiceProcess, credentials, mosquitto_available

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not mosquitto_available(), reason="Mosquitto is not installed (apt-get install mosquitto)"),
    pytest.mark.skipif(not nodered.node_available(), reason="Node.js and npm are not installed"),
]
IPC = "ipc-x86_64"
FLOW = Path(__file__).resolve().parents[2] / "config" / "node-red" / "edgeswarm-rollout.json"


def device_toml(marker: Path) -> str:
    """Healthy until `marker` exists: lets the test make a device fail a later release."""
    return (f'[install]\nallowed_handlers = ["ab"]\nconfirm_deadline = 3\n'
            f'health_command = ["/bin/sh", "-c", "test ! -e {marker}"]\n')


def rollout_status(fleet: Fleet, config: Path) -> dict | None:
    out = fleet.cli("rollout", "status", IPC, "--config", str(config), "--json", "--wait", "0.5")
    found = json.loads(out.stdout)["rollouts"]
    return found[0] if found else None


def status_when(fleet: Fleet, config: Path, ready: Callable[[dict], bool], timeout: float = 60.0) -> dict:
    end = time.monotonic() + timeout
    status = None
    while time.monotonic() < end:
        status = rollout_status(fleet, config)
        if status is not None and ready(status):
            return status
        time.sleep(0.3)
    raise AssertionError(f"rollout status did not get there in {timeout} s; last: {status}")


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Fleet, Path]]:
    fleet = Fleet(tmp_path)
    try:
        fleet.start(mosquitto_devices=[("dev-1", IPC), ("dev-2", IPC)], broker_tls=False)
        service_config = fleet.service_config()
        yield fleet, service_config
    finally:
        fleet.stop()


def test_the_shipped_flow_starts_a_rollout_watches_it_and_pauses_it_on_failures(setup, tmp_path: Path) -> None:  # noqa: ANN001
    fleet, service_config = setup
    started = time.monotonic()
    fleet.processes.append(ServiceProcess(["fleet", "serve", "--config", str(service_config)],
                                          fleet.root / "fleet-service.log", fleet.root))
    fleet.release(IPC, "1.0.0")
    markers = {name: tmp_path / f"{name}.sick" for name in ("dev-1", "dev-2")}
    for name, marker in markers.items():
        fleet.add_device(name, IPC, extra_toml=device_toml(marker))
    for name in markers:
        fleet.watcher.wait(name, lambda s: s.phase == Phase.IDLE and s.last_sequence >= 1)
    release = ["--config", str(fleet.operator_config), "--staged", "--handler", "ab"]
    fleet.cli("release", IPC, "2.0.0", str(fleet.image(IPC, "2.0.0")), *release)

    login = credentials(fleet.broker_dir, "edgeswarm-nodered")
    token = (fleet.home.path / "tokens" / "operator").read_text().strip()
    red = nodered.start(tmp_path / "node-red", free_port(), {
        "EDGESWARM_MQTT_HOST": "127.0.0.1", "EDGESWARM_MQTT_PORT": str(fleet.broker_port), "EDGESWARM_FLEET": FLEET,
        "EDGESWARM_DEVICE_CLASS": IPC, "EDGESWARM_VERSION": "2.0.0", "EDGESWARM_OPS_TOKEN": token,
        "EDGESWARM_PAUSE_ABOVE_PERCENT": "0",
    })
    try:
        flow = json.loads(FLOW.read_text())
        for node in flow:
            if node["type"] == "mqtt-broker":  # what an operator types into the broker node's Security tab
                node["credentials"] = {"user": login["username"], "password": login["password"]}
        red.deploy(flow)
        red.wait_log("Connected to broker")  # the MQTT nodes are connected (was: a 2 s pause)
        red.inject("es-inject-start")
        done = status_when(fleet, service_config, lambda s: s["state"] == "completed")
        assert done["version"] == "2.0.0" and done["done"] == 2 and done["waves"] == 2
        for name in markers:
            assert fleet.watcher.states[name].installed_version == "2.0.0"

        # The guard: one device gets sick, the fleet service would tolerate it (100%), Node-RED does not (0%).
        markers["dev-2"].touch()
        fleet.cli("release", IPC, "3.0.0", str(fleet.image(IPC, "3.0.0")), *release)
        for name in markers:
            fleet.watcher.wait(name, lambda s: s.phase == Phase.WAITING and s.target_version == "3.0.0")
        # Guards act on what they see: the soak time keeps a failed wave's status up long enough.
        answer = red.request("POST", "/edgeswarm/rollout", {"version": "3.0.0", "max_failed_percent": 100, "soak_seconds": 5})
        assert isinstance(answer, dict) and answer["request_id"].startswith("nodered-")
        paused = status_when(fleet, service_config, lambda s: s["version"] == "3.0.0" and s["state"] == "paused")
        assert paused["reason"].startswith("Node-RED: ") and paused["failed_devices"] == ["dev-2"]
        assert fleet.watcher.states["dev-2"].installed_version == "2.0.0"  # rolled back to its working version
        log = red.log.read_text()
        # Both debug nodes saw the service's answers: the result of this very request, and a status.
        assert "ops results" in log and "rollout status" in log and answer["request_id"] in log, log[-2000:]
    finally:
        red.stop()
    print(f"Node-RED scenario: {time.monotonic() - started:.0f} s")
