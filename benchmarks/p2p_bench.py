"""Peer-to-peer against a central HTTP origin, in the NAT lab, measured in the same run.

    python3 benchmarks/p2p_bench.py                      # 20 devices, 5 NATs, 32 MB, shaped links
    python3 benchmarks/p2p_bench.py --devices 5 --nats 3 --size 8   # a quick run
    python3 benchmarks/p2p_bench.py --json
    python3 benchmarks/p2p_bench.py --runs 5             # five whole comparisons: every run and the median
    python3 benchmarks/p2p_bench.py --plot timeline.png  # and a picture of where each device's time went

N device agents behind K NAT routers (3 of 5 UPnP-capable, 1 plain MASQUERADE, 1 symmetric, the
devices spread round-robin), the broker and the origin on the WAN with the origin's uplink shaped
(20 Mbit/s) and every device's link shaped both ways (20 Mbit/s). One release of a SIZE MB
artifact through edgeswarm (NAT-PMP mappings, MQTT rendezvous, peers first, the origin serving one
peer at a time), then the same artifact over plain HTTP from the same WAN host to the same
devices. Needs root (network namespaces); installs Debian's iptables, miniupnpd-iptables and coturn when missing.

Besides the ratio to HTTP, each run is set against the swarming bound: no fleet can finish before
max(F / u_origin, F / d_device, N F / (u_origin + N u_device)) for an artifact of F bytes, N
devices and those link rates (`bound_seconds`, `fleet_x_bound`); `duplicate_x_artifact` is what
the devices received on average (origin and peers, as the kernel counted their connections' bytes)
per artifact: above 1.0 is the same blocks fetched twice.

Where the time goes: once a second (`--sample`) counting rules in every device's namespace give
its bytes over time from the origin, from LAN peers and from peers across NATs (JSON `timeline`;
they keep what closed connections delivered, which the agents' per-socket counts lose), its idle stretches (2 s or more receiving nothing before its last byte), its
node restarts and origin dials (from its log), and every node's CPU time (`cpu_seconds_per_mb`: the
agents with their embedded Kubo and the origin, per MiB delivered to a device). `--plot FILE.png`
draws it (benchmarks/p2p_plot.py; matplotlib, installed when missing).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support import netlab  # noqa: E402
from tests.support.p2p_scenario import FleetLab, Plan, Result, nat_plan  # noqa: E402


def install_lab_tools() -> None:
    """Debian's packages the lab needs, installed when missing (as root, like .ci/run)."""
    import os
    import shutil
    import subprocess

    wanted = {"iptables-legacy": "iptables", "miniupnpd": "miniupnpd-iptables", "turnserver": "coturn", "ss": "iproute2"}
    missing = [package for tool, package in wanted.items()
               if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists()]
    if missing and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "-q", *missing], check=True, stdout=subprocess.DEVNULL,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def swarm_bound(size: int, devices: int, origin_mbit: float, device_mbit: float) -> float:
    """Seconds below which no fleet can have the artifact (each device's uplink as fast as its downlink)."""
    origin, device = origin_mbit * 1e6 / 8, device_mbit * 1e6 / 8
    return max(size / origin, size / device, devices * size / (origin + devices * device))


