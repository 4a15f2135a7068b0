"""Bytes per TCP connection, read from the kernel (`ss -ti`), to tell origin bytes from peer bytes.

libp2p dials out from its listen port (SO_REUSEPORT), so every connection of a node, inbound or
outbound, has the node's swarm port as its local port. Counters are cumulative per socket; a
snapshot before and after a fetch gives what each remote endpoint sent us in between. Sockets that
close between the two snapshots are not counted, so figures are a lower bound.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

Endpoint = tuple[str, int]
_COUNTER = re.compile(r"\b(bytes_acked|bytes_received):(\d+)")


@dataclass(frozen=True)
class SocketCounters:
    local: Endpoint
    remote: Endpoint
    bytes_sent: int
    bytes_received: int


def _endpoint(text: str) -> Endpoint:
    host, _, port = text.rpartition(":")
    return host.strip("[]").removeprefix("::ffff:"), int(port)


def parse_ss(output: str) -> list[SocketCounters]:
    sockets: list[SocketCounters] = []
    pending: tuple[Endpoint, Endpoint] | None = None
    for line in output.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            fields = line.split()
            try:
                pending = (_endpoint(fields[-2]), _endpoint(fields[-1]))
            except (ValueError, IndexError):
                pending = None
            continue
        if pending is not None:
            counters = dict((k, int(v)) for k, v in _COUNTER.findall(line))
            sockets.append(
                SocketCounters(pending[0], pending[1], counters.get("bytes_acked", 0), counters.get("bytes_received", 0))
            )
            pending = None
    return sockets


class TrafficMeter:
    """Per-remote TCP byte counters of the sockets bound to one local port."""

    def __init__(self, local_port: int) -> None:
        self.local_port = local_port
        self.available = shutil.which("ss") is not None

    def snapshot(self) -> dict[tuple[Endpoint, Endpoint], SocketCounters]:
        if not self.available:
            return {}
        result = subprocess.run(
            ["ss", "-tinH", "state", "established", f"( sport = :{self.local_port} )"],
            capture_output=True, text=True, timeout=10, check=False,
        )
        return {(s.local, s.remote): s for s in parse_ss(result.stdout) if s.local[1] == self.local_port}


def received_since(
    before: dict[tuple[Endpoint, Endpoint], SocketCounters],
    after: dict[tuple[Endpoint, Endpoint], SocketCounters],
) -> dict[Endpoint, int]:
    """Bytes received per remote endpoint between two snapshots."""
    per_remote: dict[Endpoint, int] = {}
    for key, now in after.items():
        then = before.get(key)
        delta = now.bytes_received - (then.bytes_received if then else 0)
        if delta > 0:
            per_remote[now.remote] = per_remote.get(now.remote, 0) + delta
    return per_remote


def on_link(address: str) -> bool:
    """Is `address` on one of this host's own networks (a LAN neighbour), not behind a router?"""
    try:
        route = subprocess.run(["ip", "route", "get", address], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return route.returncode == 0 and " via " not in route.stdout and " dev lo " not in route.stdout
