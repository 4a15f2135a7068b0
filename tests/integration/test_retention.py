"""What a device keeps serving to its peers: the pure rule, the blockstore sweep on a real Kubo
repo, and two device agents letting go of old releases (issue #7, swarming)."""

from __future__ import annotations

import json

import pytest

from services.runtime.content import _blockstore as blockstore
from tests.support.harness import Fleet
from tests.integration.test_end_to_end import IPC, idle_on, on_version

@pytest.mark.integration
def test_devices_serve_the_releases_they_keep_and_sweep_the_rest(fleet: Fleet) -> None:
    fleet.release(IPC, "1.0.0")
    fleet.add_device("keep-one", IPC, content_settings=(("keep_releases", "1"),))
    fleet.add_device("tiny-disk", IPC, content_settings=(("disk_budget_mb", "0.001"),))
    for name in ("keep-one", "tiny-disk"):
        fleet.watcher.wait(name, idle_on("1.0.0"))

    fleet.release(IPC, "2.0.0")
    for name in ("keep-one", "tiny-disk"):
        fleet.watcher.wait(name, on_version("2.0.0"))
    keep_one = fleet.devices["keep-one"].spec.state_dir
    held_v2 = json.loads((keep_one / "held.json").read_text())["releases"]
    assert [r["version"] for r in held_v2] == ["2.0.0"]
    v2_blocks = blockstore.local_dag(keep_one / "ipfs" / "blocks", held_v2[0]["cids"])
    assert sum(v2_blocks.values()) >= held_v2[0]["size"], "the installed release is kept whole"

    tiny = fleet.devices["tiny-disk"].spec.state_dir
    assert json.loads((tiny / "held.json").read_text())["releases"] == [], "bigger than the budget: not kept"
    assert "no longer serving 2.0.0" in fleet.log("tiny-disk")

    fleet.release(IPC, "3.0.0")
    fleet.watcher.wait("keep-one", on_version("3.0.0"))
    held_v3 = json.loads((keep_one / "held.json").read_text())["releases"]
    assert [r["version"] for r in held_v3] == ["3.0.0"]
    v3_blocks = blockstore.local_dag(keep_one / "ipfs" / "blocks", held_v3[0]["cids"])
    assert sum(v3_blocks.values()) >= held_v3[0]["size"]
    gone = set(v2_blocks) - set(v3_blocks)
    assert gone and all(not blockstore.block_path(keep_one / "ipfs" / "blocks", mh).exists() for mh in gone)
    assert "no longer serving 2.0.0" in fleet.log("keep-one")
