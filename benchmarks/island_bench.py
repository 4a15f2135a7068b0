"""An island against a connected LAN, in the same run (issue 14).

    python3 benchmarks/island_bench.py                   # 10 devices, 32 MB, 20 Mbit/s links
    python3 benchmarks/island_bench.py --devices 3 --size 4 --json
    python3 benchmarks/island_bench.py --quick           # 3 devices, 8 MB

Both runs build the same NAT lab (tests/support/island.py): N devices and one more behind one
router, the broker and the origin on a WAN host, every link shaped to `--mbit`. In the connected
run nothing is blocked. In the island run the router's firewall drops everything towards the broker
and the origin, and the extra device has a second link out (the bridge): the N island devices hear
the release from it over gossip and fetch its blocks. Times run from the release command to each
device's state.json saying 2.0.0. The island devices' signed reports come back through the bridge
to the fleet service on the WAN host: `reports_in_record` counts those the fleet record holds with
2.0.0, `report_lag_p99_s` is the 99th percentile of the time from a device's report (made at its
install) to the record holding it (the largest, at these sizes). Needs root (network namespaces),
like the other lab benchmarks.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support import netlab  # noqa: E402
from tests.support.island import IslandResult, run_island  # noqa: E402


def _seconds(result: IslandResult) -> float | None:
    return max(result.installed.values()) if result.completed == result.devices else None


def _p99(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10, help="devices behind the router, besides the bridge")
    parser.add_argument("--size", type=int, default=32, help="artifact size in MB")
    parser.add_argument("--mbit", type=float, default=20.0, help="every link's rate")
    parser.add_argument("--quick", action="store_true", help="3 devices, 8 MB")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.devices, args.size = 3, 8
    if (why := netlab.available()) is not None:
        print(f"NAT lab unavailable: {why}", file=sys.stderr)
        return 2
    size = args.size << 20
    timeout = 120 + 4 * args.size * 8 / args.mbit * max(1, args.devices / 4)
    runs = {}
    for mode in ("connected", "island"):
        with tempfile.TemporaryDirectory(prefix=f"island-bench-{mode}-") as workdir:
            if not args.json:
                print(f"{mode}: {args.devices} devices + 1, {args.size} MB, {args.mbit:g} Mbit/s ...", flush=True)
            runs[mode] = run_island(Path(workdir), devices=args.devices, size=size, timeout=timeout,
                                    island=mode == "island", device_mbit=args.mbit)
    island, connected = runs["island"], runs["connected"]
    island_s, connected_s = _seconds(island), _seconds(connected)
    summary = {
        "devices": args.devices,
        "artifact_mb": args.size,
        "mbit": args.mbit,
        "completed": island.completed,
        "island_seconds": island_s,
        "connected_seconds": connected_s,
        "island_x_connected": round(island_s / connected_s, 2) if island_s and connected_s else None,
        "bridge_seconds": island.bridge_seconds,
        "origin_egress_x_artifact": round(island.origin_egress / size, 3),
        "connected_origin_egress_x_artifact": round(connected.origin_egress / size, 3),
        "reports_in_record": len(island.reported),
        "report_lag_p99_s": _p99(list(island.reported.values())),
        "reports_heard": sorted(set(island.heard.values())),
        "per_device_seconds": {"island": island.installed, "connected": connected.installed},
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"island: {island.completed}/{args.devices} updated in {island_s} s (the bridge in {island.bridge_seconds} s); "
              f"connected LAN: {connected.completed}/{args.devices} in {connected_s} s -> "
              f"{summary['island_x_connected']}x (target <= 1.5)")
        print(f"origin egress: island {summary['origin_egress_x_artifact']}x the artifact (target <= 1.1), "
              f"connected {summary['connected_origin_egress_x_artifact']}x")
        print(f"signed reports in the fleet record: {summary['reports_in_record']}/{args.devices} "
              f"({', '.join(summary['reports_heard']) or 'none'}), p99 lag {summary['report_lag_p99_s']} s (target <= 10)")
    return 0 if (island.completed == args.devices and connected.completed == args.devices
                 and len(island.reported) == args.devices) else 1


if __name__ == "__main__":
    sys.exit(main())
