"""`edgeswarm ARGS` whose power is cut (SIGKILL of its whole process group) just before its Nth file move.

    python -m tests.support.cut_agent --watch DIR --record FILE [--cut-at N] [--from-start] -- device run --config X

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
import os
import runpy
import signal
import sys
from collections.abc import Callable
from pathlib import Path

STATE_FILES = {"state.json", "switch.json"}


class Cutter:
    def __init__(self, watch: list[Path], record: Path, cut_at: int | None, from_start: bool) -> None:
        self.watch = [str(p.resolve()) for p in watch]
        self.record = record
        self.cut_at = cut_at
        self.counting = from_start
        self.count = 0

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
        state_write = (op == "replace" and dest is not None and os.path.basename(dest) in STATE_FILES) or (
            op == "unlink" and os.path.basename(source) == "switch.json")
        if not (state_write or self._watched(source) or (dest is not None and self._watched(dest))):
            return
        if not self.counting and state_write and os.path.basename(dest or "") == "state.json":
            with open(source, "rb") as tmp:
                self.counting = b'"phase": "installing"' in tmp.read()
        if not self.counting:
            return
        self.count += 1
        with open(self.record, "a") as out:
            out.write(f"{self.count} {op} {os.path.basename(source)}"
                      + (f" -> {os.path.basename(dest)}" if dest else "") + "\n")
        if self.count == self.cut_at:
            os.killpg(os.getpgrp(), signal.SIGKILL)


def install(cutter: Cutter) -> None:
    def wrap2(name: str, real: Callable[..., object]) -> Callable[..., object]:
        def moved(src, dst, *, src_dir_fd=None, dst_dir_fd=None, **kw):  # noqa: ANN001, ANN202
            cutter.before(name, src, dst, src_dir_fd, dst_dir_fd)
            return real(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd, **kw)
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
    parser.add_argument("--record", type=Path, required=True)
    parser.add_argument("--cut-at", type=int)
    parser.add_argument("--from-start", action="store_true")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    options = parser.parse_args()
    install(Cutter(options.watch, options.record, options.cut_at, options.from_start))
    sys.argv = ["edgeswarm", *[a for a in options.args if a != "--"]]
    runpy.run_module("services.cli", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
