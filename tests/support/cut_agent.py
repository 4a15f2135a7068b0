"""`edgeswarm ARGS` whose power is cut (SIGKILL of its whole process group) at a chosen point.

    python -m tests.support.cut_agent --watch DIR --record FILE [--cut-at N] [--from-start] -- device run --config X
    python -m tests.support.cut_agent --events FILE --cut-phase P --cut-delay S -- device run --config X
    python -m tests.support.cut_agent --events FILE --cut-file NAME --cut-nth K --cut-how torn -- device run ...

Three kinds of cut: before the Nth file move of the install path (`--cut-at`, below); S seconds
after state.json first records phase P (`--cut-phase`, a timer thread: the cut lands wherever the
agent happens to be, in a download, a hash, a patch or a child process); and during the Kth
durable write of one persisted file (`--cut-file`): `torn` cuts it mid-write (the temporary file
truncated at a random length, never renamed), `before` with the temporary file complete, `after`
once renamed but before the directory's fsync. `--events` gets one JSON line per persisted write
({"t", "file", "phase"}, phase for state.json: the pending update's, or "settled") and, last, the
cut ({"t", "cut": what}), so a run without a cut lists when each phase began.

Watched moves are the renames, links, symlinks and unlinks of names in `--watch` directories (the
install directory), the renames onto state.json and switch.json, and the removal of switch.json. Counting starts at the move
that records `installing` in state.json (the install path), or at start with `--from-start` (a
recovery). Every counted move is appended to `--record` before it happens, so a run without
`--cut-at` lists the cut points of that path. The kill takes the agent and its children (a health
command, say) at once, as a power cut would; what the page cache holds survives, as it does when
a process (not the machine) dies, which is the cut the agent's journal must survive.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import runpy
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

STATE_FILES = {"state.json", "switch.json"}
PERSISTED = STATE_FILES | {"root.json", "timestamp.json", "held.json"}  # every file the agent writes durably


def power_cut() -> None:
    os.killpg(os.getpgrp(), signal.SIGKILL)


class Events:
    """The JSON-lines log of persisted writes and of the cut (written before the kill, flushed)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.lock = threading.Lock()

    def add(self, **event: object) -> None:
        if self.path is None:
            return
        with self.lock, open(self.path, "a") as out:
            out.write(json.dumps({"t": time.monotonic(), **event}) + "\n")


def state_phase(tmp: str) -> str:
    """The phase a state.json about to be written records: its pending update's, or "settled"."""
    with open(tmp, "rb") as handle:
        pending = json.loads(handle.read()).get("pending")
    return pending["phase"] if pending else "settled"


class TimedCut:
    """A cut `delay` seconds after state.json first records `phase` (from a timer thread). Phase
    "reporting" is the update's end: the first settled state after a pending one, when the outcome
    is persisted and its report is about to go out."""

    def __init__(self, events: Events, phase: str, delay: float) -> None:
        self.events = events
        self.phase = phase
        self.delay = delay
        self.armed = False
        self.previous: str | None = None

    def entered(self, phase: str) -> None:
        reporting = phase == "settled" and self.previous not in (None, "settled")
        self.previous = phase
        if (phase == self.phase or (reporting and self.phase == "reporting")) and not self.armed:
            self.armed = True
            timer = threading.Timer(self.delay, self._cut)
            timer.daemon = True
            timer.start()

    def _cut(self) -> None:
        self.events.add(cut=f"{self.delay:.3f} s into {self.phase}")
        power_cut()


class WriteCut:
    """A cut during the `nth` durable write of `name`: torn (mid-write), before or after its rename."""

    def __init__(self, events: Events, name: str, nth: int, how: str, seed: int) -> None:
        self.events = events
        self.name = name
        self.nth = nth
        self.how = how
        self.seen = 0
        self.random = random.Random(seed)

    def before(self, tmp: str, dest: str) -> None:
        if os.path.basename(dest) != self.name:
            return
        self.seen += 1
        if self.seen != self.nth or self.how == "after":
            return
        if self.how == "torn":  # what a cut in the middle of write() leaves: a prefix, never renamed
            size = os.path.getsize(tmp)
            keep = self.random.randrange(size) if size else 0
            os.truncate(tmp, keep)
            self.events.add(cut=f"{self.name} write {self.nth} torn at {keep} of {size} bytes")
        else:
            self.events.add(cut=f"{self.name} write {self.nth} before its rename")
        power_cut()

    def after(self, dest: str) -> None:
        if os.path.basename(dest) == self.name and self.seen == self.nth and self.how == "after":
            self.events.add(cut=f"{self.name} write {self.nth} after its rename, before the directory fsync")
            power_cut()


