"""Tiny network probes run inside lab namespaces (`python -m tests.support.netlab_probe ...`).

    serve IP PORT               TCP server: answers every connection with "ip:port" of the peer it sees
    whoami IP PORT [BIND_PORT]  connect and print what the server saw of us
    natpmp GATEWAY PORT         ask the router for a TCP mapping of PORT (NAT-PMP, RFC 6886); prints
                                "external_ip external_port"
    sink IP PORT                TCP server that reads everything and prints the byte count
    send IP PORT BYTES          send BYTES bytes; prints the seconds it took
"""

from __future__ import annotations

import socket
import struct
import sys
import time


def serve(ip: str, port: int) -> None:
    with socket.create_server((ip, port), reuse_port=True) as server:
        print("ready", flush=True)
        while True:
            conn, (peer_ip, peer_port) = server.accept()
            with conn:
                conn.sendall(f"{peer_ip}:{peer_port}\n".encode())


def whoami(ip: str, port: int, bind_port: int = 0) -> None:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", bind_port))
        sock.settimeout(5)
        sock.connect((ip, port))
        print(sock.recv(100).decode().strip())


def natpmp(gateway: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        sock.sendto(struct.pack("!BB", 0, 0), (gateway, 5351))
        data, _ = sock.recvfrom(64)
        _, _, result, _, external = struct.unpack("!BBHI4s", data[:12])
        if result:
            raise SystemExit(f"NAT-PMP external address request failed: {result}")
        sock.sendto(struct.pack("!BBHHHI", 0, 2, 0, port, port, 3600), (gateway, 5351))
        data, _ = sock.recvfrom(64)
        _, _, result, _, _, mapped, _ = struct.unpack("!BBHIHHI", data[:16])
        if result:
            raise SystemExit(f"NAT-PMP mapping failed: {result}")
        print(socket.inet_ntoa(external), mapped)


def sink(ip: str, port: int) -> None:
    with socket.create_server((ip, port)) as server:
        print("ready", flush=True)
        conn, _ = server.accept()
        total = 0
        with conn:
            while chunk := conn.recv(1 << 16):
                total += len(chunk)
        print(total, flush=True)


def send(ip: str, port: int, count: int) -> None:
    block = b"\0" * (1 << 16)
    start = time.monotonic()
    with socket.create_connection((ip, port), timeout=60) as sock:
        left = count
        while left > 0:
            sock.sendall(block[: min(left, len(block))])
            left -= min(left, len(block))
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)
    print(f"{time.monotonic() - start:.3f}")


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"serve": serve, "whoami": whoami, "natpmp": natpmp, "sink": sink, "send": send}[command](
        args[0], *(int(a) for a in args[1:]))
