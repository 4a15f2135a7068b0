"""One update's I/O, from an accepted manifest to the new version installed and confirmed.

    accepted ──► DOWNLOADING ──► VERIFYING ──► (delta?) PATCHING ──► INSTALLING ──► DONE
                     │  │            │                │
                     │  │            └─ wrong bytes ──┴────────────► REFUSED (hash_mismatch, decrypt_failed)
                     │  └─ delta fetch or patch unusable ─► DOWNLOADING the full artifact
                     └──────── fetch failed ───────────► FAILED, retried later (the working version stays)

The Updater does the I/O of one update and nothing else: before each phase it calls `enter`, and
the agent records the phase (the state machine's `PhaseEntered`, persisted before the phase starts)
and reports it. So after a power cut the agent re-verifies the same signed manifest and resumes:
downloads already verified are reused. The switch itself is journaled (switch.py): an install a
cut interrupted is finished by a rollback at start, never committed without its health check.
Whatever stops an install after the intent is recorded, the old version goes back in place. It
raises `UpdateError` (or a content/OS error) and never changes the agent's state itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from device_client.content_keeper import ContentKeeper
from device_client.disk_room import room_needed, shortfalls
from device_client.health import wait_healthy
from device_client.installer import Installer, InstallError, installer_for, sha256_file
from device_client.switch import SwitchJournal, SwitchRecord
from schemas.errors import EdgeswarmError, ReasonCode
from schemas.models import Artifact, Delta, Phase, ReleaseManifest
from services.runtime.confidential import DecryptError, decrypt_file
from services.runtime.content import ContentStore, FetchError
from services.runtime.delta import BadPatch, apply_delta
from services.runtime.settings import InstallSettings
from services.runtime.traffic import Endpoint, TrafficMeter, on_link, received_since

log = logging.getLogger(__name__)


class DiskFull(EdgeswarmError):
    """No room for the update: found before anything was fetched (`spent` False: the attempt is not
    counted, the device just waits for room), or when a write ran out of space on the way."""

    def __init__(self, reason: str, *, spent: bool) -> None:
        super().__init__(reason, code=ReasonCode.DISK_FULL)
        self.reason = reason
        self.spent = spent


class UpdateError(EdgeswarmError):
    """An update that cannot succeed as signed; `phase` is REFUSED when the bytes themselves are rejected,
    ROLLED_BACK when it was installed and then undone."""

    def __init__(self, code: ReasonCode, reason: str, phase: Phase = Phase.FAILED) -> None:
        super().__init__(reason, code=code)
        self.reason = reason
        self.phase = phase


@dataclass
class Traffic:
    from_origin: int = 0
    from_peers: int = 0
    from_lan_peers: int = 0  # part of from_peers
    peers_direct: int | None = None  # connections when the last fetch ended
    peers_relayed: int | None = None


@dataclass
class UpdateContext:
    store: ContentStore
    target: Path
    journal: SwitchJournal  # the switch's intent, recorded before anything moves (switch.py)
    download_dir: Path
    meter: TrafficMeter | None
    origin: Endpoint | None
    stall_timeout: float
    fetch_deadline: float
    class_key: bytes | None = None
    install: InstallSettings = field(default_factory=InstallSettings)
    origin_peer: str | None = None  # dialed only after `origin_grace` s without progress from peers
    origin_grace: float | None = None
    keeper: ContentKeeper | None = None  # records what lands in the blockstore, to sweep it later


EnterPhase = Callable[[Phase, int], Awaitable[object]]  # (phase, progress %): record and report it


class Updater:
    def __init__(self, ctx: UpdateContext, enter: EnterPhase, progress: Callable[[int], None] | None = None) -> None:
        self.ctx = ctx
        self.enter = enter
        self.progress = progress
        self.traffic = Traffic()
        self.used_delta = False
        self.elapsed_ms = 0
        self._origin_connected = False  # this fetch dialed the origin (peers did not deliver in time)

    async def run(self, m: ReleaseManifest, installed_sha256: str) -> None:
        """Install `m` over the version whose hash is `installed_sha256`, and confirm its health.

        Raises:
            UpdateError: refused (wrong bytes, handler not allowed) or rolled back (install or health
                check failed); the working version is in place.
            FetchError: the content could not be fetched (stalled, deadline, too large).
            OSError: the device's disk or files failed.
        """
        started = time.monotonic()
        if m.install.handler not in self.ctx.install.allowed_handlers:
            raise UpdateError(ReasonCode.HANDLER_NOT_ALLOWED,
                              f"install handler {m.install.handler!r} is not allowed on this device", Phase.REFUSED)
        short = self._short_of_room(m, installed_sha256)
        if short:
            raise DiskFull(f"not enough room for {m.version}: {short}; the working version stays", spent=False)
        try:
            new_file = await self._obtain(m, installed_sha256)
        except FetchError as exc:  # the node reports a full disk as a failed fetch: tell them apart
            short = self._short_of_room(m, installed_sha256)
            if short:
                raise DiskFull(f"{exc}: ran out of room ({short})", spent=True) from None
            raise
        installer = installer_for(m.install, self.ctx.target, command_timeout=self.ctx.install.command_timeout)
        await self.enter(Phase.INSTALLING, 95)
        try:
            record = await asyncio.to_thread(
                self.ctx.journal.begin, installer, sequence=m.sequence, version=m.version, install=m.install,
                old_sha256=installed_sha256, new_sha256=m.artifact.installed_sha256)
        except InstallError as exc:  # the handler refuses this target (unsafe_path): nothing recorded, nothing moved
            raise UpdateError(exc.code, str(exc), Phase.FAILED) from None
        try:
            await asyncio.to_thread(installer.install, new_file)
        except Exception as exc:  # noqa: BLE001 - whatever stopped the install, the old version goes back in place
            code = exc.code if isinstance(exc, InstallError) else ReasonCode.IO_ERROR if isinstance(exc, OSError) \
                else ReasonCode.INTERNAL_ERROR
            problem = await self._roll_back(installer, record, f"install failed: {exc}", code)
            if isinstance(exc, OSError) and problem is None:
                raise  # the disk failed, and nothing changed: worth another attempt
            raise UpdateError(code, f"{exc}{problem or ''}", Phase.ROLLED_BACK) from None
        await self.enter(Phase.CONFIRMING, 97)
        healthy, why = await wait_healthy(self.ctx.install)
        if not healthy:
            problem = await self._roll_back(installer, record, why, ReasonCode.HEALTH_CHECK_FAILED)
            raise UpdateError(ReasonCode.HEALTH_CHECK_FAILED, f"{why}{problem or ''}", Phase.ROLLED_BACK)
        for leftover in self.ctx.download_dir.iterdir():
            leftover.unlink(missing_ok=True)
        self.elapsed_ms = int((time.monotonic() - started) * 1000)

    def _short_of_room(self, m: ReleaseManifest, installed_sha256: str) -> str | None:
        download_dir = self.ctx.download_dir
        partial = {p: p.stat().st_size for p in download_dir.iterdir() if p.is_file()}
        short = shortfalls(room_needed(m, installed_sha256, download_dir, self.ctx.target, partial))
        return "; ".join(str(s) for s in short) or None

    async def _roll_back(self, installer: Installer, record: SwitchRecord, reason: str, code: ReasonCode) -> str | None:
        """Undo the switch; a problem doing so is returned for the report (the journal keeps the
        rollback pending, and the next start tries again)."""
        try:
            await asyncio.to_thread(self.ctx.journal.roll_back, installer, record, reason, code)
        except Exception as exc:  # noqa: BLE001 - reported, and retried at the next start
            log.error("rollback of %s failed: %s", record.version, exc)
            return f"; the rollback failed too: {exc}"
        return None

    async def _obtain(self, m: ReleaseManifest, installed_sha256: str) -> Path:
        delta = m.deltas.get(installed_sha256)
        if delta is not None:
            result = self.ctx.download_dir / f"{m.artifact.installed_sha256}.patched"
            try:
                patch = await self._fetch_verified(m, delta, "delta")
                await self.enter(Phase.PATCHING, 85)
                await asyncio.to_thread(apply_delta, self.ctx.target, patch, result, expected_size=m.artifact.installed_size)
                if sha256_file(result) == m.artifact.installed_sha256:
                    self.used_delta = True
                    return result
                log.warning("patched result does not match the manifest; fetching the full artifact")
            except (FetchError, BadPatch) as exc:
                log.warning("delta unusable (%s); fetching the full artifact", exc)
        self.used_delta = False
        return await self._fetch_verified(m, m.artifact, "full")

    async def _fetch_verified(self, m: ReleaseManifest, item: Artifact | Delta, kind: str) -> Path:
        """Download `item`, check the signed sha256 and size of what travelled, then reveal the plaintext."""
        dest = self.ctx.download_dir / f"{item.sha256}.{kind}"
        if not (dest.exists() and sha256_file(dest) == item.sha256):  # else verified before a restart
            await self._download(m, item, dest)
            await self.enter(Phase.VERIFYING, 80)
            actual_size = dest.stat().st_size
            actual = await asyncio.to_thread(sha256_file, dest)
            if actual_size != item.size or actual != item.sha256:
                dest.unlink(missing_ok=True)
                raise UpdateError(
                    ReasonCode.HASH_MISMATCH,
                    f"{kind} {item.cid} has sha256 {actual[:12]}… and {actual_size} bytes; the manifest says "
                    f"{item.sha256[:12]}… and {item.size}",
                    Phase.REFUSED,
                )
        if self.ctx.keeper is not None:
            await self.ctx.store.pin(item.cid)  # complete and as signed: serve it to peers from now on
        return await asyncio.to_thread(self._reveal, dest, item, kind)

    def _reveal(self, path: Path, item: Artifact | Delta, kind: str) -> Path:
        if item.encryption is None:
            return path
        if self.ctx.class_key is None:
            raise UpdateError(ReasonCode.NO_CLASS_KEY, f"the {kind} is encrypted and this device has no class key", Phase.REFUSED)
        plain = path.with_name(path.name + ".plain")
        try:
            opened = decrypt_file(self.ctx.class_key, path, plain)
        except DecryptError as exc:
            plain.unlink(missing_ok=True)
            raise UpdateError(exc.code, f"{kind}: {exc}", Phase.REFUSED) from None
        if (opened.plain_sha256, opened.plain_size) != (item.encryption.plain_sha256, item.encryption.plain_size):
            plain.unlink(missing_ok=True)
            raise UpdateError(ReasonCode.HASH_MISMATCH, f"decrypted {kind} does not match the signed plaintext hash", Phase.REFUSED)
        return plain

    async def _download(self, m: ReleaseManifest, item: Artifact | Delta, dest: Path) -> None:
        await self.enter(Phase.DOWNLOADING, 0)
        before = self.ctx.meter.snapshot() if self.ctx.meter else {}

        last_growth = [time.monotonic(), -1]

        def progress(done: int) -> None:
            if done > last_growth[1]:
                last_growth[:] = [time.monotonic(), done]
            if self.progress is not None:
                self.progress(int(80 * min(done, item.size) / max(item.size, 1)))

        if self.ctx.keeper is not None:
            self.ctx.keeper.hold(m.sequence, m.version, item.cid, item.size)
        self._origin_connected = False
        watchdog = asyncio.ensure_future(self._dial_origin_when_stalled(last_growth))
        try:
            await self.ctx.store.fetch(
                item.cid, dest, max_bytes=item.size, stall_timeout=self.ctx.stall_timeout,
                deadline=self.ctx.fetch_deadline, progress=progress,
            )
        finally:
            watchdog.cancel()
            self._count_traffic(before)
            await self._count_connections()
        if self._origin_connected and self.ctx.origin_peer is not None:
            # An origin serves few devices at once: with all of it here (and served to peers from
            # now on), the slot goes to the next device that no peer can serve.
            log.info("fetch complete: leaving the origin to the next device")
            await self.ctx.store.hang_up(self.ctx.origin_peer)

    async def _dial_origin_when_stalled(self, last_growth: list) -> None:  # noqa: ANN001
        """Peers first: the origin is dialed only once they delivered nothing for the grace period, and
        again after every further grace period without progress (a busy origin refuses some dials).

        Once peers delivered something they get longer (half the stall timeout): measured with 20
        devices, a seeding peer's one-second restart sent a device to the origin for the rest of the
        artifact (1.45x origin egress instead of 1.0x)."""
        if self.ctx.origin_peer is None or self.ctx.origin_grace is None:
            return
        while True:
            patience = origin_patience(self.ctx.origin_grace, self.ctx.stall_timeout,
                                       peers_delivered=last_growth[1] > 0 and not self._origin_connected)
            if time.monotonic() - last_growth[0] < patience:
                await asyncio.sleep(0.1)
                continue
            log.info("no progress from peers for %.1f s: dialing the origin", patience)
            if await self.ctx.store.connect(self.ctx.origin_peer):
                self._origin_connected = True
            else:
                log.info("the origin did not take the connection (busy?); asking again later")
            last_growth[0] = time.monotonic()

    async def _count_connections(self) -> None:
        connections = await asyncio.to_thread(self.ctx.store.peers)
        relayed = sum("/p2p-circuit" in address for address in connections)
        self.traffic.peers_direct, self.traffic.peers_relayed = len(connections) - relayed, relayed

    def _count_traffic(self, before: dict) -> None:
        if self.ctx.meter is None:
            return
        for remote, received in received_since(before, self.ctx.meter.snapshot()).items():
            if self.ctx.origin is not None and remote == self.ctx.origin:
                self.traffic.from_origin += received
            else:
                self.traffic.from_peers += received
                if on_link(remote[0]):
                    self.traffic.from_lan_peers += received


def origin_patience(grace: float, stall_timeout: float, *, peers_delivered: bool) -> float:
    """Seconds without progress before a device dials the origin (again)."""
    return max(grace, stall_timeout / 2) if peers_delivered else grace
