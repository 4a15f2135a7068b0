"""Staged rollouts end to end (issue #6): the fleet service, real devices, a real broker.

Devices whose health check fails roll back, which is an install failure the rollout counts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest

from schemas.models import Phase
from tests.support.harness import Fleet, ServiceProcess

pytestmark = pytest.mark.integration
IPC = "ipc-x86_64"
AB = '[install]\nallowed_handlers = ["ab"]\nconfirm_deadline = 3\nhealth_command = '


def start_service(fleet: Fleet) -> ServiceProcess:
    service = ServiceProcess(["fleet", "serve", "--config", str(fleet.operator_config), "--no-homeassistant"],
                             fleet.root / "fleet-service.log", fleet.root)
    fleet.processes.append(service)
    return service


def add_devices(fleet: Fleet, healthy: list[str], sick: list[str]) -> None:
    fleet.release(IPC, "1.0.0")
    for name in healthy + sick:
        fleet.add_device(name, IPC, extra_toml=AB + ('["true"]\n' if name in healthy else '["false"]\n'))
    for name in healthy + sick:
        fleet.watcher.wait(name, lambda s: s.phase == Phase.IDLE and s.last_sequence >= 1)


def release_staged(fleet: Fleet, version: str, *extra: str) -> dict:
    out = fleet.cli("release", IPC, version, str(fleet.image(IPC, version)), "--config", str(fleet.operator_config),
                    "--staged", "--handler", "ab", "--json", *extra)
    return json.loads(out.stdout)


def rollout(fleet: Fleet, *args: str) -> dict:
    return json.loads(fleet.cli("rollout", *args, "--config", str(fleet.operator_config), "--json").stdout)


def status_when(fleet: Fleet, ready: Callable[[dict], bool], timeout: float = 60.0) -> dict:
    end = time.monotonic() + timeout
    last: dict = {}
    while time.monotonic() < end:
        found = rollout(fleet, "status", IPC, "--wait", "0.5")["rollouts"]
        if found and ready(found[0]):
            return found[0]
        last = found[0] if found else {}
        time.sleep(0.3)
    raise AssertionError(f"rollout status did not get there in {timeout} s; last: {last}")


def test_a_failing_wave_pauses_survives_a_service_restart_and_resumes_to_completion(fleet: Fleet) -> None:
    add_devices(fleet, healthy=["good-1", "good-2"], sick=["sick-1"])
    service = start_service(fleet)
    v1 = {n: d.installed_sha256() for n, d in fleet.devices.items()}
    summary = release_staged(fleet, "2.0.0")
    assert summary["rollout"]["canary_percent"] == 0
    for name in fleet.devices:  # signed, verified, and held back by the signed rollout rule
        state = fleet.watcher.wait(name, lambda s: s.phase == Phase.WAITING)
        assert state.target_version == "2.0.0" and state.reason_code == "awaiting_rollout"

    started = rollout(fleet, "start", IPC, "2.0.0", "--wave", "sick-1,good-1", "--wave", "100%", "--soak", "0",
                      "--max-failed", "30")
    assert started["ok"] and "2 wave(s)" in started["message"]
    paused = status_when(fleet, lambda s: s["state"] == "paused")
    assert paused["wave"] == 1 and paused["failed_devices"] == ["sick-1"] and "sick-1" in paused["reason"]
    assert fleet.watcher.states["good-1"].installed_version == "2.0.0"
    sick = fleet.watcher.states["sick-1"]
    assert sick.phase == Phase.ROLLED_BACK and fleet.devices["sick-1"].installed_sha256() == v1["sick-1"]
    time.sleep(2)  # the paused rollout admits nobody else
    assert fleet.watcher.states["good-2"].phase == Phase.WAITING
    assert fleet.devices["good-2"].installed_sha256() == v1["good-2"]

    service.proc.kill()  # crash: the rollout is in SQLite, the devices' facts are retained
    service.proc.wait()
    start_service(fleet)
    after = status_when(fleet, lambda s: s["state"] == "paused" and s["failed_devices"] == ["sick-1"])
    assert after["wave"] == 1 and after["done"] == 1
    refused = cli_fails(fleet, "fleet", "install", "good-2")
    assert "paused" in refused  # nobody jumps the queue of a paused rollout, not even by hand

    resumed = rollout(fleet, "resume", IPC)
    assert resumed["ok"] and resumed["message"].endswith("running")
    completed = status_when(fleet, lambda s: s["state"] == "completed")
    assert completed["wave"] == 2 and completed["done"] == 2 and completed["failed_devices"] == ["sick-1"]
    assert fleet.watcher.states["good-2"].installed_version == "2.0.0"
    assert fleet.devices["sick-1"].installed_sha256() == v1["sick-1"]  # on its working version throughout
    shown = json.loads(fleet.cli("fleet", "show", "sick-1", "--config", str(fleet.operator_config), "--json").stdout)
    assert [a["outcome"] for a in shown["attempts"]] == ["rolled_back"]


def test_abort_keeps_the_rest_on_their_version_and_wrong_tokens_are_refused(fleet: Fleet) -> None:
    add_devices(fleet, healthy=["a-1", "a-2", "a-3"], sick=[])
    start_service(fleet)
    v1 = {n: d.installed_sha256() for n, d in fleet.devices.items()}
    release_staged(fleet, "2.0.0")
    for name in fleet.devices:
        fleet.watcher.wait(name, lambda s: s.phase == Phase.WAITING)
    rollout(fleet, "start", IPC, "2.0.0", "--wave", "a-1", "--wave", "100%", "--soak", "600")
    soaking = status_when(fleet, lambda s: s["done"] == 1 and s.get("soak_until") is not None)
    assert soaking["state"] == "running" and soaking["wave"] == 1  # wave 2 waits out the soak time

    forged = cli_fails(fleet, "rollout", "abort", IPC, env={"EDGESWARM_OPS_TOKEN": "not-the-operator-token-0000"})
    assert "token not accepted" in forged
    ha_token = (fleet.home.path / "tokens" / "homeassistant").read_text().strip()
    scoped = cli_fails(fleet, "rollout", "resume", IPC, env={"EDGESWARM_OPS_TOKEN": ha_token})
    assert "token not accepted" in scoped

    aborted = rollout(fleet, "abort", IPC, "--reason", "field reports")
    assert aborted["message"].endswith("aborted")
    status = status_when(fleet, lambda s: s["state"] == "aborted")
    assert status["reason"] == "field reports"
    time.sleep(3)
    for name in ("a-2", "a-3"):
        state = fleet.watcher.states[name]
        assert state.phase == Phase.WAITING and fleet.devices[name].installed_sha256() == v1[name]
    assert fleet.watcher.states["a-1"].installed_version == "2.0.0"
    assert "aborted" in cli_fails(fleet, "fleet", "install", "a-2")
    assert "abort it first" not in cli_fails(fleet, "rollout", "pause", IPC)


def cli_fails(fleet: Fleet, *args: str, env: dict[str, str] | None = None) -> str:
    """Run the CLI expecting exit 1; returns what it said."""
    result = fleet.run_cli(*args, "--config", str(fleet.operator_config), env=env)
    assert result.returncode == 1, f"expected exit 1, got {result.returncode}: {result.stdout}{result.stderr}"
    return result.stdout + result.stderr