def summary(result: Result, size: int, timeout: float, bound: float) -> dict:
    # A device that did not finish counts at the timeout (a lower bound on its time), never as absent.
    unfinished = [d.device for d in result.devices if d.version != "2.0.0" or d.seconds is None]
    seconds = sorted(d.seconds if d.device not in unfinished and d.seconds is not None else timeout
                     for d in result.devices)
    received_by_agents = sum(d.from_origin + d.from_peers for d in result.devices) or 1
    timelines = {t.device: t for t in result.timelines}
    # The timeline's count includes connections that closed during a fetch, which the agents' own
    # before/after snapshots miss: it is the one the duplicate figure uses when there is one.
    received = sum(t.received for t in timelines.values()) if timelines else received_by_agents
    device_cpu = [t.cpu_seconds for t in timelines.values() if t.cpu_seconds is not None]
    cpu_total = sum(device_cpu) + (result.origin_cpu_seconds or 0)
    delivered_mb = len(result.devices) * size / (1 << 20)
    idle = {t.device: t.idle_stretches() for t in timelines.values()}
    idle_seconds = [sum(end - start for start, end in stretches) for stretches in idle.values()]
    paths = {d.device: {"nat": d.nat, "lan_peer": d.from_lan_peers, "peer_across_nats": d.from_peers - d.from_lan_peers,
                        "origin": d.from_origin} for d in result.devices}
    http = sorted(result.http_device_seconds)
    return {
        "devices": len(result.devices),
        "completed": len(result.devices) - len(unfinished),
        "unfinished": unfinished,
        "artifact_bytes": size,
        "origin_egress_p2p": result.origin_egress,
        "origin_egress_http": result.http_origin_egress,
        "origin_egress_p2p_x_artifact": round(result.origin_egress / size, 2),
        "origin_egress_http_x_artifact": round((result.http_origin_egress or 0) / size, 2),
        "fleet_seconds_p2p": result.completion_seconds,
        "fleet_seconds_http": result.http_completion_seconds,
        "fleet_time_ratio": round(result.completion_seconds / result.http_completion_seconds, 3)
        if result.completion_seconds and result.http_completion_seconds else None,
        "bound_seconds": round(bound, 2),
        "fleet_x_bound": round(result.completion_seconds / bound, 2) if result.completion_seconds else None,
        "duplicate_x_artifact": round(received / size / max(len(result.devices), 1), 2),
        "received_x_artifact_agents": round(received_by_agents / size / max(len(result.devices), 1), 2),
        # Every node's CPU (the agents, each with its embedded Kubo, and the origin) from the release to
        # the last device's done, per MiB that reached a device: what a duplicate or an idle node costs.
        "cpu_seconds_per_mb": round(cpu_total / delivered_mb, 3) if timelines else None,
        "cpu_seconds_devices": round(sum(device_cpu), 1) if timelines else None,
        "cpu_seconds_origin": result.origin_cpu_seconds,
        "idle_seconds_total": round(sum(idle_seconds), 1) if timelines else None,
        "idle_seconds_max_device": round(max(idle_seconds, default=0), 1) if timelines else None,
        "node_restarts": sum(len(t.restarts) for t in timelines.values()) if timelines else None,
        "origin_dials": sum(len(t.origin_dials) for t in timelines.values()) if timelines else None,
        "sampling_cpu_seconds": result.sampling_cpu_seconds,
        "device_seconds_p2p_p50_p95": [_pct(seconds, 50), _pct(seconds, 95)],
        "device_seconds_http_p50_p95": [_pct(http, 50), _pct(http, 95)],
        # The agents' own split, over the agents' own total: the timeline's total is another count.
        "share_of_bytes_from_peers": round(sum(d.from_peers for d in result.devices) / received_by_agents, 3),
        "share_from_lan_peers": round(sum(d.from_lan_peers for d in result.devices) / received_by_agents, 3),
        # As the devices report them when their fetch ended (their IPFS connections).
        "connections_direct": sum(d.peers_direct or 0 for d in result.devices),
        "connections_relayed": sum(d.peers_relayed or 0 for d in result.devices),
        "paths": paths,
        "timeline": {t.device: {"nat": t.nat, "done": t.done_seconds, "cpu_seconds": t.cpu_seconds,
                                "received_x_artifact": round(t.received / size, 3), "idle": idle[t.device],
                                "restarts": t.restarts, "origin_dials": t.origin_dials,
                                "samples": [list(sample) for sample in t.samples]}
                     for t in timelines.values()},
    }


