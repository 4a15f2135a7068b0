"""The fleet service records every device's state and update attempts in SQLite (issue #6, part 1)."""

from __future__ import annotations

import json
import time

import pytest

from schemas.models import Phase
from tests.support.harness import Fleet, ServiceProcess

pytestmark = pytest.mark.integration
IPC = "ipc-x86_64"


def show(fleet: Fleet, device: str) -> dict:
    return json.loads(fleet.cli("fleet", "show", device, "--config", str(fleet.operator_config), "--json").stdout)


def show_when(fleet: Fleet, device: str, ready, timeout: float = 30.0) -> dict:  # noqa: ANN001
    """`fleet show --json` once `ready(record)` holds (the service records asynchronously)."""
    end = time.monotonic() + timeout
    while True:
        try:
            record = show(fleet, device)
            if ready(record):
                return record
        except AssertionError:
            pass  # the device has not been recorded yet
        if time.monotonic() > end:
            raise AssertionError(f"fleet show {device} did not reach the expected record in {timeout} s")
        time.sleep(0.3)


def test_attempts_are_recorded_and_survive_a_crash_of_the_fleet_service(fleet: Fleet) -> None:
    config = str(fleet.operator_config)
    service = ServiceProcess(["fleet", "serve", "--config", config], fleet.root / "fleet-service.log", fleet.root)
    fleet.processes.append(service)
    fleet.release(IPC, "1.0.0")
    fleet.add_device("tracked", IPC)
    fleet.watcher.wait("tracked", lambda s: s.phase == Phase.IDLE and s.last_sequence == 1)

    good = fleet.build_only(IPC, "2.0.0").manifest
    lying = good.model_copy(update={"deltas": {k: d.model_copy(update={"sha256": "0" * 64}) for k, d in good.deltas.items()}})
    fleet.vouch_and_publish(IPC, lying)
    fleet.watcher.wait("tracked", lambda s: s.reason_code == "hash_mismatch")
    fleet.vouch_and_publish(IPC, good.model_copy(update={"sequence": good.sequence + 1}))
    fleet.watcher.wait("tracked", lambda s: s.phase == Phase.DONE)

    record = show_when(fleet, "tracked", lambda r: len(r["attempts"]) == 2 and r["attempts"][1]["outcome"])
    refused, done = record["attempts"]
    assert (refused["target_version"], refused["outcome"]) == ("2.0.0", "refused") and "sha256" in refused["reason"]
    assert (done["target_version"], done["outcome"], done["used_delta"]) == ("2.0.0", "done", True)
    # The delta's blocks were already in the device's blockstore from the refused attempt: none moved
    # again. The byte meter (ss) counts every byte on the connection, so a Bitswap message or a ping
    # may show (190 bytes once on a loaded machine); a block of the delta again would be kilobytes.
    # It only proves anything if it counted the first attempt's bytes.
    delta_size = min(d.size for d in good.deltas.values())
    assert refused["bytes_from_origin"] >= delta_size > 16 * 1024, "the byte meter must have counted the delta"
    assert done["bytes_from_origin"] < 4096 and done["millis"] > 0
    assert record["device"]["installed_version"] == "2.0.0" and record["device"]["online"] is True
    assert record["device"]["last_error"].startswith("hash_mismatch")

    service.proc.kill()  # crash: SQLite must keep what was committed
    service.proc.wait()
    fleet.devices["tracked"].process.stop()
    fleet.watcher.wait_online("tracked", b"offline")
    restarted = ServiceProcess(["fleet", "serve", "--config", config], fleet.root / "fleet-service.log", fleet.root)
    fleet.processes.append(restarted)
    after = show_when(fleet, "tracked", lambda r: r["device"]["online"] is False)
    assert [a["outcome"] for a in after["attempts"]] == ["refused", "done"]
    assert after["device"]["installed_version"] == "2.0.0"
