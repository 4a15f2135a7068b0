"""The device's persistent state, written atomically so that a power cut leaves the old or the new file."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from schemas.models import Phase
from services.runtime.files import atomic_write, read_capped

MAX_STATE_BYTES = 1 << 20  # a pending envelope is at most 64 KiB


class PendingUpdate(BaseModel):
    """An accepted release not yet installed: persisted before each phase so a restart resumes it."""

    model_config = ConfigDict(extra="forbid")
    envelope: str  # the signed release exactly as received; re-verified on resume
    phase: Phase
    attempts: int = 0


class LocalState(BaseModel):
    model_config = ConfigDict(extra="forbid")
    installed_version: str
    installed_sha256: str
    last_sequence: int = 0
    timestamp_version: int = 0  # floor for timestamps: never lowered, except by a key revocation in root
    rolled_back_sequence: int = 0  # a release that failed its install or health check is not retried by itself
    approved_sequence: int = 0  # a staged release this device was told to install (an install command) ...
    approved_release_sha256: str | None = None  # ... named also by its signed payload's sha256
    pending: PendingUpdate | None = None


class StateStore:
    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> LocalState | None:
        """The saved state, or None if there is none.

        Raises:
            ValueError: it is damaged (pydantic's ValidationError, too large, not JSON).
            OSError: it cannot be read.
        """
        try:
            return LocalState.model_validate_json(read_capped(self.path, MAX_STATE_BYTES))
        except FileNotFoundError:
            return None

    def save(self, state: LocalState) -> None:
        atomic_write(self.path, state.model_dump_json(indent=2).encode())
