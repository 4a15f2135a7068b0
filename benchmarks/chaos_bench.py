"""Faults at random moments of real updates, and what the devices look like afterwards (issue 15).

    python3 benchmarks/chaos_bench.py [--trials 200] [--disk-trials 12] [--clock-trials 9]
                                      [--broker-trials 20] [--service-trials 10] [--swarm-devices 20]
                                      [--seed S] [--json]
    python3 benchmarks/chaos_bench.py --quick            # a few of each (~6 min)

Faults: power cuts (tests/support/power_chaos.py), full disks and wrong clocks
(tests/support/disk_clock_chaos.py; the full disks need root, for a tmpfs per device), and the
broker or the fleet service killed in the middle of a staged rollout, on the embedded broker and
on Mosquitto (tests/support/rollout_chaos.py), and a swarm in the NAT lab through a cut router
uplink, lossy links and half its devices restarting, against a fault-free run of the same lab
(tests/support/swarm_chaos.py; as root).

Power cuts: every trial provisions a fresh device on
1.0.0 in one fleet (embedded broker, origin, real agents with their embedded IPFS node), cuts its
power (SIGKILL of the agent's whole process group) at a random moment of one phase of one install
handler, or during one durable write of one persisted file, or kills `delta apply --in-place`
mid-patch; then starts it again on the same disk and checks, in one place
(tests/support/device_invariants.py): the bytes it boots are a signed version, never a mix; what
it persisted and reports is what it runs; its trust floors did not fall; nothing temporary is
left; no process survives; and it reaches 2.0.0.

The trials are spread over every cell (phase x handler, file x way of cutting, patching in place)
by a shuffled round-robin; each moment is random within the cell, from `--seed` (printed, so any
run can be repeated). The baseline in the same run: one update per handler without a cut.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402
from rich.table import Table  # noqa: E402

from tests.support.disk_clock_chaos import plan_faults, run_fault  # noqa: E402
from tests.support.harness import mosquitto_available  # noqa: E402
from tests.support.power_chaos import Outcome, power_lab  # noqa: E402
from tests.support.rollout_chaos import RolloutOutcome, rollout_lab  # noqa: E402
from tests.support import netlab  # noqa: E402
from tests.support.p2p_scenario import Plan, nat_plan  # noqa: E402
from tests.support.swarm_chaos import SwarmOutcome, plan_swarm_faults, run_swarm  # noqa: E402


def summarize(outcomes: list[Outcome], seed: int, listing_widths: dict[str, dict[str, float]],
              travels: dict[str, int]) -> dict:
    per_phase: dict[str, dict[str, int]] = defaultdict(lambda: {"trials": 0, "bricked": 0, "mixed_versions": 0,
                                                                "reached_new_version": 0, "with_problems": 0})
    landed: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for outcome in outcomes:
        row = per_phase[outcome.cut.cell]
        row["trials"] += 1
        row["bricked"] += outcome.bricked
        row["mixed_versions"] += outcome.mixed
        row["reached_new_version"] += outcome.reached_new_version
        row["with_problems"] += bool(outcome.problems)
        landed[outcome.cut.cell][outcome.landed] += 1
    refetched: dict[str, list[int]] = defaultdict(list)
    for o in outcomes:
        if o.cut.kind == "phase" and o.cut.phase == "downloading":
            refetched[o.cut.handler].append(o.refetched_bytes)  # type: ignore[attr-defined]
    return {
        "seed": seed,
        "trials": len(outcomes),
        "bricked": sum(o.bricked for o in outcomes),
        "mixed_versions": sum(o.mixed for o in outcomes),
        "reached_new_version": sum(o.reached_new_version for o in outcomes),
        "with_problems": sum(bool(o.problems) for o in outcomes),
        "per_phase": dict(sorted(per_phase.items())),
        "landed": {cell: dict(counts) for cell, counts in sorted(landed.items())},
        # Per handler: what the restarted device fetched again, against what the update fetches in all.
        "refetched_bytes_after_download_cuts": {
            handler: {"trials": len(values), "median": statistics.median(values), "max": max(values),
                      "update_fetches": travels.get(handler)} for handler, values in sorted(refetched.items())},
        "recovery_seconds_median": round(statistics.median(o.recovery_seconds for o in outcomes), 2) if outcomes else None,
        "phase_widths_seconds": listing_widths,
        "failures": [o.as_json() for o in outcomes if o.problems or not o.reached_new_version],
    }


def print_report(console: Console, report: dict) -> None:
    table = Table(title=f"faults, seed {report['seed']}")
    for column in ("fault", "trials", "bricked", "mixed", "reached 2.0.0", "problems", "landed in"):
        table.add_column(column, justify="left" if column in ("fault", "landed in") else "right")
    for cell, row in report["per_phase"].items():
        where = ", ".join(f"{k} {v}" for k, v in sorted(report["landed"][cell].items()))
        table.add_row(cell, str(row["trials"]), str(row["bricked"]), str(row["mixed_versions"]),
                      str(row["reached_new_version"]), str(row["with_problems"]), where)
    console.print(table)
    console.print(f"{report['trials']} trials: {report['bricked']} bricked, {report['mixed_versions']} mixed versions, "
                  f"{report['reached_new_version']} reached the new version, {report['with_problems']} with problems; "
                  f"median recovery {report['recovery_seconds_median']} s")
    for handler, row in report["refetched_bytes_after_download_cuts"].items():
        console.print(f"{handler}: after a cut while downloading, fetched again: median {row['median']:,.0f} bytes, "
                      f"max {row['max']:,} ({row['trials']} cuts; the update fetches {row['update_fetches']:,})")
    for failure in report["failures"]:
        console.print(f"[red]{failure['cut']}[/red] (landed: {failure['landed']}): {'; '.join(failure['problems'])}")


def summarize_rollouts(outcomes: list[RolloutOutcome]) -> dict:
    rows: dict[str, dict[str, int]] = defaultdict(lambda: {"trials": 0, "completed": 0, "devices": 0, "devices_on_new": 0,
                                                           "missing_from_record": 0, "installed_twice": 0})
    for o in outcomes:
        row = rows[f"{o.fault} killed ({o.broker})"]
        row["trials"] += 1
        row["completed"] += o.completed
        row["devices"] += o.devices
        row["devices_on_new"] += o.devices_on_new
        row["missing_from_record"] += len(o.missing_from_record)
        row["installed_twice"] += len(o.installed_twice)
    return {"per_fault": dict(sorted(rows.items())),
            "seconds_median": round(statistics.median(o.seconds for o in outcomes), 1) if outcomes else None,
            "failures": [o.as_json() for o in outcomes if o.problems]}


def print_rollouts(console: Console, report: dict) -> None:
    if not report["per_fault"]:
        return
    table = Table(title="crashes during a staged rollout")
    for column in ("fault", "trials", "rollout completed", "devices on the new version", "missing from the record",
                   "installed twice"):
        table.add_column(column, justify="left" if column == "fault" else "right")
    for fault, row in report["per_fault"].items():
        table.add_row(fault, str(row["trials"]), str(row["completed"]), f"{row['devices_on_new']}/{row['devices']}",
                      str(row["missing_from_record"]), str(row["installed_twice"]))
    console.print(table)
    console.print(f"median trial (release to checked) {report['seconds_median']} s")
    for failure in report["failures"]:
        console.print(f"[red]{failure['fault']} killed ({failure['broker']}) at {failure['kill_at']} s[/red]: "
                      f"{'; '.join(failure['problems'])}")


def swarm_trial(rng: random.Random, devices: int, size_mb: int, partition_seconds: tuple[float, float]) -> dict:
    """The NAT lab's swarm without faults, then with them, on the same plan; what each cost."""
    plan = Plan(nats=nat_plan(devices, min(5, devices)), size=size_mb << 20, origin_mbit=20, device_mbit=20,
                timeout=1800, sample_interval=None)
    names = [f"d{i:02d}" for i in range(1, devices + 1)]
    with tempfile.TemporaryDirectory(prefix="chaos-swarm-") as tmp:
        clean = run_swarm(Path(tmp) / "clean", plan, None)
        took = [d.seconds for d in clean.result.devices if d.seconds is not None] or [30.0]
        # Moments within the fetch as the fault-free run measured it: a device's restart comes while it
        # fetches, the partition while the swarm still spreads.
        faults = plan_swarm_faults(rng, len(plan.nats), names, partition_seconds=partition_seconds,
                                   partition_at=(1, max(2.0, 0.5 * statistics.median(took))), lossy=max(1, devices // 5),
                                   into_fetch=(0.2, max(1.0, 0.8 * statistics.median(took))))
        faulty = run_swarm(Path(tmp) / "faults", plan, faults)

    def figures(outcome: SwarmOutcome) -> dict:
        result = outcome.result
        return {"completed": sum(v.version == "2.0.0" for v in outcome.verdicts.values()),
                "completion_seconds": result.completion_seconds,
                "origin_egress_x_artifact": round(result.origin_egress / plan.size, 2), "problems": outcome.problems}

    report = {"devices": devices, "size_mb": size_mb, "faults": faults.describe(), "clean": figures(clean),
              "faulty": figures(faulty)}
    if clean.result.completion_seconds and faulty.result.completion_seconds:
        report["time_x_clean"] = round(faulty.result.completion_seconds / clean.result.completion_seconds, 2)
    report["egress_x_clean"] = round(faulty.result.origin_egress / max(clean.result.origin_egress, 1), 2)
    landed = faulty.landed
    assert landed is not None
    report["partition"] = {"router": faults.partition.router + 1 if faults.partition else None,
                           "cut_at": landed.partition[0] if landed.partition else None,
                           "restored_at": landed.partition[1] if landed.partition else None}
    report["loss_percent"] = faults.loss
    report["restarts"] = landed.restarts
    report["restarts_missed"] = landed.missed  # already done when their moment came
    return report


def print_swarm(console: Console, report: dict) -> None:
    if not report:
        return
    table = Table(title=f"a swarm of {report['devices']} devices, {report['size_mb']} MB: {report['faults']}")
    for column in ("run", "devices on the new version", "fleet done (s)", "origin egress (x artifact)", "problems"):
        table.add_column(column)
    for run in ("clean", "faulty"):
        figures = report[run]
        table.add_row("fault-free" if run == "clean" else "with faults", f"{figures['completed']}/{report['devices']}",
                      str(figures["completion_seconds"]), str(figures["origin_egress_x_artifact"]),
                      str(len(figures["problems"])))
    console.print(table)
    phases = defaultdict(int)
    for restart in report["restarts"]:
        phases[f"{restart['how']} while {restart['phase']}"] += 1
    partition = report["partition"]
    console.print(f"time x fault-free: {report.get('time_x_clean')}; origin egress x fault-free: "
                  f"{report['egress_x_clean']}; uplink of router {partition['router']} cut from "
                  f"{partition['cut_at']} s to {partition['restored_at']} s; restarts: {dict(phases)}"
                  + (f"; already done when their restart came: {report['restarts_missed']}" if report["restarts_missed"] else ""))
    for run in ("clean", "faulty"):
        for problem in report[run]["problems"]:
            console.print(f"[red]{run}: {problem}[/red]")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=200, help="power-cut trials (default 200)")
    parser.add_argument("--seed", type=int, default=None, help="repeat a run: the seed it printed")
    parser.add_argument("--disk-trials", type=int, default=12, help="full-disk trials (default 12; as root)")
    parser.add_argument("--clock-trials", type=int, default=9, help="wrong-clock trials (default 9)")
    parser.add_argument("--broker-trials", type=int, default=20, help="broker kills in a rollout, per broker (default 20)")
    parser.add_argument("--service-trials", type=int, default=10,
                        help="fleet-service kills in a rollout, per broker (default 10)")
    parser.add_argument("--brokers", default="embedded,mosquitto", help="brokers of the rollout trials (default both)")
    parser.add_argument("--swarm-devices", type=int, default=20,
                        help="devices of the NAT-lab swarm under a partition, loss and churn (default 20; 0: none; as root)")
    parser.add_argument("--swarm-size", type=int, default=32, help="the swarm's artifact in MB (default 32)")
    parser.add_argument("--quick", action="store_true",
                        help="24 power cuts, 4 full disks, 3 clocks, 2 broker and 1 service kill per broker, a swarm of "
                             "6 devices and 8 MB with a 30-40 s partition: a CI-sized look")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts instead of tables")
    options = parser.parse_args()
    seed = options.seed if options.seed is not None else random.SystemRandom().randrange(1 << 31)
    console = Console(stderr=options.json, width=shutil.get_terminal_size((150, 40)).columns)
    trials = 24 if options.quick else options.trials
    disk_trials = 4 if options.quick else options.disk_trials
    if disk_trials and os.geteuid() != 0:
        console.print("not root: no full-disk trials (each needs a tmpfs of its own)")
        disk_trials = 0
    clock_trials = 3 if options.quick else options.clock_trials
    broker_trials = 2 if options.quick else options.broker_trials
    service_trials = 1 if options.quick else options.service_trials
    swarm_devices = 6 if options.quick else options.swarm_devices
    swarm_size = 8 if options.quick else options.swarm_size
    if swarm_devices and (why := netlab.available() or netlab.upnp_available()):
        console.print(f"no swarm trial: {why}")
        swarm_devices = 0
    brokers = [b for b in options.brokers.split(",") if b]
    if "mosquitto" in brokers and not mosquitto_available():
        console.print("no mosquitto here: rollout trials on the embedded broker only")
        brokers.remove("mosquitto")
    console.print(f"seed {seed}: repeat with --seed {seed}")
    rng = random.Random(seed)
    started = time.monotonic()
    outcomes: list[Outcome] = []
    widths: dict[str, dict[str, float]] = {}
    travels: dict[str, int] = {}
    if trials or disk_trials or clock_trials:
        with tempfile.TemporaryDirectory(prefix="chaos-") as tmp, power_lab(Path(tmp)) as lab:
            widths = {handler: {k: round(v, 3) for k, v in listing.widths.items()} for handler, listing in lab.listings.items()}
            travels = lab.travels
            cuts = lab.plan(rng, trials)
            faults = plan_faults(rng, disk_trials, clock_trials)
            with Progress(console=console, transient=True) as progress:
                task = progress.add_task("faults", total=len(cuts) + len(faults))
                for index, cut in enumerate(cuts):
                    outcomes.append(lab.run(cut, Path(tmp) / "work", seed * 1000 + index))
                    progress.advance(task)
                for fault in faults:
                    outcomes.append(run_fault(lab, fault, Path(tmp) / "work"))
                    progress.advance(task)
    rollouts: list[RolloutOutcome] = []
    for broker in brokers if broker_trials + service_trials else []:
        plan = ["broker"] * broker_trials + ["service"] * service_trials
        rng.shuffle(plan)
        with tempfile.TemporaryDirectory(prefix="chaos-rollout-") as tmp, Progress(console=console, transient=True) as progress:
            task = progress.add_task(f"rollouts, {broker}", total=len(plan))
            lab = rollout_lab(Path(tmp), broker, devices=5)
            try:
                for fault in plan:
                    rollouts.append(lab.trial(rng, fault))
                    progress.advance(task)
            finally:
                lab.stop()
    swarm: dict = {}
    if swarm_devices:
        with console.status(f"a swarm of {swarm_devices} devices, fault-free and then with faults"):
            swarm = swarm_trial(rng, swarm_devices, swarm_size, (30, 40) if options.quick else (30, 120))
    report = summarize(outcomes, seed, widths, travels)
    report["rollout"] = summarize_rollouts(rollouts)
    report["swarm"] = swarm
    report["seconds"] = round(time.monotonic() - started, 1)
    if options.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(console, report)
        print_rollouts(console, report["rollout"])
        print_swarm(console, swarm)
    swarm_clean = not swarm or (not swarm["clean"]["problems"] and not swarm["faulty"]["problems"])
    return 0 if report["bricked"] == report["mixed_versions"] == report["with_problems"] == 0 \
        and report["reached_new_version"] == report["trials"] and not report["rollout"]["failures"] and swarm_clean else 1


if __name__ == "__main__":
    sys.exit(main())
