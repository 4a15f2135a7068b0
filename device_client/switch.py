"""The switch to a new version, and its reversal, as a small journaled transaction.

`state_dir/switch.json` records the intent before any link or rename moves:

    SWITCHING     to release `sequence` (`new_sha256`), from `old_sha256`; a rollback returns to `back_to`
    ROLLING_BACK  going back to `old_sha256` (why: `reason`)
    ROLLED_BACK   the old version is active again

and it is removed only after state.json agrees with the bytes that are active (the commit, or the
rollback, saved by the state machine). So whatever moment a power cut hits, the agent finds at
start either no journal (nothing in flight) or one that says what to finish: the state machine
(`machine._started`) resumes the install when nothing moved, and otherwise rolls back, which is
idempotent (installer.py), so a second cut during recovery only means running it again. A switch
is never committed after a restart: the version that was switched to was never confirmed healthy.
"""

from __future__ import annotations

import logging
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

from schemas.errors import ReasonCode
from schemas.models import InstallSpec
from services.runtime.files import atomic_write, read_capped, set_aside

if TYPE_CHECKING:
    from device_client.installer import Installer

__all__ = ["SwitchJournal", "SwitchRecord", "SwitchStep", "Unreadable"]

log = logging.getLogger(__name__)

MAX_JOURNAL_BYTES = 64 * 1024


class SwitchStep(StrEnum):
    SWITCHING = "switching"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"


class SwitchRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    sequence: int
    version: str
    install: InstallSpec  # the handler, and for `command` the rollback argv
    old_sha256: str
    new_sha256: str
    back_to: str | None  # what the handler's rollback returns to (the A/B slot active before)
    step: SwitchStep
    reason: str | None = None  # why it is rolled back
    reason_code: ReasonCode | None = None


class Unreadable:
    """A journal that exists but cannot be read (damaged on disk): something may be in flight."""


class SwitchJournal:
    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> SwitchRecord | Unreadable | None:
        try:
            return SwitchRecord.model_validate_json(read_capped(self.path, MAX_JOURNAL_BYTES))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
            log.error("switch journal %s is damaged (%s)", self.path, str(exc)[:200])
            return Unreadable()

    def save(self, record: SwitchRecord) -> None:
        atomic_write(self.path, record.model_dump_json().encode())

    def clear(self) -> None:
        """Forget a settled switch (also a damaged journal, kept aside for a person to read)."""
        if isinstance(self.load(), Unreadable):
            set_aside(self.path)
        self.path.unlink(missing_ok=True)

    # -- the transaction, run by the Updater and the agent ------------------------------------

    def begin(self, installer: Installer, *, sequence: int, version: str, install: InstallSpec,
              old_sha256: str, new_sha256: str) -> SwitchRecord:
        """Record the intent to switch (before `installer.install` moves anything). Raises what the
        handler's `prepare` raises (a target it refuses to write through), with nothing recorded."""
        back_to = installer.prepare()
        record = SwitchRecord(sequence=sequence, version=version, install=install, old_sha256=old_sha256,
                              new_sha256=new_sha256, back_to=back_to, step=SwitchStep.SWITCHING)
        self.save(record)
        return record

    def roll_back(self, installer: Installer, record: SwitchRecord, reason: str, reason_code: ReasonCode) -> None:
        """Record that the switch is being undone, undo it, record that it was. Raises what the
        handler's rollback raises; the journal then still says ROLLING_BACK, and the next start tries again."""
        if record.step != SwitchStep.ROLLING_BACK:
            record = record.model_copy(update={"step": SwitchStep.ROLLING_BACK, "reason": reason[:500],
                                               "reason_code": reason_code})
            self.save(record)
        installer.rollback(record.back_to, record.old_sha256)
        self.save(record.model_copy(update={"step": SwitchStep.ROLLED_BACK}))

    def settle(self) -> None:
        """After state.json recorded the outcome: forget the journal, unless a rollback did not finish."""
        record = self.load()
        if isinstance(record, SwitchRecord) and record.step == SwitchStep.ROLLING_BACK:
            log.error("the rollback of %s did not finish; it is tried again at the next start", record.version)
            return
        self.clear()