class Filler:
    """Fills the file system of `path`, leaving `leave` bytes (the disk a log or another program
    filled while the update ran): when state.json first records `phase` (before the phase runs), or,
    with `on_file`, at the first write of that file while that phase is pending (held.json is
    written just before a fetch begins, after the check for room)."""

    def __init__(self, events: Events, path: Path, phase: str, leave: int, on_file: str | None) -> None:
        self.events = events
        self.path = path
        self.phase = phase
        self.leave = leave
        self.on_file = on_file
        self.done = False

    def written(self, name: str, phase_now: str | None) -> None:
        if phase_now == self.phase and (name == self.on_file or (self.on_file is None and name == "state.json")):
            self._fill()

    def _fill(self) -> None:
        if self.done:
            return
        self.done = True
        info = os.statvfs(self.path.parent)
        size = max(info.f_bavail * info.f_frsize - self.leave, 1)
        with open(self.path, "wb") as hog:
            os.posix_fallocate(hog.fileno(), 0, size)
        self.events.add(filled=size)


class Clock:
    """The agent's wall clock, `offset` seconds off (read from a file at every reading, so a test
    can set it or jump it while the agent runs). Only the wall clock: monotonic timers, the
    kernel's and the IPFS node's time are untouched, as when a device's RTC is wrong."""

    MODULES = ("device_client.agent", "device_client.trust_intake", "device_client.reporter", "device_client.rendezvous")

    def __init__(self, path: Path, jump_phase: str | None, jump_to: float) -> None:
        self.path = path
        self.jump_phase = jump_phase
        self.jump_to = jump_to

    def offset(self) -> float:
        try:
            return float(self.path.read_text() or 0)
        except (OSError, ValueError):
            return 0.0

    def install(self) -> None:
        import importlib
        from datetime import datetime, timedelta

        clock = self

        class SkewedDatetime(datetime):
            @classmethod
            def now(cls, tz=None):  # noqa: ANN001, ANN206
                return datetime.now(tz) + timedelta(seconds=clock.offset())

        for name in self.MODULES:
            importlib.import_module(name).datetime = SkewedDatetime  # type: ignore[attr-defined]

    def entered(self, phase: str) -> None:
        if phase == self.jump_phase:
            self.jump_phase = None
            self.path.write_text(f"{self.jump_to}\n")


class Cutter:
    def __init__(self, watch: list[Path], record: Path | None, cut_at: int | None, from_start: bool, *,
                 events: Events | None = None, timed: TimedCut | None = None, write: WriteCut | None = None,
                 fill: Filler | None = None, clock: Clock | None = None) -> None:
        self.watch = [str(p.resolve()) for p in watch]
        self.record = record
        self.cut_at = cut_at
        self.counting = from_start
        self.count = 0
        self.events = events or Events(None)
        self.timed = timed
        self.write = write
        self.fill = fill
        self.clock = clock
        self.phase_now: str | None = None  # what state.json records, as last written

    def _where(self, path: object, dir_fd: int | None) -> str:
        name = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else str(path)
        if dir_fd is not None and not os.path.isabs(name):
            return os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), name)
        return os.path.abspath(name)

    def _watched(self, where: str) -> bool:
        return os.path.dirname(where) in self.watch

    def before(self, op: str, src: object, dst: object | None, src_fd: int | None, dst_fd: int | None) -> None:
        source = self._where(src, src_fd)
        dest = self._where(dst, dst_fd) if dst is not None else None
        if op == "replace" and dest is not None and os.path.basename(dest) in PERSISTED:
            self._persisting(source, dest)
        state_write = (op == "replace" and dest is not None and os.path.basename(dest) in STATE_FILES) or (
            op == "unlink" and os.path.basename(source) == "switch.json")
        if not (state_write or self._watched(source) or (dest is not None and self._watched(dest))):
            return
        if not self.counting and state_write and os.path.basename(dest or "") == "state.json":
            self.counting = self.phase_now == "installing"  # as _persisting just read it
        if not self.counting or self.record is None:
            return
        self.count += 1
        with open(self.record, "a") as out:
            out.write(f"{self.count} {op} {os.path.basename(source)}"
                      + (f" -> {os.path.basename(dest)}" if dest else "") + "\n")
        if self.count == self.cut_at:
            power_cut()

    def _persisting(self, tmp: str, dest: str) -> None:
        name = os.path.basename(dest)
        phase = state_phase(tmp) if name == "state.json" else None
        self.events.add(file=name, phase=phase)
        if self.write is not None:
            self.write.before(tmp, dest)
        if self.timed is not None and phase is not None:
            self.timed.entered(phase)
        if phase is not None:
            self.phase_now = phase
            if self.clock is not None:
                self.clock.entered(phase)
        if self.fill is not None:
            self.fill.written(name, self.phase_now)

    def after(self, op: str, dst: object | None, dst_fd: int | None) -> None:
        if self.write is not None and op == "replace" and dst is not None:
            self.write.after(self._where(dst, dst_fd))


