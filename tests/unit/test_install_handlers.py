"""Install handlers (file, ab, command), health checks and rollback (issue #8, item 4)."""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import sys
import threading
from pathlib import Path

import pydantic
import pytest

from device_client.health import wait_healthy
from device_client.installer import ABInstaller, CommandInstaller, InstallError
from schemas.models import InstallSpec
from services.runtime.settings import InstallSettings

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
    for _ in range(2):  # an undo, not a flip: running it again changes nothing
        ab.rollback("a", hashlib.sha256(b"v1").hexdigest())
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