def _pct(values: list[float], p: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return round(statistics.quantiles(values, n=100, method="inclusive")[p - 1], 2)


def ensure_matplotlib() -> None:
    """--plot's one dependency, installed when missing (as the lab's Debian tools are) before a long run."""
    import importlib.util
    import subprocess

    if importlib.util.find_spec("matplotlib") is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib>=3.7"], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--nats", type=int, default=5)
    parser.add_argument("--size", type=int, default=32, help="artifact size in MB")
    parser.add_argument("--origin-mbit", type=float, default=20)
    parser.add_argument("--device-mbit", type=float, default=20)
    parser.add_argument("--grace", type=float, default=2.0, help="seconds a device asks peers before the origin")
    parser.add_argument("--peers", type=int, default=32, help="peers each device dials from the rendezvous")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the HTTP baseline (~5 min at the defaults): for iterating on the p2p side only")
    parser.add_argument("--keep-logs", type=Path, metavar="DIR", help="build the lab in DIR and leave its logs there")
    parser.add_argument("--runs", type=int, default=1, help="repeat the whole comparison; every run and the median are shown")
    parser.add_argument("--plot", type=Path, metavar="FILE.png",
                        help="draw each device's timeline (with --runs K: FILE-1.png ... FILE-K.png)")
    parser.add_argument("--sample", type=float, default=1.0, metavar="S",
                        help="seconds between timeline samples (default 1; each lists the counters of every namespace)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    # The lab's processes (`python -m services.cli ...` in namespaces, in temporary directories) must run
    # this checkout's code, not whatever checkout `pip install -e` last pointed at.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    if args.runs < 1 or (args.keep_logs and args.runs > 1):
        print("--runs must be at least 1, and --keep-logs keeps one run's lab", file=sys.stderr)
        return 2
    if args.sample <= 0:
        print("--sample must be above 0", file=sys.stderr)
        return 2
    install_lab_tools()
    if args.plot:
        ensure_matplotlib()
    why = netlab.available() or netlab.upnp_available()
    if why:
        print(f"cannot build the NAT lab: {why}", file=sys.stderr)
        return 2
    size = args.size << 20
    plan = Plan(nats=nat_plan(args.devices, args.nats), size=size, origin_mbit=args.origin_mbit,
                device_mbit=args.device_mbit, origin_grace=args.grace,
                rendezvous_peers=args.peers, timeout=1800, sample_interval=args.sample)
    if args.keep_logs:
        if args.keep_logs.exists() and any(args.keep_logs.iterdir()):
            print(f"--keep-logs {args.keep_logs}: not empty (a lab of an earlier run?); give a new directory",
                  file=sys.stderr)
            return 2
        args.keep_logs.mkdir(parents=True, exist_ok=True)
    bound = swarm_bound(size, args.devices, args.origin_mbit, args.device_mbit)
    runs = []
    for run in range(1, args.runs + 1):
        with (contextlib.nullcontext(str(args.keep_logs)) if args.keep_logs else tempfile.TemporaryDirectory(
                prefix="edgeswarm-p2p-")) as tmp, FleetLab(Path(tmp), plan) as fleet:
            print(f"run {run}/{args.runs}: building the lab: {args.devices} devices behind "
                  f"{', '.join(n.kind for n in plan.nats)}", file=sys.stderr)
            fleet.build()
            print("releasing over peer-to-peer ...", file=sys.stderr)
            result = fleet.release()
            if not args.no_baseline:
                print("the same artifact over HTTP ...", file=sys.stderr)
                fleet.http_baseline(result)
        runs.append(summary(result, size, plan.timeout, bound))
        if args.plot:
            from p2p_plot import plot_run

            target = args.plot if args.runs == 1 else args.plot.with_name(f"{args.plot.stem}-{run}{args.plot.suffix}")
            plot_run(runs[-1], target, f"run {run}/{args.runs}: {args.devices} devices, {args.nats} NATs, {args.size} MB")
            print(f"timeline drawn in {target}", file=sys.stderr)
    status = 1 if any(r["unfinished"] for r in runs) else 0  # an incomplete run is a failed run, whatever else it measured
    if args.runs > 1:
        print_runs(runs, args.json)
        return status
    figures = runs[0]
    if args.json:
        print(json.dumps(figures, indent=2))
        return status
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{figures['devices']} devices, {args.nats} NATs, {args.size} MB, origin {args.origin_mbit} Mbit/s, "
                        f"devices {args.device_mbit} Mbit/s")
    for column in ("", "edgeswarm p2p", "HTTP origin", "ratio"):
        table.add_column(column, justify="right")
    table.add_row("origin egress", f"{figures['origin_egress_p2p']:,} ({figures['origin_egress_p2p_x_artifact']}x)",
                  f"{figures['origin_egress_http'] or 0:,} ({figures['origin_egress_http_x_artifact']}x)",
                  f"{figures['origin_egress_p2p'] / max(figures['origin_egress_http'] or 1, 1):.3f}")
    table.add_row("fleet completion s", str(figures["fleet_seconds_p2p"]), str(figures["fleet_seconds_http"]),
                  str(figures["fleet_time_ratio"]))
    table.add_row("device p50 / p95 s", " / ".join(map(str, figures["device_seconds_p2p_p50_p95"])),
                  " / ".join(map(str, figures["device_seconds_http_p50_p95"])), "")
    Console().print(table)
    paths = Table(title="where each device's bytes came from")
    for column in ("device", "NAT", "LAN peer", "peer across NATs", "origin"):
        paths.add_column(column, justify="right")
    for device, p in figures["paths"].items():
        paths.add_row(device, p["nat"], f"{p['lan_peer']:,}", f"{p['peer_across_nats']:,}", f"{p['origin']:,}")
    Console().print(paths)
    print(f"swarming bound {figures['bound_seconds']} s: the fleet took {figures['fleet_x_bound']}x it; devices received "
          f"{figures['duplicate_x_artifact']}x the artifact on average")
    print(f"CPU {figures['cpu_seconds_per_mb']} s per MiB delivered (devices {figures['cpu_seconds_devices']} s, "
          f"origin {figures['cpu_seconds_origin']} s); idle {figures['idle_seconds_total']} s in all, "
          f"{figures['idle_seconds_max_device']} s at most on one device; {figures['node_restarts']} node restarts, "
          f"{figures['origin_dials']} origin dials")
    print(f"completed {figures['completed']}/{figures['devices']}; bytes from peers {figures['share_of_bytes_from_peers']:.1%} "
          f"(LAN {figures['share_from_lan_peers']:.1%}); connections when fetches ended: "
          f"{figures['connections_direct']} direct, {figures['connections_relayed']} relayed")
    if figures["unfinished"]:
        print(f"INCOMPLETE: {', '.join(figures['unfinished'])} did not finish within {plan.timeout:.0f} s "
              "(counted at the timeout in p50/p95)", file=sys.stderr)
    return status


