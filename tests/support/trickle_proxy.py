"""A TCP proxy that passes bytes towards the client at a trickle: a peer that never stalls and never
finishes, which only a total fetch deadline stops.

    python -m tests.support.trickle_proxy --port P --to HOST:PORT --rate BYTES_PER_S [--count FILE]

Prints "ready PORT" once it listens (port 0: any free one); keeps the number of bytes it passed to clients in FILE. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from services.demo.processes import terminate

CHUNK = 1024


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rate: float | None,
               count: list[int] | None = None) -> None:
    """Copy `reader` to `writer` until it ends (at `rate` bytes/s; None: at once), then close `writer`."""
    try:
        while data := await reader.read(CHUNK if rate else 65536):
            writer.write(data)
            await writer.drain()
            if count is not None:
                count[0] += len(data)
            if rate:
                await asyncio.sleep(len(data) / rate)
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def main(port: int, host: str, upstream_port: int, rate: float, count_file: Path | None) -> None:
    passed = [0]

    async def keep_count() -> None:
        while count_file is not None:
            count_file.write_text(str(passed[0]))
            await asyncio.sleep(0.2)

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(host, upstream_port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(pipe(client_reader, up_writer, None), pipe(up_reader, client_writer, rate, passed))

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    counter = asyncio.ensure_future(keep_count())  # noqa: F841 - runs as long as the server
    print("ready", server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


@contextmanager
def trickling_origin(origin_addr: str, rate: int, count: Path | None = None) -> Iterator[str]:
    """A proxy in front of the origin at `origin_addr` (a loopback multiaddr), passing `rate` bytes/s
    towards the client; yields the origin's multiaddr through it, and stops it on exit."""
    host, port = origin_addr.split("/")[2], int(origin_addr.split("/")[4])
    proxy = subprocess.Popen([sys.executable, "-m", "tests.support.trickle_proxy", "--port", "0", "--to", f"{host}:{port}",
                              "--rate", str(rate), *(["--count", str(count)] if count else [])],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        assert proxy.stdout is not None
        ready, bound = proxy.stdout.readline().split()
        assert ready == b"ready"
        yield origin_addr.replace(f"/tcp/{port}/", f"/tcp/{int(bound)}/")
    finally:
        terminate(proxy)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--to", required=True)
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--count", type=Path)
    args = parser.parse_args()
    to_host, to_port = args.to.rsplit(":", 1)
    asyncio.run(main(args.port, to_host, int(to_port), args.rate, args.count))
