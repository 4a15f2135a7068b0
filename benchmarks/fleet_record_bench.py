"""The fleet service with a large fleet in its record: report ingest, rollout ticks, `fleet status`.

    python3 benchmarks/fleet_record_bench.py [--devices 100000] [--baseline 1000] [--json]
    python3 benchmarks/fleet_record_bench.py --quick      # 20,000 devices against 1,000 (~10 s)
    python3 benchmarks/fleet_record_bench.py --record postgres   # the record in PostgreSQL (Debian's, started here)

The parts of the fleet service that grow with the fleet, measured in process against a real
embedded broker and a real SQLite record (nothing mocked):

- ingest: every device's state report through `FleetService.handle` (parse, validate, track,
  record), as reports/s, and the service's memory once every device is recorded;
- a rollout tick (`FleetService.advance`) of a class holding every device, rollout 5% / 25% /
  100%: the first tick (install commands to the first wave, published through the broker), then
  ticks with nothing to do, and a tick after 2% of the first wave failed (auto-pause);
- `edgeswarm fleet status` (table and --json), reading the fleet record, as its own process.

The same is measured at `--baseline` devices in the same run; the ratios of time per device
(large / baseline) show where a cost grows faster than the fleet (1.0: linear). Targets from
issue 19: a tick under 100 ms and `fleet status` under 2 s at 100,000 devices, the service under
500 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from schemas import topics  # noqa: E402
from schemas.models import DeviceState, PayloadType, Phase, Role, RoleKeys, RootMetadata  # noqa: E402
from schemas.ops import RolloutPlan, Wave  # noqa: E402
from services.operator.broker import EmbeddedBroker  # noqa: E402
from services.operator.fleet_service import FleetService, OpsTokens  # noqa: E402
from services.operator.fleet_store import open_fleet_store  # noqa: E402
from services.operator.rollout import Rollout  # noqa: E402
from services.runtime.keys import SigningKey, sign_envelope  # noqa: E402
from services.runtime.messaging import Message, MqttClient  # noqa: E402
from services.runtime.trust import TrustedSet  # noqa: E402
from tests.support.postgres import PostgresServer  # noqa: E402

FLEET = "bench"
CLASS = "gw"
V1, V2 = "1.0.0", "2.0.0"
SHA_V1 = "1" * 64


@dataclass
class Figures:
    devices: int
    ingest_seconds: float
    reports_per_second: float
    service_mib: float  # RSS growth from before the service to every device recorded
    first_tick_seconds: float  # commands to the first wave
    commands: int
    tick_seconds_p50: float  # ticks with nothing to do
    tick_seconds_max: float
    pause_tick_seconds: float  # after 2% of the first wave failed
    paused: bool
    status_seconds: float
    status_json_seconds: float


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _root() -> RootMetadata:
    keys = {role: SigningKey.generate(role.value) for role in (Role.ROOT, Role.RELEASE, Role.TIMESTAMP)}
    root = RootMetadata(
        fleet=FLEET, version=1, expires=datetime.now(UTC) + timedelta(days=365),
        keys={k.keyid: k.public_key() for k in keys.values()},
        roles={role: RoleKeys(keyids=[k.keyid], threshold=1) for role, k in keys.items()},
    )
    envelope = sign_envelope(PayloadType.ROOT, root.canonical_bytes(), [keys[Role.ROOT]]).canonical_bytes()
    return TrustedSet.load_initial_root(envelope)


def _state(device: str, when: datetime, phase: Phase = Phase.IDLE, target: str | None = None,
           version: str = V1) -> Message:
    state = DeviceState(device=device, fleet=FLEET, device_class=CLASS, installed_version=version,
                        installed_sha256=SHA_V1, phase=phase, target_version=target, timestamp=when,
                        reason="health check failed" if phase == Phase.ROLLED_BACK else None,
                        reason_code="health_check_failed" if phase == Phase.ROLLED_BACK else None)
    return Message(topics.state_topic(FLEET, device), state.canonical_bytes(), True, 1)


async def _measure(n: int, work: Path, broker_port: int, database: str | None) -> Figures:
    gc.collect()
    before = _rss_mib()
    home = work / f"home-{n}"
    home.mkdir()
    store = open_fleet_store(database, home)
    service = FleetService(FLEET, store, OpsTokens.load_or_create(home / "tokens"), _root())
    devices = [f"dev-{i:06d}" for i in range(n)]
    start = datetime.now(UTC) - timedelta(hours=1)
    reports = [_state(d, start) for d in devices]
    async with MqttClient("127.0.0.1", broker_port, f"bench-service-{n}") as client:
        t0 = time.perf_counter()
        for message in reports:
            await service.handle(client, message)
        service.flush()
        ingest = time.perf_counter() - t0
        del reports
        gc.collect()
        memory = _rss_mib() - before

        plan = RolloutPlan(device_class=CLASS, version=V2, waves=[Wave(percent=5), Wave(percent=25), Wave(percent=100)],
                           soak_seconds=3600, max_failed_percent=1)
        service.rollouts[CLASS] = Rollout(plan=plan, sequence=2, release_sha256="ab" * 32, salt="bench",
                                          wave_started=datetime.now(UTC))
        t0 = time.perf_counter()
        await service.advance(client)
        first_tick = time.perf_counter() - t0
        commanded = sorted(service.rollouts[CLASS].commanded)

        ticks = []
        for _ in range(5):
            t0 = time.perf_counter()
            await service.advance(client)
            ticks.append(time.perf_counter() - t0)

        # 2% of the first wave rolls back, the others install: the next tick pauses the rollout.
        now = datetime.now(UTC)
        failing = set(commanded[: max(1, len(commanded) // 50)])
        for device in commanded:
            if device in failing:
                await service.handle(client, _state(device, now, Phase.ROLLED_BACK, V2))
            else:
                await service.handle(client, _state(device, now, Phase.DONE, V2, version=V2))
        t0 = time.perf_counter()
        await service.advance(client)
        pause_tick = time.perf_counter() - t0
        paused = service.rollouts[CLASS].state.value == "paused"
    store.close()

    config = home / "operator.toml"
    config.write_text(f'fleet = "{FLEET}"\nhome = "{home}"\n[mqtt]\nport = {broker_port}\n'
                      + (f'[record]\ndatabase = "{database}"\n' if database else ""))
    status = _timed_cli(["fleet", "status", "--from", "record", "--config", str(config)])
    status_json = _timed_cli(["fleet", "status", "--from", "record", "--json", "--config", str(config)])
    return Figures(devices=n, ingest_seconds=round(ingest, 3), reports_per_second=round(n / ingest),
                   service_mib=round(memory, 1), first_tick_seconds=round(first_tick, 4), commands=len(commanded),
                   tick_seconds_p50=round(statistics.median(ticks), 4), tick_seconds_max=round(max(ticks), 4),
                   pause_tick_seconds=round(pause_tick, 4), paused=paused, status_seconds=round(status, 3),
                   status_json_seconds=round(status_json, 3))


def _timed_cli(args: list[str]) -> float:
    t0 = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True, text=True, timeout=600,
                            stdin=subprocess.DEVNULL, cwd=Path(__file__).resolve().parent.parent)
    seconds = time.perf_counter() - t0
    if result.returncode != 0:
        raise SystemExit(f"edgeswarm {' '.join(args)} failed:\n{result.stderr[-2000:]}")
    return seconds


async def _run(sizes: list[int], postgres: PostgresServer | None) -> list[Figures]:
    with tempfile.TemporaryDirectory(prefix="fleet-record-bench-") as work:
        async with EmbeddedBroker("127.0.0.1", 0) as broker:
            return [await _measure(n, Path(work), broker.port,
                                   postgres.create_database(f"bench_{n}") if postgres else None) for n in sizes]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--baseline", type=int, default=1_000)
    parser.add_argument("--quick", action="store_true", help="20,000 devices against 1,000")
    parser.add_argument("--record", choices=["sqlite", "postgres"], default="sqlite",
                        help="where the fleet record is: a SQLite file, or a PostgreSQL server started here")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    large = 20_000 if args.quick else args.devices
    postgres = PostgresServer() if args.record == "postgres" else None
    try:
        if postgres is not None:
            postgres.start()
        baseline, measured = asyncio.run(_run([args.baseline, large], postgres))
    finally:
        if postgres is not None:
            postgres.stop()
    per_device = {
        key: round((getattr(measured, key) / measured.devices) / (getattr(baseline, key) / baseline.devices), 2)
        for key in ("ingest_seconds", "tick_seconds_p50", "pause_tick_seconds", "status_seconds", "status_json_seconds")
        if getattr(baseline, key) > 0
    }
    targets = {
        "tick_under_100ms": measured.tick_seconds_p50 < 0.1 and measured.pause_tick_seconds < 0.1,
        "status_under_2s": measured.status_seconds < 2 and measured.status_json_seconds < 2,
        "service_under_500mb": measured.service_mib * 2**20 / 1e6 < 500,
        "paused_on_the_first_wave": measured.paused,
    }
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.json:
        print(json.dumps({"record": args.record, "baseline": asdict(baseline), "measured": asdict(measured),
                          "per_device_x_baseline": per_device, "targets": targets, "peak_rss_mib": round(peak, 1)}))
        return 0
    console = Console()
    table = Table(title=f"fleet record ({args.record}): {measured.devices:,} devices against {baseline.devices:,} "
                        "(same run)")
    for column in ("figure", f"{baseline.devices:,}", f"{measured.devices:,}", "per device x baseline"):
        table.add_column(column, justify="right")
    for key, value in asdict(measured).items():
        if key == "devices":
            continue
        table.add_row(key, str(getattr(baseline, key)), str(value), str(per_device.get(key, "")))
    console.print(table)
    for name, met in targets.items():
        console.print(f"  {name}: {'[green]met[/]' if met else '[red]not met[/]'}")
    console.print(f"  peak RSS of this process: {peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
