"""The databases the fleet record lives in: SQLite (the default, one file) or PostgreSQL.

Both run the same SQL (written with `?` placeholders) through one small interface, and both
decide which fleet service is active: a service that holds the record's lock is the one that
records, rolls out and answers; a second one waits as standby and takes the lock when the first
one dies. SQLite's lock is an flock beside the file (services on one machine); PostgreSQL's is a
session advisory lock on the very connection that writes, so a service that lost its session
lost both its lock and its ability to write: it cannot record or decide behind a new active one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from schemas.errors import EdgeswarmError


class RecordUnavailable(EdgeswarmError):
    """The fleet record's database cannot be opened or was lost while this service was active."""


class Rows(Protocol):
    rowcount: int

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class RecordDatabase(Protocol):
    where: str

    def execute(self, sql: str, params: Sequence[object] = ()) -> Rows: ...

    def transaction(self, *, batch: bool = False) -> contextlib.AbstractContextManager[None]:
        """One transaction; `batch`: statements whose results are not read may be sent without waiting."""
        ...

    def json_text(self, column: str, key: str) -> str:
        """SQL for the text of `key` in the JSON object held in `column`."""
        ...

    def create(self, schema: str) -> None: ...

    def try_lead(self, name: str) -> bool:
        """Take the active service's lock for `name` if free; True while this process holds it."""
        ...

    def check_leading(self) -> None:
        """Raise RecordUnavailable if the lock taken by try_lead is no longer held."""
        ...

    def close(self) -> None: ...


class SqliteDatabase:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.where = str(path)
        self._db = sqlite3.connect(path, isolation_level=None)  # autocommit; transactions are explicit
        self._db.execute("PRAGMA journal_mode=WAL")
        # A power cut may lose the last batches, never corrupt the file: the devices' retained reports
        # bring their latest state back when the service restarts.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._locks: dict[str, int] = {}  # fleet -> the descriptor its flock is on

    def execute(self, sql: str, params: Sequence[object] = ()) -> Rows:
        return self._db.execute(sql, params)

    @contextlib.contextmanager
    def transaction(self, *, batch: bool = False) -> Iterator[None]:
        with self._db:
            self._db.execute("BEGIN")
            yield

    def json_text(self, column: str, key: str) -> str:
        return f"json_extract({column}, '$.{key}')"

    def create(self, schema: str) -> None:
        self._db.executescript(schema)

    def try_lead(self, name: str) -> bool:
        if name in self._locks:
            return True
        fd = os.open(self.path.with_name(f"{self.path.name}.{name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._locks[name] = fd
        return True

    def check_leading(self) -> None:
        pass  # an flock lasts as long as the process: there is no session to lose

    def close(self) -> None:
        self._db.close()
        for fd in self._locks.values():
            os.close(fd)
        self._locks.clear()


# Server-side keepalives of the active service's session: if its machine vanishes (power, network),
# PostgreSQL drops the session, and with it the lock, after about 5 + 2 * 2 s, so a standby elsewhere
# takes over within the 10 s the docs promise. A process that dies is noticed at once.
KEEPALIVE = {"tcp_keepalives_idle": 5, "tcp_keepalives_interval": 2, "tcp_keepalives_count": 2}


class PostgresDatabase:
    def __init__(self, url: str) -> None:
        try:
            import psycopg
        except ImportError as exc:
            raise RecordUnavailable("a PostgreSQL fleet record needs psycopg: pip install 'edgeswarm[postgres]'") from exc
        self._psycopg = psycopg
        self.url = url
        self.where = _without_password(url)
        self._conn = self._connect()
        self._leading: set[str] = set()

    def _connect(self) -> Any:
        try:
            conn = self._psycopg.connect(self.url, autocommit=True, connect_timeout=10)
            for setting, value in KEEPALIVE.items():
                conn.execute(f"SET {setting} = {int(value)}")
        except self._psycopg.Error as exc:
            raise RecordUnavailable(f"the fleet record {self.where} cannot be opened: {exc}".strip()) from exc
        return conn

    def execute(self, sql: str, params: Sequence[object] = ()) -> Rows:
        try:
            return self._conn.execute(sql.replace("?", "%s"), params)
        except self._psycopg.OperationalError as exc:
            raise RecordUnavailable(f"lost the fleet record {self.where}: {exc}".strip()) from exc

    @contextlib.contextmanager
    def transaction(self, *, batch: bool = False) -> Iterator[None]:
        try:
            # Pipeline mode: a statement goes out at once and only a result that is read waits for the server.
            with self._conn.pipeline() if batch else contextlib.nullcontext(), self._conn.transaction():
                yield
        except self._psycopg.OperationalError as exc:
            raise RecordUnavailable(f"lost the fleet record {self.where}: {exc}".strip()) from exc

    def json_text(self, column: str, key: str) -> str:
        return f"(({column})::json ->> '{key}')"

    def create(self, schema: str) -> None:
        # Two services starting at once would race on CREATE TABLE IF NOT EXISTS; one creates at a time.
        with self.transaction():
            self.execute("SELECT pg_advisory_xact_lock(?)", (_lock_key("schema"),))
            for statement in schema.split(";"):
                if statement.strip():
                    self.execute(statement)

    def try_lead(self, name: str) -> bool:
        if name in self._leading:
            return True
        if not self._leading and (self._conn.broken or self._conn.closed):
            # A standby holds no lock, so a new session loses nothing: it waits on through a database restart.
            with contextlib.suppress(RecordUnavailable):
                self._conn = self._connect()
            if self._conn.broken or self._conn.closed:
                return False
        try:
            taken = bool(self.execute("SELECT pg_try_advisory_lock(?)", (_lock_key(name),)).fetchone()[0])
        except RecordUnavailable:
            if self._leading:
                raise  # the session that held the other locks is gone: so are they
            return False
        if taken:
            self._leading.add(name)
        return taken

    def check_leading(self) -> None:
        if self._leading:
            # The lock is the session's: while a query on it succeeds, the session and the lock are alive.
            self.execute("SELECT 1")

    def close(self) -> None:
        self._conn.close()  # the session ends, and its advisory locks with it
        self._leading.clear()


def _lock_key(name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"edgeswarm fleet record: {name}".encode()).digest()[:8], "big", signed=True)


def _without_password(url: str) -> str:
    """The URL as logs and errors may show it."""
    url = re.sub(r"(password=)[^&\s]*", r"\1***", url)
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return url
    credentials, host = rest.split("@", 1)
    return f"{scheme}://{credentials.split(':', 1)[0]}@{host}"
