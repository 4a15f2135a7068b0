"""A real PostgreSQL server for a test: Debian's binaries, a cluster of its own in a temporary
directory, listening only on a Unix socket there; stopped by its PID and removed afterwards.

As root the server runs as the `postgres` user (PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support.ports import free_port


def binaries() -> Path | None:
    """The directory of initdb and postgres (Debian: /usr/lib/postgresql/<major>/bin), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parent.parent.name))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PostgresServer:
    def __init__(self) -> None:
        bindir = binaries()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed (Debian: apt-get install postgresql)")
        self.bindir = bindir
        self.directory = Path(tempfile.mkdtemp(prefix="edgeswarm-postgres-"))
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        if os.geteuid() == 0:
            account = pwd.getpwnam("postgres")
            os.chown(self.directory, account.pw_uid, account.pw_gid)

    def _as_server_user(self) -> dict:
        return {"user": "postgres", "group": "postgres", "extra_groups": []} if os.geteuid() == 0 else {}

    @property
    def url(self) -> str:
        return self.url_of("edgeswarm")

    def url_of(self, database: str) -> str:
        return f"postgresql://{self.user}@/{database}?host={self.directory}&port={self.port}"

    def create_database(self, name: str) -> str:
        """A new empty database on this server; its URL."""
        subprocess.run([str(self.bindir / "createdb"), "-h", str(self.directory), "-p", str(self.port),
                        "-U", self.user, name], check=True, capture_output=True)
        return self.url_of(name)

    def start(self) -> PostgresServer:
        data = self.directory / "data"
        subprocess.run([str(self.bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", self.user, "--no-sync"],
                       check=True, capture_output=True, **self._as_server_user())
        with open(self.directory / "server.log", "wb") as log:
            self.process = subprocess.Popen(
                [str(self.bindir / "postgres"), "-D", str(data), "-k", str(self.directory), "-p", str(self.port),
                 "-c", "listen_addresses=", "-c", "fsync=off"],
                stdout=subprocess.DEVNULL, stderr=log, **self._as_server_user())
        deadline = time.monotonic() + 30
        while True:
            ready = subprocess.run([str(self.bindir / "pg_isready"), "-h", str(self.directory), "-p", str(self.port)],
                                   capture_output=True)
            if ready.returncode == 0:
                break
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not start: {self.log()[-2000:]}")
            time.sleep(0.1)
        self.create_database("edgeswarm")
        return self

    def log(self) -> str:
        path = self.directory / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # fast shutdown: sessions are ended, nothing waits
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)
