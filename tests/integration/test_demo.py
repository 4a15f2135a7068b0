"""`edgeswarm demo` as a user runs it: exit code, JSON contract, and clean-up on Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.runtime.files import sha256_file
from services.demo.sample_images import build_image

pytestmark = pytest.mark.integration
ENV = {**os.environ, "COLUMNS": "400"}


@pytest.mark.timeout(700)  # the demo's own deadline is 600 s
def test_demo_updates_every_device_to_v2_and_prints_json(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "demo", "--devices", "4", "--json"],
        capture_output=True, text=True, timeout=600, env=ENV, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    expected = {c: sha256_file(build_image(c, "2.0.0", tmp_path / f"{c}.img")) for c in ("ipc-x86_64", "gateway-armv7")}
    assert summary["ok"] is True
    assert len(summary["devices"]) == 4
    assert {d["class"] for d in summary["devices"]} == set(expected)
    for device in summary["devices"]:
        assert device["version"] == "2.0.0"
        assert device["sha256"] == expected[device["class"]]
        assert device["seconds"] is not None and device["seconds"] > 0
        assert device["bytes_from_origin"] + device["bytes_from_peers"] > 0
    assert 0 < summary["delta_bytes"] < summary["artifact_bytes"]
    # Deltas, not full images, crossed the origin's uplink.
    assert 0 < summary["origin_egress_bytes"] < summary["artifact_bytes"]


@pytest.mark.timeout(700)
def test_demo_island_devices_update_and_report_through_their_peers(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "demo", "--devices", "4", "--island", "2", "--json"],
        capture_output=True, text=True, timeout=600, env=ENV, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    expected = {c: sha256_file(build_image(c, "2.0.0", tmp_path / f"{c}.img")) for c in ("ipc-x86_64", "gateway-armv7")}
    assert summary["ok"] is True and len(summary["devices"]) == 4
    island = [d for d in summary["devices"] if d["island"]]
    connected = {d["device"] for d in summary["devices"] if not d["island"]}
    assert len(island) == 2, summary["devices"]
    for device in island:
        assert device["version"] == "2.0.0" and device["sha256"] == expected[device["class"]]
        # Its report of 2.0.0 reached the fleet service through a connected neighbour, signed.
        assert device["heard"] in {f"relayed by {name}" for name in connected}, device
    assert {d["heard"] for d in summary["devices"] if not d["island"]} == {"direct"}


def test_demo_refuses_an_island_with_no_way_out() -> None:
    result = subprocess.run([sys.executable, "-m", "services.cli", "demo", "--devices", "3", "--island", "3"],
                            capture_output=True, text=True, timeout=60, env=ENV, stdin=subprocess.DEVNULL)
    assert result.returncode != 0 and "leaves no device that reaches the broker" in result.stderr


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def _sigint_as_in_a_terminal() -> None:
    """A shell starts background commands with SIGINT ignored and children inherit that, so the tests
    run as `.ci/run &` would send a Ctrl-C the demo never sees (it then finished with 0). A user at a
    terminal has SIGINT at its default: give the demo that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_demo_until_agents_run() -> tuple[subprocess.Popen[str], list[int], Path | None, str]:
    """Start `edgeswarm demo --devices 2`; return it once it has printed its agents' PIDs."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "demo", "--devices", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, stdin=subprocess.DEVNULL,
        preexec_fn=_sigint_as_in_a_terminal,
    )
    output = ""
    pids: list[int] = []
    workdir = None
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    while not pids and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        output += line
        if match := re.search(r"work directory (\S+)", line):
            workdir = Path(match.group(1))
        if match := re.search(r"PIDs ([\d, ]+)\)", line):
            pids = [int(p) for p in match.group(1).split(",")]
    return proc, pids, workdir, output


@pytest.mark.parametrize(("signum", "times", "code"), [
    (signal.SIGINT, 1, 130), (signal.SIGINT, 2, 130), (signal.SIGTERM, 1, 128 + signal.SIGTERM),
], ids=["ctrl-c", "ctrl-c-twice", "sigterm"])
def test_ctrl_c_stops_every_device_and_removes_the_work_directory(signum: int, times: int, code: int) -> None:
    """A second Ctrl-C (an impatient user) used to cut the clean-up short: the demo exited at once,
    said all was stopped, and left its agents running and its keys in /tmp. SIGTERM (`timeout`,
    `kill`) left them too. Checked the moment the demo exits, not after the agents' own parent
    watchdog would have stopped them. The signal comes while the devices still start up (seconds)."""
    proc, pids, workdir, output = start_demo_until_agents_run()
    try:
        assert pids and workdir is not None, output
        assert all(_alive(pid) for pid in pids)
        time.sleep(0.5)
        for _ in range(times):
            proc.send_signal(signum)
            time.sleep(0.3)
        rest, _ = proc.communicate(timeout=60)
        output += rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, output
    assert not any(_alive(pid) for pid in pids), f"device agents left running: {pids}\n{output}"
    assert not workdir.exists(), f"{workdir} left behind"
    assert f"stopping {len(pids)} device agents" in output and f"stopped {len(pids)} device agents" in output, output


def test_an_agent_that_cannot_start_fails_the_demo_at_once_with_its_reason() -> None:
    """Agents read EDGESWARM_* settings from the environment on top of their file; a bad one stops
    each agent at start. The demo used to wait for them until its timeout (minutes), silently."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "demo", "--devices", "2"],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
        env={**ENV, "EDGESWARM_INSTALL_TARGET": "relative/path"},
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert time.monotonic() - started < 60
    assert "exited with code 2 before the fleet finished" in result.stderr, result.stderr
    assert "install_target: String should match pattern" in result.stderr, result.stderr
    workdir = Path(re.search(r"work directory (\S+)", result.stdout + result.stderr).group(1))  # type: ignore[union-attr]
    assert not workdir.exists()


def test_agents_stop_by_themselves_when_the_demo_is_killed_outright() -> None:
    proc, pids, workdir, output = start_demo_until_agents_run()
    try:
        assert pids, output
        proc.kill()  # SIGKILL: the demo's own clean-up cannot run
        proc.wait()
        end = time.monotonic() + 20
        while any(_alive(pid) for pid in pids) and time.monotonic() < end:
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in pids), f"orphaned agents still running: {pids}"
    finally:
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
        if workdir is not None:  # this demo's own directory only: another run's demo may be going on
            shutil.rmtree(workdir, ignore_errors=True)
