"""Faults at random moments of real updates, and what the devices look like afterwards (issue 15).

    python3 benchmarks/chaos_bench.py [--trials 200] [--disk-trials 12] [--clock-trials 9] [--seed S] [--json]
    python3 benchmarks/chaos_bench.py --quick            # 24 power cuts, 4 full disks, 3 wrong clocks (~3 min)

Faults: power cuts (tests/support/power_chaos.py), full disks and wrong clocks
(tests/support/disk_clock_chaos.py; the full disks need root, for a tmpfs per device).

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
from tests.support.power_chaos import Outcome, power_lab  # noqa: E402


def summarize(outcomes: list[Outcome], seed: int, listing_widths: dict[str, dict[str, float]]) -> dict:
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
    refetched = [o.refetched_bytes for o in outcomes if o.cut.kind == "phase" and o.cut.phase == "downloading"]
    return {
        "seed": seed,
        "trials": len(outcomes),
        "bricked": sum(o.bricked for o in outcomes),
        "mixed_versions": sum(o.mixed for o in outcomes),
        "reached_new_version": sum(o.reached_new_version for o in outcomes),
        "with_problems": sum(bool(o.problems) for o in outcomes),
        "per_phase": dict(sorted(per_phase.items())),
        "landed": {cell: dict(counts) for cell, counts in sorted(landed.items())},
        "refetched_bytes_after_download_cuts": {"median": statistics.median(refetched) if refetched else None,
                                                "max": max(refetched, default=None)},
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
    refetched = report["refetched_bytes_after_download_cuts"]
    console.print(f"after a cut while downloading, fetched again: median {refetched['median']} bytes, max {refetched['max']}")
    for failure in report["failures"]:
        console.print(f"[red]{failure['cut']}[/red] (landed: {failure['landed']}): {'; '.join(failure['problems'])}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=200, help="power-cut trials (default 200)")
    parser.add_argument("--seed", type=int, default=None, help="repeat a run: the seed it printed")
    parser.add_argument("--disk-trials", type=int, default=12, help="full-disk trials (default 12; as root)")
    parser.add_argument("--clock-trials", type=int, default=9, help="wrong-clock trials (default 9)")
    parser.add_argument("--quick", action="store_true", help="24 power cuts, 4 full disks, 3 clocks: a CI-sized look")
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
    console.print(f"seed {seed}: repeat with --seed {seed}")
    rng = random.Random(seed)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp, power_lab(Path(tmp)) as lab:
        widths = {handler: {k: round(v, 3) for k, v in listing.widths.items()} for handler, listing in lab.listings.items()}
        cuts = lab.plan(rng, trials)
        faults = plan_faults(rng, disk_trials, clock_trials)
        outcomes: list[Outcome] = []
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("faults", total=len(cuts) + len(faults))
            for index, cut in enumerate(cuts):
                outcomes.append(lab.run(cut, Path(tmp) / "work", seed * 1000 + index))
                progress.advance(task)
            for fault in faults:
                outcomes.append(run_fault(lab, fault, Path(tmp) / "work"))
                progress.advance(task)
    report = summarize(outcomes, seed, widths)
    report["seconds"] = round(time.monotonic() - started, 1)
    if options.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(console, report)
    return 0 if report["bricked"] == report["mixed_versions"] == report["with_problems"] == 0 \
        and report["reached_new_version"] == report["trials"] else 1


if __name__ == "__main__":
    sys.exit(main())
