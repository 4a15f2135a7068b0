"""Peer-to-peer against a central HTTP origin, in the NAT lab, measured in the same run.

    python3 benchmarks/p2p_bench.py                      # 20 devices, 5 NATs, 32 MB, shaped links
    python3 benchmarks/p2p_bench.py --devices 5 --nats 3 --size 8   # a quick run
    python3 benchmarks/p2p_bench.py --json

N device agents behind K NAT routers (3 of 5 UPnP-capable, 1 plain MASQUERADE, 1 symmetric, the
devices spread round-robin), the broker and the origin on the WAN with the origin's uplink shaped
(20 Mbit/s) and every device's link shaped both ways (20 Mbit/s). One release of a SIZE MB
artifact through edgeswarm (NAT-PMP mappings, MQTT rendezvous, peers first, the origin serving one
peer at a time), then the same artifact over plain HTTP from the same WAN host to the same
devices. Needs root (network namespaces); installs Debian's iptables, miniupnpd-iptables and coturn when missing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support import netlab  # noqa: E402
from tests.support.p2p_scenario import FleetLab, NatPlan, Plan, Result  # noqa: E402


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


def nat_plan(devices: int, nats: int) -> tuple[NatPlan, ...]:
    kinds = (["upnp"] * 3 + ["masquerade", "symmetric"]) if nats >= 5 else (["upnp", "masquerade", "symmetric", "upnp"][:nats])
    kinds = (kinds + ["upnp"] * nats)[:nats]
    counts = [devices // nats + (1 if i < devices % nats else 0) for i in range(nats)]
    return tuple(NatPlan(kind, count) for kind, count in zip(kinds, counts, strict=True) if count)  # type: ignore[arg-type]


def summary(result: Result, size: int, timeout: float) -> dict:
    # A device that did not finish counts at the timeout (a lower bound on its time), never as absent.
    unfinished = [d.device for d in result.devices if d.version != "2.0.0" or d.seconds is None]
    seconds = sorted(d.seconds if d.device not in unfinished and d.seconds is not None else timeout
                     for d in result.devices)
    received = sum(d.from_origin + d.from_peers for d in result.devices) or 1
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
        "device_seconds_p2p_p50_p95": [_pct(seconds, 50), _pct(seconds, 95)],
        "device_seconds_http_p50_p95": [_pct(http, 50), _pct(http, 95)],
        "share_of_bytes_from_peers": round(sum(d.from_peers for d in result.devices) / received, 3),
        "share_from_lan_peers": round(sum(d.from_lan_peers for d in result.devices) / received, 3),
        # As the devices report them when their fetch ended (their IPFS connections).
        "connections_direct": sum(d.peers_direct or 0 for d in result.devices),
        "connections_relayed": sum(d.peers_relayed or 0 for d in result.devices),
        "paths": paths,
    }


def _pct(values: list[float], p: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return round(statistics.quantiles(values, n=100, method="inclusive")[p - 1], 2)


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
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    install_lab_tools()
    why = netlab.available() or netlab.upnp_available()
    if why:
        print(f"cannot build the NAT lab: {why}", file=sys.stderr)
        return 2
    size = args.size << 20
    plan = Plan(nats=nat_plan(args.devices, args.nats), size=size, origin_mbit=args.origin_mbit,
                device_mbit=args.device_mbit, origin_grace=args.grace,
                rendezvous_peers=args.peers, timeout=1800)
    if args.keep_logs:
        if args.keep_logs.exists() and any(args.keep_logs.iterdir()):
            print(f"--keep-logs {args.keep_logs}: not empty (a lab of an earlier run?); give a new directory",
                  file=sys.stderr)
            return 2
        args.keep_logs.mkdir(parents=True, exist_ok=True)
    with (contextlib.nullcontext(str(args.keep_logs)) if args.keep_logs else tempfile.TemporaryDirectory(
            prefix="edgeswarm-p2p-")) as tmp, FleetLab(Path(tmp), plan) as fleet:
        print(f"building the lab: {args.devices} devices behind {', '.join(n.kind for n in plan.nats)}", file=sys.stderr)
        fleet.build()
        print("releasing over peer-to-peer ...", file=sys.stderr)
        result = fleet.release()
        if not args.no_baseline:
            print("the same artifact over HTTP ...", file=sys.stderr)
            fleet.http_baseline(result)
    figures = summary(result, size, plan.timeout)
    status = 1 if figures["unfinished"] else 0  # an incomplete run is a failed run, whatever else it measured
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
    print(f"completed {figures['completed']}/{figures['devices']}; bytes from peers {figures['share_of_bytes_from_peers']:.1%} "
          f"(LAN {figures['share_from_lan_peers']:.1%}); connections when fetches ended: "
          f"{figures['connections_direct']} direct, {figures['connections_relayed']} relayed")
    if figures["unfinished"]:
        print(f"INCOMPLETE: {', '.join(figures['unfinished'])} did not finish within {plan.timeout:.0f} s "
              "(counted at the timeout in p50/p95)", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