def install(cutter: Cutter) -> None:
    def wrap2(name: str, real: Callable[..., object]) -> Callable[..., object]:
        def moved(src, dst, *, src_dir_fd=None, dst_dir_fd=None, **kw):  # noqa: ANN001, ANN202
            cutter.before(name, src, dst, src_dir_fd, dst_dir_fd)
            result = real(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd, **kw)
            cutter.after(name, dst, dst_dir_fd)
            return result
        return moved

    def symlink(value, name, target_is_directory=False, *, dir_fd=None):  # noqa: ANN001, ANN202
        cutter.before("symlink", name, None, dir_fd, None)
        return real_symlink(value, name, target_is_directory, dir_fd=dir_fd)

    def unlink(path, *, dir_fd=None):  # noqa: ANN001, ANN202
        cutter.before("unlink", path, None, dir_fd, None)
        return real_unlink(path, dir_fd=dir_fd)

    real_symlink, real_unlink = os.symlink, os.unlink
    os.replace = wrap2("replace", os.replace)  # type: ignore[assignment]
    os.rename = wrap2("rename", os.rename)  # type: ignore[assignment]
    os.link = wrap2("link", os.link)  # type: ignore[assignment]
    os.symlink = symlink  # type: ignore[assignment]
    os.unlink = unlink  # type: ignore[assignment]
    os.remove = unlink  # type: ignore[assignment]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--watch", type=Path, action="append", default=[])
    parser.add_argument("--record", type=Path)
    parser.add_argument("--cut-at", type=int)
    parser.add_argument("--from-start", action="store_true")
    parser.add_argument("--events", type=Path)
    parser.add_argument("--cut-phase")
    parser.add_argument("--cut-delay", type=float, default=0.0)
    parser.add_argument("--cut-file", choices=sorted(PERSISTED))
    parser.add_argument("--cut-nth", type=int, default=1)
    parser.add_argument("--cut-how", choices=("torn", "before", "after"), default="before")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fill", type=Path, help="a file that fills its file system when --fill-on-phase begins")
    parser.add_argument("--fill-on-phase")
    parser.add_argument("--fill-leave", type=int, default=256 << 10)
    parser.add_argument("--fill-on-file", choices=sorted(PERSISTED))
    parser.add_argument("--clock", type=Path, help="a file holding the wall clock's offset in seconds")
    parser.add_argument("--jump-on-phase", help="set the clock's offset to --jump-to when this phase begins")
    parser.add_argument("--jump-to", type=float, default=0.0)
    parser.add_argument("args", nargs=argparse.REMAINDER)
    options = parser.parse_args()
    events = Events(options.events)
    timed = TimedCut(events, options.cut_phase, options.cut_delay) if options.cut_phase else None
    write = WriteCut(events, options.cut_file, options.cut_nth, options.cut_how, options.seed) if options.cut_file else None
    fill = Filler(events, options.fill, options.fill_on_phase, options.fill_leave, options.fill_on_file) \
        if options.fill else None
    clock = Clock(options.clock, options.jump_on_phase, options.jump_to) if options.clock else None
    if clock is not None:
        clock.install()
    install(Cutter(options.watch, options.record, options.cut_at, options.from_start,
                   events=events, timed=timed, write=write, fill=fill, clock=clock))
    sys.argv = ["edgeswarm", *[a for a in options.args if a != "--"]]
    runpy.run_module("services.cli", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
