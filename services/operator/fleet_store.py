"""The fleet record: latest state per device and the history of update attempts; survives restarts.

An attempt opens when a device starts working on a target version (downloading, verifying,
patching, installing, confirming) and closes when it reports done, failed, refused or
rolled_back for that version. A refusal before any download is a closed attempt of its own.

The record is a SQLite file by default or a PostgreSQL database (record_database: the same SQL,
and the lock that makes one fleet service active and another one its standby).

Reports are written in batches (`record`, one transaction each): a fleet of thousands reports in
bursts, and a commit per report is a WAL sync per report.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from schemas.errors import EdgeswarmError
from schemas.models import DeviceState, Phase
from services.operator.fleet import Heard, StatusLine, describe_heard
from services.operator.record_database import PostgresDatabase, RecordDatabase, SqliteDatabase

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device TEXT PRIMARY KEY,
    device_class TEXT,
    installed_version TEXT,
    installed_sha256 TEXT,
    phase TEXT,
    progress INTEGER,
    target_version TEXT,
    online INTEGER,
    last_seen TEXT,
    last_error TEXT,
    state_at TEXT,
    state_json TEXT
);
CREATE TABLE IF NOT EXISTS attempts (
    id {id_column},
    device TEXT NOT NULL,
    target_version TEXT NOT NULL,
    started TEXT NOT NULL,
    finished TEXT,
    outcome TEXT,
    reason TEXT,
    used_delta INTEGER,
    bytes_from_origin BIGINT,
    bytes_from_peers BIGINT,
    millis BIGINT
);
CREATE INDEX IF NOT EXISTS attempts_by_device ON attempts(device, id);
CREATE INDEX IF NOT EXISTS devices_by_class ON devices(device_class, device);
CREATE TABLE IF NOT EXISTS heard (
    device TEXT PRIMARY KEY,
    relayed_by TEXT,
    heard_at TEXT,
    top_counter BIGINT
);
CREATE TABLE IF NOT EXISTS rollouts (
    device_class TEXT PRIMARY KEY,
    rollout_json TEXT NOT NULL,
    updated TEXT NOT NULL
);
"""
SCHEMAS = {SqliteDatabase: SCHEMA.format(id_column="INTEGER PRIMARY KEY AUTOINCREMENT"),
           PostgresDatabase: SCHEMA.format(id_column="BIGSERIAL PRIMARY KEY")}

WORKING = {Phase.DOWNLOADING, Phase.VERIFYING, Phase.PATCHING, Phase.INSTALLING, Phase.CONFIRMING}
ENDED = {Phase.DONE: "done", Phase.FAILED: "failed", Phase.REFUSED: "refused", Phase.ROLLED_BACK: "rolled_back"}


@dataclass(frozen=True)
class DeviceRow:
    device: str
    device_class: str | None
    installed_version: str | None
    phase: str | None
    progress: int | None
    target_version: str | None
    online: bool | None
    last_seen: str | None
    last_error: str | None


ROW_COLUMNS = "device, device_class, installed_version, phase, progress, target_version, online, last_seen, last_error"


def _device_row(r: tuple) -> DeviceRow:
    return DeviceRow(r[0], r[1], r[2], r[3], r[4], r[5], None if r[6] is None else bool(r[6]), r[7], r[8])


@dataclass(frozen=True)
class OnlineSeen:
    """A device's online flag changed (its retained `online` topic), seen at `seen`."""

    device: str
    online: bool
    seen: datetime


@dataclass(frozen=True)
class ReportHeard:
    """A report as the fleet service heard it: how (direct or carried by a peer), and the counter it
    believed (a verified signature's), which only raises the device's highest: a carried report at or
    below it is a replay (services.operator.report_trust)."""

    state: DeviceState
    heard: Heard
    believed_counter: int | None = None


@dataclass(frozen=True)
class Attempt:
    target_version: str
    started: str
    finished: str | None
    outcome: str | None
    reason: str | None
    used_delta: bool | None
    bytes_from_origin: int | None
    bytes_from_peers: int | None
    millis: int | None