# JSON key -> column: fleet time / HTTP's, / the swarming bound, origin egress and bytes received per artifact,
# CPU per MiB delivered, idle seconds and node restarts summed over the devices.
RUN_FIGURES = {"fleet_time_ratio": "x HTTP", "fleet_x_bound": "x bound", "origin_egress_p2p_x_artifact": "origin x",
               "duplicate_x_artifact": "received x", "cpu_seconds_per_mb": "CPU s/MiB", "idle_seconds_total": "idle s",
               "node_restarts": "restarts", "fleet_seconds_p2p": "p2p s", "fleet_seconds_http": "HTTP s"}


def print_runs(runs: list[dict], as_json: bool) -> None:
    """Every run and the median of each figure: a claim rests on all of them, not on the best."""
    medians = {key: _median([r[key] for r in runs]) for key in RUN_FIGURES}
    completed = [f"{r['completed']}/{r['devices']}" for r in runs]
    if as_json:
        print(json.dumps({"runs": runs, "median": medians, "completed": completed}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(runs)} runs")
    table.add_column("run", justify="right")
    for column in (*RUN_FIGURES.values(), "done"):
        table.add_column(column, justify="right")
    for index, r in enumerate(runs, 1):
        table.add_row(str(index), *(str(r[key]) for key in RUN_FIGURES), completed[index - 1])
    table.add_row("median", *(str(medians[key]) for key in RUN_FIGURES), "")
    Console().print(table)


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.median(known), 3) if known else None


if __name__ == "__main__":
    sys.exit(main())
