"""How often the generated Mosquitto config saves the broker's database: after every change for small
fleets (a crash loses nothing), every few seconds for large ones (a save rewrites every session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.operator.mosquitto import (
    CENTRAL_QUEUED_MESSAGES,
    BrokerPlan,
    DevicePrincipal,
    autosave_policy,
    load_plan,
    queued_messages,
    write_config,
)


def _plan(tmp_path: Path, devices: int, autosave: int | None = None) -> BrokerPlan:
    return BrokerPlan(fleet="f1", directory=tmp_path / "broker", tls=False, autosave_seconds=autosave,
                      devices=[DevicePrincipal(f"d{i}", "ipc") for i in range(devices)])


@pytest.mark.parametrize(("devices", "seconds"), [(0, 0), (1, 0), (100, 0), (101, 1), (2000, 1), (2001, 2),
                                                  (10_000, 5), (100_000, 50)])
def test_saves_are_per_change_up_to_a_hundred_devices_then_spaced_by_fleet_size(
        tmp_path: Path, devices: int, seconds: int) -> None:
    assert autosave_policy(_plan(tmp_path, devices)) == seconds


def test_the_config_says_the_policy_and_an_explicit_setting_wins_and_is_kept(tmp_path: Path) -> None:
    write_config(_plan(tmp_path, 3))
    conf = (tmp_path / "broker" / "mosquitto.conf").read_text().splitlines()
    assert "autosave_on_changes true" in conf and "autosave_interval 1" in conf

    write_config(_plan(tmp_path, 3, autosave=7))
    conf = (tmp_path / "broker" / "mosquitto.conf").read_text().splitlines()
    assert "autosave_on_changes false" in conf and "autosave_interval 7" in conf
    assert "autosave_on_changes true" not in conf
    assert load_plan(tmp_path / "broker").autosave_seconds == 7

    write_config(_plan(tmp_path, 3, autosave=0))
    assert "autosave_on_changes true" in (tmp_path / "broker" / "mosquitto.conf").read_text().splitlines()


def test_a_central_broker_with_bridged_sites_saves_every_second_and_queues_for_a_large_fleet(tmp_path: Path) -> None:
    """Its plan lists none of the sites' devices, but it carries all their reports to the fleet service."""
    plan = _plan(tmp_path, 0)
    assert queued_messages(plan) == 1000
    plan.bridge_sites = ["plant-7"]
    assert autosave_policy(plan) == 1
    assert queued_messages(plan) == CENTRAL_QUEUED_MESSAGES


@pytest.mark.parametrize(("devices", "queued"), [(0, 1000), (100, 1000), (101, 1010), (10_000, 100_000)])
def test_the_fleet_service_may_have_ten_reports_per_device_queued(tmp_path: Path, devices: int, queued: int) -> None:
    assert queued_messages(_plan(tmp_path, devices)) == queued
