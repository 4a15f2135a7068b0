"""Install handlers (file, ab, command), health checks and rollback (issue #8, item 4)."""

from __future__ import annotations

import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from device_client.installer import ABInstaller
from schemas.models import InstallSpec, Phase
from services.runtime.files import sha256_file
from tests.support.harness import Fleet

IPC = "ipc-x86_64"
TARGET = "/opt/edgeswarm/firmware.img"
COPY = [sys.executable, "-c", "import pathlib,sys; pathlib.Path(sys.argv[2]).write_bytes(pathlib.Path(sys.argv[1]).read_bytes())",
        "{artifact}", "{target}"]

integration = pytest.mark.integration


def _device(fleet: Fleet, name: str, install_toml: str):  # noqa: ANN202
    if not fleet.home.history(IPC).releases:
        fleet.release(IPC, "1.0.0")
    device = fleet.add_device(name, IPC, extra_toml="[install]\n" + install_toml)
    fleet.watcher.wait(name, lambda s: s.phase == Phase.IDLE and s.last_sequence >= 1)
    return device


@integration
def test_an_ab_install_switches_slots_after_a_healthy_check(fleet: Fleet) -> None:
    device = _device(fleet, "ab-ok", 'allowed_handlers = ["ab"]\nhealth_command = ["true"]\n')
    v1 = device.installed_sha256()
    built = fleet.release_with(IPC, "2.0.0", InstallSpec(handler="ab", target=TARGET))
    state = fleet.watcher.wait("ab-ok", lambda s: s.phase == Phase.DONE, timeout=60)
    assert state.installed_version == "2.0.0" and device.installed_sha256() == built.manifest.artifact.sha256
    phases = [h.phase for h in fleet.watcher.history["ab-ok"]]
    assert Phase.CONFIRMING in phases
    target = device.spec.installed_file
    assert target.is_symlink() and os.readlink(target).endswith("slot-b")
    assert sha256_file(ABInstaller(target).slot("a")) == v1


@integration
def test_a_failed_health_check_rolls_back_to_the_other_slot_and_is_not_retried(fleet: Fleet) -> None:
    device = _device(fleet, "ab-sick", 'allowed_handlers = ["ab"]\nhealth_command = ["false"]\nconfirm_deadline = 2\n')
    v1 = device.installed_sha256()
    fleet.release_with(IPC, "2.0.0", InstallSpec(handler="ab", target=TARGET))
    state = fleet.watcher.wait("ab-sick", lambda s: s.phase == Phase.ROLLED_BACK, timeout=60)
    assert state.reason_code == "health_check_failed" and "exited with 1" in (state.reason or "")
    assert state.installed_version == "1.0.0" and device.installed_sha256() == v1
    assert os.readlink(device.spec.installed_file).endswith("slot-a")
    fleet.cli("fleet", "status", "--config", str(fleet.operator_config))  # time passes; nothing retries it
    time.sleep(2)
    assert fleet.watcher.states["ab-sick"].phase == Phase.ROLLED_BACK and device.installed_sha256() == v1


@integration
def test_a_restart_before_confirmation_rolls_back_then_tries_again(fleet: Fleet) -> None:
    device = _device(fleet, "ab-cut", 'allowed_handlers = ["ab"]\nhealth_command = ["sleep", "30"]\n'
                                      "health_timeout = 60\nconfirm_deadline = 120\n")
    v1 = device.installed_sha256()
    fleet.release_with(IPC, "2.0.0", InstallSpec(handler="ab", target=TARGET))
    fleet.watcher.wait("ab-cut", lambda s: s.phase == Phase.CONFIRMING, timeout=60)
    assert os.readlink(device.spec.installed_file).endswith("slot-b")
    device.process.kill()  # power cut while the new version is unconfirmed
    restarted = datetime.now(UTC)
    fleet.start_device("ab-cut")
    state = fleet.watcher.wait("ab-cut", lambda s: s.phase == Phase.ROLLED_BACK and s.timestamp > restarted, timeout=60)
    assert state.reason_code == "unconfirmed_restart" and state.installed_sha256 == v1 and state.retrying
    assert "retry 2 of 5" in (state.reason or ""), "max_attempts (limits, default 5) counts these too"
    # The cut says nothing against the release: it is installed again, and waits for its check again.
    again = fleet.watcher.wait("ab-cut", lambda s: s.phase == Phase.CONFIRMING and s.timestamp > state.timestamp, timeout=60)
    assert again.target_version == "2.0.0" and os.readlink(device.spec.installed_file).endswith("slot-b")


@integration
def test_the_command_handler_runs_the_signed_argv_and_its_rollback_on_failure(fleet: Fleet, tmp_path: Path) -> None:
    marker = tmp_path / "rolled-back"
    device = _device(fleet, "cmd", 'allowed_handlers = ["command"]\n')
    v1 = device.installed_sha256()
    failing = [sys.executable, "-c", "import sys; sys.exit(7)"]
    rollback = [sys.executable, "-c", f"open({str(marker)!r}, 'w').write('done')"]
    fleet.release_with(IPC, "2.0.0", InstallSpec(handler="command", target=TARGET, command=failing, rollback=rollback))
    state = fleet.watcher.wait("cmd", lambda s: s.phase == Phase.ROLLED_BACK, timeout=60)
    assert state.reason_code == "install_failed" and "exited with 7" in (state.reason or "")
    assert marker.read_text() == "done" and device.installed_sha256() == v1
    built = fleet.release_with(IPC, "3.0.0", InstallSpec(handler="command", target=TARGET, command=COPY))
    done = fleet.watcher.wait("cmd", lambda s: s.phase == Phase.DONE, timeout=60)
    assert done.installed_version == "3.0.0" and device.installed_sha256() == built.manifest.artifact.sha256


@integration
def test_a_handler_the_device_does_not_allow_is_refused(fleet: Fleet) -> None:
    device = _device(fleet, "strict", "")  # default: file and ab only
    v1 = device.installed_sha256()
    fleet.release_with(IPC, "2.0.0", InstallSpec(handler="command", target=TARGET, command=COPY))
    state = fleet.watcher.wait("strict", lambda s: s.reason_code == "handler_not_allowed", timeout=60)
    assert state.phase == Phase.REFUSED and state.installed_version == "1.0.0"
    assert device.installed_sha256() == v1
