"""The fleet record in PostgreSQL (issue #19): the same record as SQLite, one active fleet service per
record, and a standby that takes over a running rollout when the active one dies.

Every test runs against a real PostgreSQL server (Debian's), started and stopped here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.models import DeviceState, Phase
from services.operator.fleet_store import FleetStore, OnlineSeen
from services.operator.record_database import RecordUnavailable
from tests.integration.test_rollout_service import IPC, add_devices, release_staged, rollout, start_service, status_when
from tests.support.harness import Fleet, ServiceProcess
from tests.support.postgres import PostgresServer, binaries

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(binaries() is None, reason="PostgreSQL is not installed (.ci/run installs it)")]


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        yield server.start()
    finally:
        server.stop()


def empty(server: PostgresServer) -> None:
    with psycopg.connect(server.url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS devices, attempts, rollouts")


T0 = datetime(2026, 1, 1, tzinfo=UTC)
PHASES = ["idle", "downloading", "installing", "done", "failed", "refused", "rolled_back"]


@settings(max_examples=25, deadline=None)
@given(reports=st.lists(st.tuples(st.sampled_from(["d1", "d2", "d3"]), st.integers(0, 6), st.sampled_from(PHASES),
                                  st.booleans(), st.sampled_from([None, True, False])), max_size=25),
       retired=st.sets(st.sampled_from(["d1", "d2"])))
def test_postgresql_keeps_the_same_record_as_sqlite(tmp_path_factory: pytest.TempPathFactory, postgres: PostgresServer,
                                                    reports: list[tuple[str, int, str, bool, bool | None]],
                                                    retired: set[str]) -> None:
    empty(postgres)
    updates: list[DeviceState | OnlineSeen] = []
    for device, seconds, phase, online, delta in reports:
        ended = phase in ("done", "failed", "refused", "rolled_back")
        updates.append(DeviceState(
            device=device, fleet="f1", device_class="ipc", installed_version="1.0.0", installed_sha256="1" * 64,
            phase=Phase(phase), timestamp=T0 + timedelta(seconds=seconds),
            target_version=None if phase == "idle" else "2.0.0", reason="it's 100% \"broken\"?" if ended else None,
            reason_code="install_failed" if ended else None, used_delta=delta if ended else None,
            bytes_from_origin=5 * 2**30 if ended else 0, update_millis=1234 if ended else None))
        updates.append(OnlineSeen(device, online, T0 + timedelta(seconds=seconds)))
    lite = FleetStore.sqlite(tmp_path_factory.mktemp("lite") / "fleet.sqlite")
    pg = FleetStore.postgres(postgres.url)
    try:
        assert pg.record(updates[: len(updates) // 2]) + pg.record(updates[len(updates) // 2:]) == lite.record(updates)
        for device in sorted(retired):
            assert pg.retire(device) == lite.retire(device)
        pg.save_rollout("ipc", '{"state": "running"}')
        lite.save_rollout("ipc", '{"state": "running"}')
        assert pg.devices() == lite.devices()
        assert pg.status_lines() == lite.status_lines()
        assert pg.reports_json() == lite.reports_json()
        assert pg.rollouts() == lite.rollouts()
        for device in ("d1", "d2", "d3"):
            assert pg.attempts(device) == lite.attempts(device)
            assert pg.device(device) == lite.device(device)
    finally:
        lite.close()
        pg.close()


HOLDER = textwrap.dedent("""
    import sys, time
    from services.operator.fleet_store import FleetStore
    store = FleetStore.postgres(sys.argv[1]) if sys.argv[1].startswith("postgres") else FleetStore.sqlite(__import__("pathlib").Path(sys.argv[1]))
    assert store.try_lead("f1")
    print("leading", flush=True)
    time.sleep(600)
