"""Fleet update with deltas vs full artifacts, measured in the same run on this machine.

    python benchmarks/fleet_bench.py [--devices 6] [--json]

Runs the demo's fleet twice: releases carrying bsdiff deltas, then the same releases with full
artifacts only (the baseline). Prints origin egress, bytes received by devices and fleet
completion time for both, and the ratios delta/full. Absolute times depend on the machine; the
ratios are the result.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from services.demo.run import DemoOptions, DemoResult, run_demo  # noqa: E402


def measure(devices: int, delta_bases: int, console: Console) -> DemoResult:
    result = asyncio.run(run_demo(DemoOptions(devices=devices, delta_bases=delta_bases), console, live_display=False))
    if not result.ok:
        raise SystemExit(f"fleet did not complete (delta_bases={delta_bases})")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=6)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    quiet = Console(stderr=True, quiet=True)
    runs = {"delta": measure(args.devices, 3, quiet), "full": measure(args.devices, 0, quiet)}
    figures = {
        name: {
            "origin_egress_bytes": r.origin_egress_bytes,
            "device_received_bytes": sum(d.bytes_from_origin + d.bytes_from_peers for d in r.devices),
            "fleet_seconds": round(r.wall_seconds, 2),
            "max_device_seconds": max(d.seconds or 0 for d in r.devices),
        }
        for name, r in runs.items()
    }
    ratios = {k: round(figures["delta"][k] / figures["full"][k], 4) if figures["full"][k] else None for k in figures["full"]}
    if args.json:
        print(json.dumps({"devices": args.devices, "runs": figures, "ratio_delta_over_full": ratios}))
        return 0
    table = Table(title=f"{args.devices} devices, two classes, 1.0.0 -> 2.0.0")
    table.add_column("measure")
    for name in ("delta", "full (baseline)", "delta / full"):
        table.add_column(name, justify="right")
    for key in figures["full"]:
        table.add_row(key, str(figures["delta"][key]), str(figures["full"][key]), str(ratios[key]))
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