class FleetStore:
    def __init__(self, database: RecordDatabase) -> None:
        self._db = database
        self.where = database.where
        database.create(SCHEMAS[type(database)])

    @classmethod
    def sqlite(cls, path: Path) -> FleetStore:
        return cls(SqliteDatabase(path))

    @classmethod
    def postgres(cls, url: str) -> FleetStore:
        return cls(PostgresDatabase(url))

    def close(self) -> None:
        self._db.close()

    def try_lead(self, fleet: str) -> bool:
        """Become the fleet's active service if no other one is (see record_database)."""
        return self._db.try_lead(fleet)

    def check_leading(self) -> None:
        """Raises RecordUnavailable once this service can no longer be the active one."""
        self._db.check_leading()

    def record(self, updates: Sequence[DeviceState | ReportHeard | OnlineSeen]) -> int:
        """Record reports and online changes in their order, in one transaction; returns how many
        reports were newer than the device's last one (the others are retained copies, replayed)."""
        recorded = 0
        with self._db.transaction(batch=True):
            for update in updates:
                if isinstance(update, OnlineSeen):
                    self._online(update)
                elif isinstance(update, ReportHeard):
                    newer = self._state(update.state)
                    recorded += newer
                    self._heard(update, newer)
                else:
                    recorded += self._state(update)
        return recorded

    def record_state(self, state: DeviceState) -> bool:
        """Record one report; False when it is not newer than the last one."""
        return self.record([state]) == 1

    def _state(self, state: DeviceState) -> bool:
        # One statement decides and writes (only a newer report updates the row, and only then is a row
        # returned); the attempt statements need no answer, so a PostgreSQL batch sends them without
        # waiting: one round trip per report instead of four.
        seen = state.timestamp.astimezone(UTC).isoformat()
        error = f"{state.reason_code}: {state.reason}" if state.phase in (Phase.FAILED, Phase.REFUSED, Phase.ROLLED_BACK) else None
        newer = self._db.execute(
            """INSERT INTO devices (device, device_class, installed_version, installed_sha256, phase, progress,
                   target_version, last_seen, last_error, state_at, state_json)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT(device) DO UPDATE SET device_class=excluded.device_class,
                   installed_version=excluded.installed_version, installed_sha256=excluded.installed_sha256,
                   phase=excluded.phase, progress=excluded.progress, target_version=excluded.target_version,
                   last_seen=excluded.last_seen, last_error=COALESCE(excluded.last_error, devices.last_error),
                   state_at=excluded.state_at, state_json=excluded.state_json
               WHERE devices.state_at IS NULL OR excluded.state_at > devices.state_at
               RETURNING device""",
            (state.device, state.device_class, state.installed_version, state.installed_sha256, state.phase.value,
             state.progress, state.target_version, seen, error, seen, state.model_dump_json()),
        ).fetchone()
        if newer is None:
            return False
        if state.target_version is None or (state.phase not in WORKING and state.phase not in ENDED):
            return True
        # An attempt opens with the first report of work on a target, or with its end if no work was seen.
        self._db.execute(
            """INSERT INTO attempts (device, target_version, started) SELECT ?, ?, ?
               WHERE NOT EXISTS (SELECT 1 FROM attempts WHERE device=? AND target_version=? AND finished IS NULL)""",
            (state.device, state.target_version, seen, state.device, state.target_version))
        if state.phase in ENDED:
            self._db.execute(
                """UPDATE attempts SET finished=?, outcome=?, reason=?, used_delta=?, bytes_from_origin=?,
                       bytes_from_peers=?, millis=?
                   WHERE id=(SELECT id FROM attempts WHERE device=? AND target_version=? AND finished IS NULL
                             ORDER BY id DESC LIMIT 1)""",
                (seen, ENDED[state.phase], state.reason, _int(state.used_delta), state.bytes_from_origin,
                 state.bytes_from_peers, state.update_millis, state.device, state.target_version),
            )
        return True

    def _heard(self, update: ReportHeard, newer: bool) -> None:
        if newer:
            self._db.execute(
                """INSERT INTO heard (device, relayed_by, heard_at) VALUES (?, ?, ?)
                   ON CONFLICT(device) DO UPDATE SET relayed_by=excluded.relayed_by, heard_at=excluded.heard_at""",
                (update.state.device, update.heard.relayed_by, update.heard.at.astimezone(UTC).isoformat()))
        if update.believed_counter is not None:
            self._db.execute(
                """INSERT INTO heard (device, top_counter) VALUES (?, ?)
                   ON CONFLICT(device) DO UPDATE SET top_counter=CASE
                       WHEN heard.top_counter IS NULL OR excluded.top_counter > heard.top_counter
                       THEN excluded.top_counter ELSE heard.top_counter END""",
                (update.state.device, update.believed_counter))

    def relayed_devices(self) -> dict[str, datetime]:
        """Devices whose latest recorded report a peer carried, with that report's time."""
        rows = self._db.execute("""SELECT h.device, d.state_at FROM heard h JOIN devices d ON d.device = h.device
                                   WHERE h.relayed_by IS NOT NULL AND d.state_at IS NOT NULL""").fetchall()
        return {device: datetime.fromisoformat(at) for device, at in rows}

    def top_counters(self) -> dict[str, int]:
        """The highest report counter believed for each device (kept after a device is retired: an old
        report of it carried again is still a replay)."""
        rows = self._db.execute("SELECT device, top_counter FROM heard WHERE top_counter IS NOT NULL").fetchall()
        return {device: int(counter) for device, counter in rows}

    def _online(self, update: OnlineSeen) -> None:
        self._db.execute(
            """INSERT INTO devices (device, online, last_seen) VALUES (?, ?, ?)
               ON CONFLICT(device) DO UPDATE SET online=excluded.online,
                   last_seen=CASE WHEN excluded.online <> 0 THEN excluded.last_seen ELSE devices.last_seen END""",
            (update.device, int(update.online), update.seen.isoformat()),
        )

    def retire(self, device: str) -> bool:
        """Forget a decommissioned device (its attempts stay, for the record); False if unknown."""
        with self._db.transaction():
            return self._db.execute("DELETE FROM devices WHERE device=?", (device,)).rowcount > 0

    def save_rollout(self, device_class: str, rollout_json: str) -> None:
        with self._db.transaction():
            self._db.execute(
                """INSERT INTO rollouts (device_class, rollout_json, updated) VALUES (?, ?, ?)
                   ON CONFLICT(device_class) DO UPDATE SET rollout_json=excluded.rollout_json, updated=excluded.updated""",
                (device_class, rollout_json, datetime.now(UTC).isoformat()),
            )

    def rollouts(self) -> dict[str, str]:
        """device class -> the JSON of its latest rollout."""
        return dict(self._db.execute("SELECT device_class, rollout_json FROM rollouts").fetchall())

    def devices(self) -> list[DeviceRow]:
        rows = self._db.execute(f"SELECT {ROW_COLUMNS} FROM devices ORDER BY device_class, device").fetchall()
        return [_device_row(r) for r in rows]

    def device(self, device: str) -> DeviceRow | None:
        r = self._db.execute(f"SELECT {ROW_COLUMNS} FROM devices WHERE device=?", (device,)).fetchone()
        return None if r is None else _device_row(r)

    def status_lines(self) -> list[StatusLine]:
        """Every device as `fleet status` shows it, from the record's columns: no report is parsed
        (100,000 of them took longer than the 2 s `fleet status` may take)."""
        rows = self._db.execute(
            f"""SELECT d.device, d.online, d.device_class, d.installed_version, d.phase, d.progress,
                       {self._db.json_text('d.state_json', 'reason')}, d.state_at, h.relayed_by, h.heard_at,
                       {self._db.json_text('d.state_json', 'tunnel_via')}
                FROM devices d LEFT JOIN heard h ON h.device = d.device ORDER BY d.device""").fetchall()
        return [StatusLine(device, None if online is None else bool(online), device_class or "?", installed, phase,
                           progress, reason, datetime.fromisoformat(at) if at else None,
                           _heard_text(phase, relayed_by, tunnel_via),
                           datetime.fromisoformat(heard_at) if heard_at and relayed_by else None)
                for device, online, device_class, installed, phase, progress, reason, at, relayed_by, heard_at, tunnel_via
                in rows]

    def reports_json(self) -> list[RecordedReport]:
        """Every device's latest report as the JSON it was recorded in, with its online flag and how it was
        heard: what `fleet status --json` prints, without parsing 100,000 reports to print them again."""
        rows = self._db.execute(
            f"""SELECT d.device, d.state_json, d.online, h.relayed_by, h.heard_at,
                       {self._db.json_text('d.state_json', 'tunnel_via')}
               FROM devices d LEFT JOIN heard h ON h.device = d.device ORDER BY d.device""").fetchall()
        return [RecordedReport(device, state, None if online is None else bool(online),
                               _heard_text(state, relayed_by, tunnel_via), at if relayed_by else None)
                for device, state, online, relayed_by, at, tunnel_via in rows]

    def attempts(self, device: str) -> list[Attempt]:
        rows = self._db.execute(
            """SELECT target_version, started, finished, outcome, reason, used_delta, bytes_from_origin,
                      bytes_from_peers, millis FROM attempts WHERE device=? ORDER BY id""", (device,)
        ).fetchall()
        return [Attempt(r[0], r[1], r[2], r[3], r[4], None if r[5] is None else bool(r[5]), r[6], r[7], r[8]) for r in rows]


