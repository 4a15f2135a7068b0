"""Addresses other hosts can dial this one at: what a node bound to every interface should announce."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

__all__ = ["WILDCARDS", "host_addresses", "local_address"]

WILDCARDS = ("0.0.0.0", "::", "")


def local_address(towards: str) -> str:
    """The address this host uses to reach `towards` (its LAN address behind a NAT).

    Raises:
        OSError: there is no route to `towards`, or its name does not resolve.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((towards, 9))  # UDP connect sends nothing; it only picks the route
        return str(sock.getsockname()[0])


def host_addresses(fib_trie: Path = Path("/proc/net/fib_trie")) -> list[str]:
    """This host's own IPv4 addresses other than loopback, in this network namespace, from the
    kernel's routing trie (no interface library needed): each `|-- A` followed by `/32 host LOCAL`."""
    try:
        lines = fib_trie.read_text().splitlines()
    except OSError:
        return []
    found: dict[str, None] = {}
    last = ""
    for line in lines:
        text = line.strip()
        if text.startswith("|-- "):
            last = text[4:]
        elif text == "/32 host LOCAL" and last and not ipaddress.ip_address(last).is_loopback:
            found[last] = None
    return list(found)
