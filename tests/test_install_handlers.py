"""Install handlers (file, ab, command), health checks and rollback (issue #8, item 4)."""

from __future__ import annotations

import asyncio
import http.server
import os
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pydantic
import pytest

from device_client.health import wait_healthy
from device_client.installer import ABInstaller, CommandInstaller, InstallError
from schemas.models import InstallSpec, Phase
from services.files import sha256_file
from services.settings import InstallSettings
from tests.harness import Fleet

IPC = "ipc-x86_64"
TARGET = "/opt/edgeswarm/firmware.img"
COPY = [sys.executable, "-c", "import pathlib,sys; pathlib.Path(sys.argv[2]).write_bytes(pathlib.Path(sys.argv[1]).read_bytes())",
        "{artifact}", "{target}"]


# -- handlers on their own --------------------------------------------------------------------------


def test_ab_writes_the_inactive_slot_and_switches_with_one_rename(tmp_path: Path) -> None:
    target = tmp_path / "firmware.img"
    target.write_bytes(b"v1")
    ab = ABInstaller(target)
    (tmp_path / "v2").write_bytes(b"v2")
    ab.install(tmp_path / "v2")
    assert target.is_symlink() and ab.active() == "b" and target.read_bytes() == b"v2"
    assert ab.slot("a").read_bytes() == b"v1", "the old version stays in its slot"
    ab.rollback()
    assert ab.active() == "a" and target.read_bytes() == b"v1"
    (tmp_path / "v3").write_bytes(b"v3")
    ab.install(tmp_path / "v3")
    assert ab.active() == "b" and target.read_bytes() == b"v3" and ab.slot("a").read_bytes() == b"v1"


def test_the_command_handler_never_uses_a_shell(tmp_path: Path) -> None:
    target, canary = tmp_path / "installed", tmp_path / "pwned"
    hostile = f"$(touch {canary}); `touch {canary}` && touch {canary}"
    echo = [sys.executable, "-c", "import pathlib,sys; pathlib.Path(sys.argv[2]).write_text(sys.argv[1])", hostile, "{target}"]
    spec = InstallSpec(handler="command", target=str(target), command=echo)
    CommandInstaller(target, spec, 30).install(tmp_path / "artifact")
    assert not canary.exists()
    assert target.read_text() == hostile  # one literal argument, never interpreted


def test_a_failing_command_reports_its_exit_code(tmp_path: Path) -> None:
    spec = InstallSpec(handler="command", target="/x", command=[sys.executable, "-c", "import sys; sys.exit(3)"])
    with pytest.raises(InstallError, match="exited with 3"):
        CommandInstaller(tmp_path / "x", spec, 30).install(tmp_path)


@pytest.mark.parametrize(
    "fields",
    [{"handler": "command"}, {"handler": "file", "command": ["x"]}, {"handler": "ab", "rollback": ["x"]}, {"handler": "shell"}],
    ids=["command-without-argv", "argv-for-file", "rollback-for-ab", "unknown-handler"],
)
def test_install_specs_are_validated(fields: dict) -> None:
    with pytest.raises(pydantic.ValidationError):
        InstallSpec(target="/x", **fields)


def test_health_checks_pass_on_2xx_and_fail_by_the_deadline() -> None:
    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200 if self.path == "/healthy" else 503)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert asyncio.run(wait_healthy(InstallSettings(health_url=f"{base}/healthy")))[0]
        ok, why = asyncio.run(wait_healthy(InstallSettings(health_url=f"{base}/sick", confirm_deadline=2)))
        assert not ok and "503" in why
        ok, why = asyncio.run(wait_healthy(InstallSettings(health_command=["false"], confirm_deadline=2)))
        assert not ok and "exited with 1" in why
    finally:
        server.shutdown()


# -- with a real device -------------------------------------------------------------------------------

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
def test_a_restart_before_confirmation_rolls_back(fleet: Fleet) -> None:
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
    assert state.reason_code == "unconfirmed_restart" and state.installed_version == "1.0.0"
    assert device.installed_sha256() == v1 and os.readlink(device.spec.installed_file).endswith("slot-a")


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
    fleet.release_with(IPC, "2.0.0", InstallSpec(handler="command", target=TARGET, command=COPY))
    state = fleet.watcher.wait("strict", lambda s: s.reason_code == "handler_not_allowed", timeout=60)
    assert state.phase == Phase.REFUSED and state.installed_version == "1.0.0"
    assert device.installed_sha256() != fleet.home.history(IPC).releases[-1].sha256
