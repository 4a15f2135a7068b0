"""What must hold on a device after any fault, checked in one place (issue 15).

`gather` reads the evidence from a device's disk and its last report; `problems` is pure: it
judges the evidence against the signed versions and the trust floors seen before the fault, so it
can be tested against every kind of damage without running anything.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from schemas.models import DeviceState
from services.runtime.files import sha256_file


@dataclass(frozen=True)
class Floors:
    """The trust floors a device keeps: they may rise, never fall."""

    root_version: int
    timestamp_version: int


@dataclass
class Evidence:
    active_sha256: str | None  # the bytes the device would boot (through the A/B link); None: missing
    persisted: dict | None  # state.json, or None when it is missing or unreadable
    reported: DeviceState | None  # the last retained report
    floors: Floors
    leftovers: list[str] = field(default_factory=list)  # temporary or half-done files where none should be
    stray_pids: list[int] = field(default_factory=list)  # processes of the stopped agent still alive


@dataclass(frozen=True)
class Verdict:
    bricked: bool  # boots nothing verified
    mixed: bool  # bytes of no signed version, or the device says another version than it runs
    version: str | None  # the signed version it runs
    problems: tuple[str, ...]


def problems(evidence: Evidence, signed: dict[str, str], before: Floors) -> Verdict:
    """Judge `evidence`; `signed` maps each signed installed sha256 to its version."""
    found: list[str] = []
    version = signed.get(evidence.active_sha256 or "")
    bricked = version is None
    if evidence.active_sha256 is None:
        found.append("the install target is missing: nothing to boot")
    elif version is None:
        found.append(f"the active bytes ({evidence.active_sha256[:12]}) are no signed version: a mix")
    disagree = False
    local = evidence.persisted
    if local is None:
        found.append("state.json is missing or unreadable")
        disagree = True
    elif local.get("installed_sha256") != evidence.active_sha256 or local.get("installed_version") != version:
        found.append(f"state.json says {local.get('installed_version')} while the device runs {version}")
        disagree = True
    report = evidence.reported
    if report is None:
        found.append("no report")
    elif report.installed_sha256 != evidence.active_sha256 or report.installed_version != version:
        found.append(f"reports {report.installed_version} while the device runs {version}")
        disagree = True
    if evidence.floors.root_version < before.root_version:
        found.append(f"root version fell from {before.root_version} to {evidence.floors.root_version}")
    if evidence.floors.timestamp_version < before.timestamp_version:
        found.append(f"timestamp floor fell from {before.timestamp_version} to {evidence.floors.timestamp_version}")
    found += [f"left behind: {name}" for name in evidence.leftovers]
    found += [f"process {pid} of the stopped agent still runs" for pid in evidence.stray_pids]
    return Verdict(bricked=bricked, mixed=(version is None and evidence.active_sha256 is not None) or disagree,
                   version=version, problems=tuple(found))


def envelope_version(raw: bytes) -> int:
    return int(json.loads(base64.b64decode(json.loads(raw)["payload"]))["version"])


def read_floors(state_dir: Path, provisioned_root: Path) -> Floors:
    """The floors as persisted: root.json (else the provisioned root) and state.json's timestamp floor."""
    root = state_dir / "root.json"
    try:
        root_version = envelope_version(root.read_bytes())
    except (OSError, ValueError, KeyError):
        root_version = envelope_version(provisioned_root.read_bytes())
    try:
        timestamp_version = int(json.loads((state_dir / "state.json").read_bytes())["timestamp_version"])
    except (OSError, ValueError, KeyError):
        timestamp_version = 0
    return Floors(root_version, timestamp_version)


def leftovers(state_dir: Path, install_dir: Path, target: Path, kept: set[str]) -> list[str]:
    """Files that should not outlive a settled device: temporaries, a switch or patch journal, damaged
    state set aside, downloads. `kept` names the install directory's legitimate files (the target, its
    previous version or slots, a command's backup)."""
    found = [f"state/{p.name}" for p in state_dir.iterdir()
             if p.name.endswith((".tmp", ".damaged")) or p.name == "switch.json"]
    downloads = state_dir / "downloads"
    if downloads.is_dir():
        found += [f"state/downloads/{p.name}" for p in downloads.iterdir()]
    found += [f"install/{p.name}" for p in install_dir.iterdir() if p.name not in kept | {target.name}]
    return sorted(found)


def active_sha256(target: Path) -> str | None:
    try:
        return sha256_file(target)
    except OSError:
        return None


def group_members(pgid: int) -> list[int]:
    """Live processes of a process group (the agent runs in its own session)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry))
    return members
