"""The agent runs its embedded node with `[content] go_gc_percent` as Go's GOGC.

Go reads GOGC once, from the environment the process started with, so the agent starts itself
again (exec: the same PID and arguments) when its environment lacks it; an operator's own GOGC
wins. What it saves under a refused gossip flood is measured by benchmarks/flood_bench.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from schemas.models import Phase
from tests.support.harness import Fleet

pytestmark = pytest.mark.integration

CLASS = "ipc-x86_64"


def environment(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def command_line(pid: int) -> list[str]:
    return [part.decode() for part in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if part]


def test_the_agent_starts_its_node_with_the_configured_gogc_unless_its_environment_names_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GOGC", raising=False)
    fleet = Fleet(tmp_path)
    try:
        fleet.start()
        fleet.release(CLASS, "1.0.0")
        fleet.add_device("d-default", CLASS)
        fleet.add_device("d-tuned", CLASS, content_settings=(("go_gc_percent", "40"),))
        operator = fleet.add_device("d-operator", CLASS, start=False)
        operator.process.env = {"GOGC": "80"}
        fleet.start_device("d-operator")
        for device in ("d-default", "d-tuned", "d-operator"):
            fleet.watcher.wait(device, lambda s: s.phase == Phase.IDLE and s.last_sequence == 1, timeout=60)
        for device, gogc in (("d-default", "25"), ("d-tuned", "40"), ("d-operator", "80")):
            pid = fleet.devices[device].process.pid
            assert pid is not None and fleet.devices[device].process.alive()
            assert environment(pid).get("GOGC") == gogc, device
            # The same process, run again with the same arguments: its parent still owns it.
            assert command_line(pid)[-4:] == ["device", "run", "--config", str(fleet.devices[device].process.config)]
            assert os.getpgid(pid) == pid  # (its own session, as started: stopping it by PID still works)
        # Settings are checked before anything runs: a value out of range is refused.
        bad = fleet.add_device("d-bad", CLASS, content_settings=(("go_gc_percent", "0"),))
        assert bad.process.proc is not None and bad.process.proc.wait(timeout=30) != 0
        assert "go_gc_percent" in fleet.log("d-bad")
    finally:
        fleet.stop()
