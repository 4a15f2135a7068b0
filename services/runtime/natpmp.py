"""NAT-PMP (RFC 6886): ask the home router for a TCP port mapping, so peers outside can dial in.

miniupnpd, most UPnP-capable routers' firmware and Apple's speak it; a device behind a router
that does not gets an error and simply announces no external address.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from schemas.errors import EdgeswarmError, ReasonCode

PORT = 5351


class NatPmpError(EdgeswarmError):
    code = ReasonCode.NAT_PMP_FAILED


@dataclass(frozen=True)
class Mapping:
    external_ip: str
    external_port: int
    lifetime: int


def gateway(route_table: Path = Path("/proc/net/route")) -> str | None:
    """The router this host sends through: the default route's gateway, else any route's."""
    best: tuple[int, str] | None = None
    for line in route_table.read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8 or fields[2] == "00000000":
            continue
        address = socket.inet_ntoa(struct.pack("<I", int(fields[2], 16)))
        rank = 0 if fields[1] == "00000000" else 1
        if best is None or rank < best[0]:
            best = (rank, address)
    return best[1] if best else None


def _request(router: str, internal_port: int, lifetime: int, timeout: float) -> Mapping:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendto(struct.pack("!BB", 0, 0), (router, PORT))
            reply, _ = sock.recvfrom(64)
            if len(reply) < 12:
                raise NatPmpError("short NAT-PMP reply")
            _, _, result, _, external = struct.unpack("!BBHI4s", reply[:12])
            if result:
                raise NatPmpError(f"the router refused to say its external address (result {result})")
            # Ask for the same port outside as inside: the address is then predictable and stable.
            sock.sendto(struct.pack("!BBHHHI", 0, 2, 0, internal_port, internal_port, lifetime), (router, PORT))
            reply, _ = sock.recvfrom(64)
        except OSError as exc:
            raise NatPmpError(f"no NAT-PMP answer from {router}: {exc}") from None
    if len(reply) < 16:
        raise NatPmpError("short NAT-PMP reply")
    _, _, result, _, _, mapped, granted = struct.unpack("!BBHIHHI", reply[:16])
    if result:
        raise NatPmpError(f"the router refused the mapping (result {result})")
    return Mapping(socket.inet_ntoa(external), mapped, granted)


async def map_tcp(router: str, internal_port: int, *, lifetime: int = 3600, timeout: float = 2.0) -> Mapping:
    return await asyncio.to_thread(_request, router, internal_port, lifetime, timeout)
