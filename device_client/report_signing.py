"""The device's signature on what it reports, and the counter that makes each report new.

The counter must only grow, across restarts and power cuts, without a disk write per report
(progress reports come several times a second). It starts at the larger of the mark saved in
the state directory and the clock in milliseconds, and the mark is saved ahead of use, a block
at a time: after a cut the device starts past every counter it may have used. A lost or
corrupt mark file falls back on the clock. Only a device that loses both (a corrupt file and a
clock back in 1970) restarts lower; its direct reports still count, and the fleet service
believes carried ones again once the counter passes the old highest (docs/security.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from schemas.models import DeviceState, PayloadType
from services.runtime.files import atomic_write
from services.runtime.keys import SigningKey

__all__ = ["ReportCounter", "ReportSigner"]

log = logging.getLogger(__name__)

BLOCK = 1024
MAX_COUNTER = 2**62


class ReportCounter:
    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time, block: int = BLOCK) -> None:
        self.path = path
        self.block = block
        saved = self._read_mark()
        self._value = max(saved, int(clock() * 1000))
        self._mark = self._value
        self._unsaved = False
        self._reserve()

    def next(self) -> int:
        self._value += 1
        if self._value >= self._mark:
            self._reserve()
        return self._value

    def _reserve(self) -> None:
        mark = min(self._value + self.block, MAX_COUNTER)
        try:
            atomic_write(self.path, f"{mark}\n".encode())  # before any counter below it is used
        except OSError as exc:
            # A full or failing disk must not stop the device reporting: the counter goes on in memory
            # (and starts from the clock after a restart); the mark is tried again at the next report.
            if not self._unsaved:
                log.warning("could not save the report counter's mark in %s (%s): going on without it", self.path, exc)
            self._unsaved = True
            return
        self._unsaved = False
        self._mark = mark

    def _read_mark(self) -> int:
        try:
            text = self.path.read_text(encoding="ascii")
        except FileNotFoundError:
            return 0
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("report counter %s unreadable (%s): starting from the clock", self.path, exc)
            return 0
        value = text.strip()
        if not value.isdigit() or not 0 < int(value) <= MAX_COUNTER:
            log.warning("report counter %s holds no counter (%r): starting from the clock", self.path, value[:40])
            return 0
        return int(value)


class ReportSigner:
    """Numbers and signs each report with the device's identity key."""

    def __init__(self, key: SigningKey, counter: ReportCounter) -> None:
        self.key = key
        self.counter = counter

    def sign(self, state: DeviceState) -> DeviceState:
        numbered = state.model_copy(update={"counter": self.counter.next(), "signature": None})
        return numbered.model_copy(update={"signature": self.key.sign(PayloadType.REPORT, numbered.signed_bytes())})
