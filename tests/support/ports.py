"""Free loopback TCP ports for processes that must be told their port before they start.

edgeswarm's own listeners (embedded broker, origin, agents' nodes, the trickle proxy) bind port 0
and say which port they got, so tests never choose for them. Mosquitto (its port is in every
client's credentials), js-ipfs, Home Assistant and Node-RED take a port from here.

A port is chosen here and bound later by another process, so it must stay free in between. Ports
the kernel hands out for port 0 come from its ephemeral range, the same range every outgoing
connection on the machine draws its local port from: on a loaded machine one of those took a
port between the check and the bind. So ports are drawn at random from *below* the ephemeral
range, checked free, and never handed out twice by this process.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOWEST = 10_000
_given: set[int] = set()  # this process's own hand-outs: a port not yet bound still looks free


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    low, high = _ephemeral_range()
    candidates = range(LOWEST, low) if low - LOWEST >= 2000 else range(high + 1, 65536)
    for _ in range(1000):
        port = random.choice(candidates)  # noqa: S311 - spreading, not secrecy
        if port not in _given and _is_free(host, port):
            _given.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # a crowded machine: the kernel's choice
        sock.bind((host, 0))
        return int(sock.getsockname()[1])

