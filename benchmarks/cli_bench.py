"""How long `edgeswarm ... --help` takes, against the interpreter's own start-up in the same run.

    python benchmarks/cli_bench.py [--runs 15] [--json]

Runs the installed `edgeswarm` script (or `python -m services.cli` when it is not on PATH) with
`--help` for the top level and every command group, each `--runs` times, and two baselines the
same number of times: `python -c pass` (the interpreter and its site-packages) and
`python -c "import typer.rich_utils"` (the least any typer command with rich help loads). Prints
the median and worst wall time of each, and each one's median over the interpreter's. The target
is the issue's: every median under 0.3 s on the reference machine (2 cores); the ratios are what
compares across machines.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
PAGES = ("", "rollout start", "fleet status", "broker config", "keys init", "delta create", "device run")


def wall(argv: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, cwd=REPO)
        times.append(time.perf_counter() - started)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=15, help="runs of each command (default 15)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    script = shutil.which("edgeswarm")
    edgeswarm = [script] if script else [sys.executable, "-m", "services.cli"]
    cases = {"python -c pass (baseline)": [sys.executable, "-c", "pass"],
             "import typer.rich_utils": [sys.executable, "-c", "import typer.rich_utils"]}
    for page in PAGES:
        cases[f"edgeswarm {page} --help".replace("  ", " ")] = [*edgeswarm, *page.split(), "--help"]
    # Interleaved rounds: a burst of load on the machine then hits every case alike.
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.runs):
        for name, argv in cases.items():
            samples[name] += wall(argv, 1)
    baseline = statistics.median(samples["python -c pass (baseline)"])
    rows = [{"command": name, "median_s": round(statistics.median(t), 3), "max_s": round(max(t), 3),
             "x_interpreter": round(statistics.median(t) / baseline, 2)} for name, t in samples.items()]
    help_medians = [r["median_s"] for r in rows if r["command"].endswith("--help")]
    verdict = {"runs": args.runs, "script": edgeswarm[0], "rows": rows,
               "worst_help_median_s": max(help_medians), "under_0_3_s": max(help_medians) < 0.3}
    if args.json:
        print(json.dumps(verdict))
        return 0
    table = Table(title=f"`--help` wall time, {args.runs} runs each ({edgeswarm[0]})")
    for column in ("command", "median s", "max s", "x interpreter"):
        table.add_column(column, justify="left" if column == "command" else "right")
    for r in rows:
        table.add_row(r["command"], f"{r['median_s']:.3f}", f"{r['max_s']:.3f}", f"{r['x_interpreter']:.2f}")
    console = Console()
    console.print(table)
    console.print(f"worst help median {verdict['worst_help_median_s']:.3f} s: "
                  + ("under 0.3 s" if verdict["under_0_3_s"] else "[bold red]not under 0.3 s[/]"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
