"""One embedded Kubo node inside a lab namespace (`python -m tests.support.netlab_node ...`).

Prints one JSON line when the node runs ({"peer_id", "multiaddr", "cid"?}); with --fetch, fetches
and prints {"fetched": bytes, "seconds"} and exits; otherwise serves until stdin closes or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path

from services.runtime.content import EmbeddedKuboNode, FetchError, KuboConfig, prepare_process_dir


async def main(args: argparse.Namespace) -> int:
    prepare_process_dir(args.repo.parent)
    config = KuboConfig(repo=args.repo, listen_host=args.listen, swarm_port=args.port, peers=list(args.peer),
                        mdns=args.mdns, nat_port_map=args.nat_port_map, announce=list(args.announce))
    async with EmbeddedKuboNode(config) as node:
        info: dict[str, object] = {"peer_id": node.peer_id, "multiaddr": node.multiaddr}
        if args.add:
            info["cid"] = await node.add(args.add)
        print(json.dumps(info), flush=True)
        if args.fetch:
            start = time.monotonic()
            try:
                size = await node.fetch(args.fetch, args.out, max_bytes=1 << 31, stall_timeout=args.deadline,
                                        deadline=args.deadline)
            except FetchError as exc:
                print(json.dumps({"error": str(exc)}), flush=True)
                return 1
            print(json.dumps({"fetched": size, "seconds": round(time.monotonic() - start, 3),
                              "peers": node.peers()}), flush=True)
            return 0
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        try:
            loop.add_reader(sys.stdin, lambda: stop.set() if not sys.stdin.read(1) else None)
        except PermissionError:
            pass  # stdin is /dev/null (started by NatLab.popen): SIGTERM is the only way to stop
        await stop.wait()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--repo", type=Path, required=True)
    parser.add_argument("--listen", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=4001)
    parser.add_argument("--peer", action="append", default=[])
    parser.add_argument("--announce", action="append", default=[])
    parser.add_argument("--mdns", action="store_true")
    parser.add_argument("--nat-port-map", action="store_true")
    parser.add_argument("--add", type=Path)
    parser.add_argument("--fetch")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--deadline", type=float, default=60)
    sys.exit(asyncio.run(main(parser.parse_args())))
