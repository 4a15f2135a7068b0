"""Which releases a device keeps serving to its peers, and which it lets go: a pure rule, no I/O.

A device keeps what it fetched so that later devices pull from it, but its disk is small. It
keeps the content of the newest `keep_releases` releases it holds (the installed one is always
among them while it fits), and drops older ones first until the rest fits `budget_bytes`. A
release bigger than the whole budget is not kept at all: the device then serves nothing of it,
which costs the swarm a seeder but never the device its disk.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class HeldRelease(BaseModel):
    """Content of one release in the device's blockstore: what it fetched for it (delta or full)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    sequence: int
    version: str
    cids: tuple[str, ...]
    size: int = Field(ge=0)  # signed sizes of those items: what keeping them costs on disk


def releases_to_drop(
    held: list[HeldRelease], *, installed_sequence: int, keep_releases: int, budget_bytes: int | None
) -> list[HeldRelease]:
    """The held releases to unpin and sweep, oldest first."""
    newest_first = sorted(held, key=lambda r: r.sequence, reverse=True)
    # A release newer than the installed one is an update under way (or one refused and retried):
    # its blocks are what the next attempt resumes from.
    kept = [r for r in newest_first if r.sequence > installed_sequence]
    older = [r for r in newest_first if r.sequence <= installed_sequence]
    kept += older[:keep_releases]
    dropped = older[keep_releases:]
    if budget_bytes is not None:
        while kept and sum(r.size for r in kept) > budget_bytes:
            dropped.append(kept.pop())  # the oldest of what is left
    return sorted(dropped, key=lambda r: r.sequence)