@dataclass(frozen=True)
class RecordedReport:
    device: str
    state_json: str | None
    online: bool | None
    heard: str | None  # "direct", "tunnel via <peer>" or "relayed by <peer>"; None before its first report
    heard_at: str | None  # when a peer's copy reached the service (a direct report's time is its own)


def _heard_text(reported: object, relayed_by: str | None, tunnel_via: str | None) -> str | None:
    """How a device's latest recorded report was heard: None before it reported."""
    return None if reported is None else describe_heard(relayed_by, tunnel_via)


def _int(value: bool | None) -> int | None:
    return None if value is None else int(value)


class RecordMissing(EdgeswarmError):
    """No fleet record exists yet where the settings point."""


def open_fleet_store(database: str | None, home: Path, *, must_exist: bool = False) -> FleetStore:
    """The fleet record the settings name: PostgreSQL at `database` (a postgresql:// URL), else
    <home>/fleet.sqlite. `must_exist`: a reader's question, not to be answered by creating an empty one."""
    if database is not None:
        return FleetStore.postgres(database)
    path = home / "fleet.sqlite"
    if must_exist and not path.exists():
        raise RecordMissing(f"{path} does not exist: `edgeswarm fleet serve` records the fleet there")
    return FleetStore.sqlite(path)


def versions_of_class(database: str | None, home: Path, device_class: str) -> dict[str, int]:
    """How many tracked devices of the class run each version (empty before `fleet serve` recorded any):
    the release pipeline makes deltas from the versions most devices run."""
    try:
        store = open_fleet_store(database, home, must_exist=True)
    except RecordMissing:
        return {}
    try:
        return dict(Counter(d.installed_version for d in store.devices()
                            if d.device_class == device_class and d.installed_version))
    finally:
        store.close()
