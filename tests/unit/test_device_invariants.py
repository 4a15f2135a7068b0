"""The fault harness's judge (tests/support/device_invariants.py) and its reading of a cut agent's
event log (tests/support/power_chaos.py): each kind of damage is caught, and a sound device passes."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from schemas.models import DeviceState, Phase
from tests.support.device_invariants import Evidence, Floors, group_members, leftovers, problems, read_floors
from tests.support.power_chaos import REPORT_WIDTH, landed, listing_from

V1, V2, OTHER = "1" * 64, "2" * 64, "9" * 64
SIGNED = {V1: "1.0.0", V2: "2.0.0"}
FLOORS = Floors(root_version=2, timestamp_version=5)


def report(version: str, sha: str) -> DeviceState:
    return DeviceState(device="d", fleet="f", device_class="c", installed_version=version, installed_sha256=sha,
                       phase=Phase.DONE, timestamp=datetime.now(UTC))


def sound(sha: str = V2, version: str = "2.0.0") -> Evidence:
    return Evidence(active_sha256=sha, persisted={"installed_sha256": sha, "installed_version": version},
                    reported=report(version, sha), floors=FLOORS)


@pytest.mark.parametrize(("sha", "version"), [(V1, "1.0.0"), (V2, "2.0.0")])
def test_a_device_on_either_signed_version_that_says_so_passes(sha: str, version: str) -> None:
    verdict = problems(sound(sha, version), SIGNED, FLOORS)
    assert verdict == replace(verdict, bricked=False, mixed=False, version=version, problems=())


def test_bytes_of_no_signed_version_are_a_mix_and_a_brick() -> None:
    verdict = problems(replace(sound(), active_sha256=OTHER), SIGNED, FLOORS)
    assert verdict.bricked and verdict.mixed and verdict.version is None
    assert any("no signed version" in p for p in verdict.problems)


def test_a_missing_target_is_a_brick_but_not_a_mix_of_bytes() -> None:
    verdict = problems(replace(sound(), active_sha256=None), SIGNED, FLOORS)
    assert verdict.bricked and any("missing" in p for p in verdict.problems)


@pytest.mark.parametrize("where", ["persisted", "reported"])
def test_saying_another_version_than_the_one_running_is_mixed(where: str) -> None:
    evidence = sound()
    if where == "persisted":
        evidence.persisted = {"installed_sha256": V1, "installed_version": "1.0.0"}
    else:
        evidence.reported = report("1.0.0", V1)
    verdict = problems(evidence, SIGNED, FLOORS)
    assert verdict.mixed and not verdict.bricked and len(verdict.problems) == 1


def test_unreadable_state_and_no_report_are_problems() -> None:
    verdict = problems(replace(sound(), persisted=None, reported=None), SIGNED, FLOORS)
    assert verdict.mixed and {"state.json is missing or unreadable", "no report"} <= set(verdict.problems)


@pytest.mark.parametrize("floors", [Floors(1, 5), Floors(2, 4)])
def test_a_trust_floor_that_fell_is_caught_and_one_that_rose_is_not(floors: Floors) -> None:
    assert len(problems(replace(sound(), floors=floors), SIGNED, FLOORS).problems) == 1
    assert problems(replace(sound(), floors=Floors(3, 9)), SIGNED, FLOORS).problems == ()


def test_leftovers_and_surviving_processes_are_problems() -> None:
    verdict = problems(replace(sound(), leftovers=["state/.state.json.tmp"], stray_pids=[123]), SIGNED, FLOORS)
    assert not verdict.bricked and len(verdict.problems) == 2


def test_leftovers_lists_temporaries_journals_downloads_and_strangers_but_not_kept_files(tmp_path: Path) -> None:
    state, install = tmp_path / "state", tmp_path / "opt"
    (state / "downloads").mkdir(parents=True)
    install.mkdir()
    for name in ("state.json", "root.json", ".state.json.tmp", "switch.json", "held.json.damaged"):
        (state / name).write_text("{}")
    (state / "downloads" / "abc.delta").write_text("x")
    for name in ("firmware.img", "firmware.img.previous", ".firmware.img.staged", "firmware.img.esdjournal"):
        (install / name).write_text("x")
    found = leftovers(state, install, install / "firmware.img", {"firmware.img.previous"})
    assert found == ["install/.firmware.img.staged", "install/firmware.img.esdjournal", "state/.state.json.tmp",
                     "state/downloads/abc.delta", "state/held.json.damaged", "state/switch.json"]


def envelope(version: int) -> bytes:
    return json.dumps({"payload": base64.b64encode(json.dumps({"version": version}).encode()).decode()}).encode()


def test_floors_come_from_the_persisted_root_else_the_provisioned_one(tmp_path: Path) -> None:
    provisioned = tmp_path / "provisioned-root.json"
    provisioned.write_bytes(envelope(1))
    state = tmp_path / "state"
    state.mkdir()
    assert read_floors(state, provisioned) == Floors(1, 0)
    (state / "root.json").write_bytes(envelope(3))
    (state / "state.json").write_text(json.dumps({"timestamp_version": 7}))
    assert read_floors(state, provisioned) == Floors(3, 7)
    (state / "root.json").write_bytes(b"torn")  # never renamed into place by the agent; if it were, the floor shows it
    assert read_floors(state, provisioned) == Floors(1, 7)


def test_group_members_finds_a_live_group_and_nothing_once_it_is_gone() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    try:
        assert group_members(child.pid) == [child.pid]
    finally:
        child.kill()
        child.wait()
    assert group_members(child.pid) == []


def events(*phases: str | None, cut: str | None = None) -> list[dict]:
    found = [{"t": float(i), "file": "state.json" if p else "held.json", "phase": p} for i, p in enumerate(phases)]
    return found + ([{"t": 99.0, "cut": cut}] if cut else [])


def test_a_listing_gives_each_phase_its_width_and_counts_writes() -> None:
    listing = listing_from(events("settled", "downloading", "downloading", "verifying", None, "installing",
                                  "confirming", "settled"))
    assert listing.widths == {"settled": 1.0, "downloading": 2.0, "verifying": 2.0, "installing": 1.0,
                              "confirming": 1.0, "reporting": REPORT_WIDTH}
    assert listing.writes == {"state.json": 7, "held.json": 1}


def test_landed_names_the_last_persisted_phase_or_the_write_cut() -> None:
    assert landed(events("settled", cut="0.1 s into downloading")) == "settled"
    assert landed(events("settled", "downloading", "verifying", cut="0.2 s into downloading")) == "verifying"
    assert landed(events("settled", "installing", "settled", cut="0.01 s into reporting")) == "reporting"
    assert landed(events("settled", cut="root.json write 1 torn at 3 of 900 bytes")).startswith("root.json")
    assert landed(events("settled")) == "no cut"