""")


def hold_lead(where: str) -> subprocess.Popen[str]:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, where], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).parents[2])
    assert holder.stdout is not None and holder.stdout.readline().strip() == "leading"
    return holder


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_one_service_leads_a_record_and_the_lock_passes_when_it_dies(tmp_path: Path, postgres: PostgresServer,
                                                                      backend: str) -> None:
    where = postgres.url if backend == "postgres" else str(tmp_path / "fleet.sqlite")

    def open_store() -> FleetStore:
        return FleetStore.postgres(where) if backend == "postgres" else FleetStore.sqlite(Path(where))

    holder = hold_lead(where)
    standby, other = open_store(), open_store()
    try:
        assert not standby.try_lead("f1") and not other.try_lead("f1")
        assert standby.try_lead("another-fleet")  # the lock is per fleet
        assert not standby.try_lead("f1")
        holder.send_signal(signal.SIGKILL)  # a power cut: nothing is released by the holder itself
        holder.wait()
        end = time.monotonic() + 10
        while not standby.try_lead("f1"):
            assert time.monotonic() < end, "the lock of a killed service was not released"
            time.sleep(0.05)
        assert not other.try_lead("f1")  # exactly one takes over
        standby.check_leading()
        standby.close()
        end = time.monotonic() + 10
        while not other.try_lead("f1"):  # a clean stop releases it too
            assert time.monotonic() < end
            time.sleep(0.05)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        other.close()


def test_a_service_whose_session_ends_stops_leading_and_cannot_write(postgres: PostgresServer) -> None:
    empty(postgres)
    active = FleetStore.postgres(postgres.url)
    assert active.try_lead("f1")
    with psycopg.connect(postgres.url, autocommit=True) as admin:  # the database ends the active's session
        ended = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory'").fetchall()
        assert ended == [(True,)]
    with pytest.raises(RecordUnavailable, match="lost the fleet record"):
        active.check_leading()
    with pytest.raises(RecordUnavailable):
        active.save_rollout("ipc", "{}")  # no write behind the back of the service that took over
    successor = FleetStore.postgres(postgres.url)
    assert successor.try_lead("f1")
    assert successor.rollouts() == {}
    active.close()
    successor.close()


def test_an_unreachable_database_is_one_clear_error(tmp_path: Path) -> None:
    url = f"postgresql://nobody@/edgeswarm?host={tmp_path}&port=9"
    with pytest.raises(RecordUnavailable, match="cannot be opened") as raised:
        FleetStore.postgres(url.replace("nobody@", "nobody:hunter2@"))
    assert "hunter2" not in str(raised.value)
    config = tmp_path / "operator.toml"
    config.write_text(f'fleet = "f1"\nhome = "{tmp_path / "home"}"\n[record]\ndatabase = "{url}"\n')
    shown = subprocess.run([sys.executable, "-m", "services.cli", "fleet", "status", "--from", "record",
                            "--config", str(config)], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert shown.returncode == 1 and "cannot be opened" in shown.stderr and "Traceback" not in shown.stderr
    config.write_text('fleet = "f1"\n[record]\ndatabase = "mysql://x"\n')
    wrong = subprocess.run([sys.executable, "-m", "services.cli", "fleet", "status", "--from", "record",
                            "--config", str(config)], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert wrong.returncode == 2 and "record.database" in wrong.stderr  # settings errors exit 2


def wait_for_log(service: ServiceProcess, text: str, timeout: float = 60.0) -> float:
    end = time.monotonic() + timeout
    while text not in service.log_file.read_text(errors="replace"):
        assert service.proc.poll() is None, f"the service exited: {service.log_file.read_text()[-3000:]}"
        assert time.monotonic() < end, f"{text!r} not in {service.log_file}: {service.log_file.read_text()[-3000:]}"
        time.sleep(0.05)
    return time.monotonic()


def test_the_standby_takes_over_a_paused_rollout_and_finishes_it(fleet: Fleet, postgres: PostgresServer) -> None:
    empty(postgres)
    with fleet.operator_config.open("a") as settings_file:
        settings_file.write(f'[record]\ndatabase = "{postgres.url}"\nstandby_poll = 0.5\n')
    add_devices(fleet, healthy=["good-1", "good-2"], sick=["sick-1"])
    active = start_service(fleet)
    wait_for_log(active, "(active)")
    standby = ServiceProcess(["fleet", "serve", "--config", str(fleet.operator_config), "--no-homeassistant"],
                             fleet.root / "standby.log", fleet.root)
    fleet.processes.append(standby)
    wait_for_log(standby, "standby: another fleet service")

    release_staged(fleet, "2.0.0")
    for name in fleet.devices:
        fleet.watcher.wait(name, lambda s: s.phase == Phase.WAITING)
    assert rollout(fleet, "start", IPC, "2.0.0", "--wave", "sick-1,good-1", "--wave", "100%", "--soak", "0",
                   "--max-failed", "30")["ok"]
    paused = status_when(fleet, lambda s: s["state"] == "paused")
    assert paused["wave"] == 1 and paused["failed_devices"] == ["sick-1"]
    assert "(active)" not in standby.log_file.read_text()  # it never joined the broker as the service

    os.killpg(active.proc.pid, signal.SIGKILL)  # a power cut of the active service's machine
    killed = time.monotonic()
    active.proc.wait()
    took_over = wait_for_log(standby, "now the active one") - killed
    answering = wait_for_log(standby, "(active)") - killed
    print(f"standby: lock {took_over:.2f} s, connected as the service {answering:.2f} s after the kill")

    # The decision the dead service made (pause on sick-1) stands: nobody else is admitted.
    after = status_when(fleet, lambda s: s["state"] == "paused" and s["failed_devices"] == ["sick-1"])
    assert after["wave"] == 1 and after["done"] == 1
    time.sleep(2)
    assert fleet.watcher.states["good-2"].phase == Phase.WAITING
    resumed = rollout(fleet, "resume", IPC)  # answered by the new active service
    assert resumed["ok"] and resumed["message"].endswith("running")
    completed = status_when(fleet, lambda s: s["state"] == "completed")
    assert completed["wave"] == 2 and completed["failed_devices"] == ["sick-1"]
    assert fleet.watcher.states["good-2"].installed_version == "2.0.0"
    # Both services wrote one record: the attempts from before and after the takeover are in it.
    shown = json.loads(fleet.cli("fleet", "show", "good-2", "--config", str(fleet.operator_config), "--json").stdout)
    assert [a["outcome"] for a in shown["attempts"]] == ["done"]
    record = json.loads(fleet.cli("fleet", "status", "--from", "record", "--config", str(fleet.operator_config),
                                  "--json").stdout)
    assert {d["device"]: d["installed_version"] for d in record["devices"]} == {
        "good-1": "2.0.0", "good-2": "2.0.0", "sick-1": "1.0.0"}



def test_the_standby_benchmark_runs_ci_sized() -> None:
    """benchmarks/standby_bench.py --quick: three takeovers, each after a SIGKILL, each answering."""
    bench = Path(__file__).parents[2] / "benchmarks" / "standby_bench.py"
    result = subprocess.run([sys.executable, str(bench), "--quick", "--seed", "7", "--json"], capture_output=True,
                            text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout)
    assert figures["seed"] == 7 and figures["trials"] == 3 and len(figures["runs"]) == 3
    for trial in figures["runs"]:  # the lock comes first, then the broker session, then the answer
        assert 0 < trial["lock_seconds"] <= trial["connected_seconds"] <= trial["answered_seconds"]
