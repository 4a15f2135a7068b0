"""A real Home Assistant (2025.4.4, its own venv) shows edgeswarm devices and installs on them (issue #6).

Mosquitto with per-principal credentials and ACLs in between: Home Assistant logs in as
`edgeswarm-homeassistant`, which may only ask for one device's install or check.
The first run installs Home Assistant into ~/.cache/edgeswarm (about 90 s); later runs reuse it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from schemas.models import Phase
from tests.support.ports import free_port
from tests.support import homeassistant
from tests.support.harness import FLEET, Fleet, ServiceProcess, credentials, mosquitto_available

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not mosquitto_available(), reason="Mosquitto is not installed (apt-get install mosquitto)"),
    pytest.mark.skipif(homeassistant.find_python() is None,
                       reason="no Python >= 3.13 interpreter on this machine: Home Assistant 2025.4 needs one"),
]
IPC = "ipc-x86_64"
SLOW_HEALTHY = '[install]\nallowed_handlers = ["ab"]\nhealth_command = ["sleep", "4"]\nhealth_timeout = 20\nconfirm_deadline = 30\n'


def entity(device: str) -> str:
    return f"update.edgeswarm_{FLEET}_{device.replace('-', '_')}"


def wait_for(ha: homeassistant.HomeAssistant, entity_id: str, ready: Callable[[dict | None], bool],
             timeout: float = 60.0) -> dict | None:
    end = time.monotonic() + timeout
    state = None
    while time.monotonic() < end:
        state = ha.state(entity_id)
        if ready(state):
            return state
        time.sleep(0.2)
    raise AssertionError(f"{entity_id} did not get there in {timeout} s; last: {state}")


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Fleet, homeassistant.HomeAssistant, Path]]:
    homeassistant.ensure_installed()
    fleet = Fleet(tmp_path)
    ha = None
    try:
        fleet.start(mosquitto_devices=[("dev-a", IPC), ("dev-b", IPC)], broker_tls=False)
        service_config = fleet.service_config(homeassistant=True)
        ha = homeassistant.start(tmp_path / "ha", free_port())
        yield fleet, ha, service_config
    finally:
        try:
            if ha is not None:
                ha.stop()
        finally:
            fleet.stop()


@pytest.mark.timeout(900)  # a first run installs Home Assistant (~90 s), which boots in up to 240 s
def test_devices_are_update_entities_and_install_from_home_assistant(setup) -> None:  # noqa: ANN001
    fleet, ha, service_config = setup
    started = time.monotonic()
    login = credentials(fleet.broker_dir, "edgeswarm-homeassistant")
    ha.add_mqtt("127.0.0.1", fleet.broker_port, login["username"], login["password"])
    fleet.processes.append(ServiceProcess(["fleet", "serve", "--config", str(service_config)],
                                          fleet.root / "fleet-service.log", fleet.root))
    fleet.release(IPC, "1.0.0")
    for name in ("dev-a", "dev-b"):
        fleet.add_device(name, IPC, extra_toml=SLOW_HEALTHY)
    for name in ("dev-a", "dev-b"):
        fleet.watcher.wait(name, lambda s: s.phase == Phase.IDLE and s.last_sequence >= 1)
    fleet.cli("release", IPC, "2.0.0", str(fleet.image(IPC, "2.0.0")), "--config", str(fleet.operator_config),
              "--staged", "--handler", "ab", "--summary", "Fixes the watchdog", "--url", "https://example.org/notes/2.0.0")

    for name in ("dev-a", "dev-b"):
        state = wait_for(ha, entity(name), lambda s: s is not None and s["attributes"].get("latest_version") == "2.0.0")
        assert state is not None
        attributes = state["attributes"]
        assert state["state"] == "on"  # an update is available
        assert attributes["installed_version"] == "1.0.0" and attributes["in_progress"] is False
        assert attributes["title"] == f"{IPC} firmware" and attributes["release_summary"] == "Fixes the watchdog"
        assert attributes["release_url"] == "https://example.org/notes/2.0.0"
    device_info = ha.request("POST", "/api/template", {"template": "{{ device_attr(device_id('%s'), 'model') }} "
                                                                   "{{ device_attr(device_id('%s'), 'sw_version') }}"
                                                                   % (entity("dev-a"), entity("dev-a"))})
    assert device_info == f"{IPC} 1.0.0"

    # Install pressed in Home Assistant: HA -> ops request -> fleet service -> install command -> device.
    ha.request("POST", "/api/services/update/install", {"entity_id": entity("dev-a")})
    seen: list[tuple[bool, int | None]] = []
    end = time.monotonic() + 90
    while time.monotonic() < end:
        attributes = (ha.state(entity("dev-a")) or {}).get("attributes", {})
        seen.append((attributes.get("in_progress"), attributes.get("update_percentage")))
        if attributes.get("installed_version") == "2.0.0":
            break
        time.sleep(0.1)
    during = [p for busy, p in seen if busy]
    assert during and all(p is not None and 0 <= p < 100 for p in during), seen[-20:]
    done = wait_for(ha, entity("dev-a"), lambda s: s is not None and s["attributes"]["installed_version"] == "2.0.0")
    assert done is not None and done["state"] == "off" and done["attributes"]["in_progress"] is False
    assert done["attributes"]["update_percentage"] is None
    assert fleet.watcher.states["dev-a"].installed_version == "2.0.0"
    assert fleet.watcher.states["dev-b"].phase == Phase.WAITING  # the button was for dev-a only

    # The rollout appears as a sensor of the fleet; dev-b follows through it.
    fleet.cli("rollout", "start", IPC, "2.0.0", "--wave", "100%", "--soak", "0", "--config", str(service_config))
    sensor = f"sensor.edgeswarm_{FLEET}_rollout_{IPC.replace('-', '_')}"
    finished = wait_for(ha, sensor, lambda s: s is not None and s["state"] == "completed", timeout=90)
    assert finished is not None and finished["attributes"]["done"] == 2 and finished["attributes"]["failed"] == 0
    wait_for(ha, entity("dev-b"), lambda s: s is not None and s["attributes"]["installed_version"] == "2.0.0")

    # Offline (the device's last will) makes the entity unavailable; retiring removes it.
    fleet.devices["dev-b"].process.stop()
    wait_for(ha, entity("dev-b"), lambda s: s is not None and s["state"] == "unavailable")
    fleet.cli("fleet", "retire", "dev-b", "--config", str(service_config))
    wait_for(ha, entity("dev-b"), lambda s: s is None)
    assert ha.state(entity("dev-a")) is not None
    print(f"Home Assistant scenario after boot: {time.monotonic() - started:.0f} s")
    log = (fleet.root / "fleet-service.log").read_text()
    assert "device/install dev-a: dev-a: told to install 2.0.0" in log, log[-2000:]
