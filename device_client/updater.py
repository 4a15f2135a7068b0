"""One update, as a state machine, from an accepted manifest to the new version installed.

    accepted ──► DOWNLOADING ──► (delta?) PATCHING ──► INSTALLING ──► DONE
                     │  │              │                   │
                     │  └─ delta fetch/patch fails ─► DOWNLOADING the full artifact
                     └──────── any other failure ───► FAILED (the working version stays)

Each phase is persisted before it starts (`LocalState.pending`), so after a power cut the agent
re-verifies the same signed manifest and resumes: downloads already verified are reused, and an
install that completed before the cut is recognised by the target's hash.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from device_client.installer import FileInstaller, sha256_file
from device_client.local_state import LocalState, PendingUpdate, StateStore
from schemas.models import Phase, ReleaseManifest
from services.content import ContentStore, FetchError
from services.delta import BadPatch, apply_delta
from services.traffic import Endpoint, TrafficMeter, received_since

log = logging.getLogger(__name__)


class UpdateFailed(Exception):
    """An update that cannot succeed as signed; `phase` is REFUSED when the bytes themselves are rejected."""

    def __init__(self, code: str, reason: str, phase: Phase = Phase.FAILED) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.phase = phase


@dataclass
class Traffic:
    from_origin: int = 0
    from_peers: int = 0


Report = Callable[..., Awaitable[object]]


@dataclass
class UpdateContext:
    store: ContentStore
    installer: FileInstaller
    state_store: StateStore
    download_dir: Path
    meter: TrafficMeter | None
    origin: Endpoint | None
    stall_timeout: float
    fetch_deadline: float


class Updater:
    def __init__(self, ctx: UpdateContext, report: Report) -> None:
        self.ctx = ctx
        self.report = report
        self.traffic = Traffic()

    async def run(self, manifest: ManifestAndRaw, state: LocalState) -> LocalState:
        """Install `manifest`; returns the new state or raises UpdateFailed with the state unchanged."""
        m = manifest.manifest
        self.traffic = Traffic()
        started = time.monotonic()
        if self.ctx.installer.target.exists() and sha256_file(self.ctx.installer.target) == m.artifact.sha256:
            # A cut after the rename but before the state was saved: the install already happened.
            log.info("target already holds %s; committing", m.version)
            return self._commit(state, m)
        new_file = await self._obtain(manifest, state)
        self._persist(state, manifest, Phase.INSTALLING)
        await self._report(Phase.INSTALLING, state, m, progress=95)
        await asyncio.to_thread(self.ctx.installer.install, new_file)
        committed = self._commit(state, m)
        for leftover in self.ctx.download_dir.iterdir():
            leftover.unlink(missing_ok=True)
        self.elapsed_ms = int((time.monotonic() - started) * 1000)
        return committed

    async def _obtain(self, manifest: ManifestAndRaw, state: LocalState) -> Path:
        m = manifest.manifest
        result = self.ctx.download_dir / f"{m.artifact.sha256}.new"
        delta = m.deltas.get(state.installed_sha256)
        if delta is not None:
            try:
                patch = await self._download(manifest, state, delta.cid, delta.sha256, delta.size, "delta")
                self._persist(state, manifest, Phase.PATCHING)
                await self._report(Phase.PATCHING, state, m, progress=85)
                await asyncio.to_thread(
                    apply_delta, self.ctx.installer.target, patch, result, expected_size=m.artifact.size
                )
                if sha256_file(result) == m.artifact.sha256:
                    self.used_delta = True
                    return result
                log.warning("patched result does not match the manifest; fetching the full artifact")
            except (FetchError, BadPatch) as exc:
                log.warning("delta unusable (%s); fetching the full artifact", exc)
        self.used_delta = False
        return await self._download(manifest, state, m.artifact.cid, m.artifact.sha256, m.artifact.size, "full")

    async def _download(
        self, manifest: ManifestAndRaw, state: LocalState, cid: str, sha256: str, size: int, kind: str
    ) -> Path:
        m = manifest.manifest
        dest = self.ctx.download_dir / f"{sha256}.{kind}"
        if dest.exists() and sha256_file(dest) == sha256:
            return dest  # verified before a restart
        self._persist(state, manifest, Phase.DOWNLOADING)
        await self._report(Phase.DOWNLOADING, state, m, progress=0)
        before = self.ctx.meter.snapshot() if self.ctx.meter else {}

        def progress(done: int) -> None:
            if self.report_progress is not None:
                self.report_progress(int(80 * min(done, size) / max(size, 1)))

        try:
            await self.ctx.store.fetch(
                cid, dest, max_bytes=size, stall_timeout=self.ctx.stall_timeout,
                deadline=self.ctx.fetch_deadline, progress=progress,
            )
        finally:
            self._count_traffic(before)
        await self._report(Phase.VERIFYING, state, m, progress=80)
        actual_size = dest.stat().st_size
        actual = await asyncio.to_thread(sha256_file, dest)
        if actual_size != size or actual != sha256:
            dest.unlink(missing_ok=True)
            raise UpdateFailed(
                "hash_mismatch",
                f"{kind} {cid} has sha256 {actual[:12]}… and {actual_size} bytes; the manifest says {sha256[:12]}… and {size}",
                Phase.REFUSED,
            )
        return dest

    report_progress: Callable[[int], None] | None = None
    used_delta: bool = False
    elapsed_ms: int = 0

    def _count_traffic(self, before: dict) -> None:
        if self.ctx.meter is None:
            return
        for remote, received in received_since(before, self.ctx.meter.snapshot()).items():
            if self.ctx.origin is not None and remote == self.ctx.origin:
                self.traffic.from_origin += received
            else:
                self.traffic.from_peers += received

    def _persist(self, state: LocalState, manifest: ManifestAndRaw, phase: Phase) -> None:
        attempts = state.pending.attempts if state.pending else 0
        state.pending = PendingUpdate(envelope=manifest.raw.decode(), phase=phase, attempts=attempts)
        self.ctx.state_store.save(state)

    def _commit(self, state: LocalState, m: ReleaseManifest) -> LocalState:
        new = LocalState(
            installed_version=m.version, installed_sha256=m.artifact.sha256, last_sequence=m.sequence, pending=None
        )
        self.ctx.state_store.save(new)
        return new

    async def _report(self, phase: Phase, state: LocalState, m: ReleaseManifest, *, progress: int) -> None:
        await self.report(phase=phase, target_version=m.version, progress=progress)


@dataclass(frozen=True)
class ManifestAndRaw:
    manifest: ReleaseManifest
    raw: bytes
