"""`edgeswarm delta`: create, apply and inspect ESDELTA1 patches (header format 1 or 2)."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from services.cli.common import JsonOption, err, fail, make_console

if TYPE_CHECKING:  # the delta codecs (numpy, zstandard) load when a command runs, not for --help
    from schemas.patch import PatchHeader

delta_app = typer.Typer(help="Binary deltas: create, apply (also in place), inspect.", no_args_is_help=True)
out = make_console()
_fail = fail


@contextmanager
def _progress(label: str, quiet: bool) -> Iterator:
    if quiet or not err.is_terminal:
        yield None
        return
    columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress("[progress.description]{task.description}", *columns, console=err, transient=True) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def _summary(header: PatchHeader, patch: Path) -> dict:
    return {
        "patch": str(patch),
        "format": header.format,
        "compression": header.compression,
        "order": header.order,
        "in_place_safe": header.in_place_conflict() is None,
        "old_size": header.old_size,
        "old_sha256": header.old_sha256,
        "new_size": header.new_size,
        "new_sha256": header.new_sha256,
        "patch_size": patch.stat().st_size,
        "segments": len(header.segments),
        "codecs": dict(Counter(s.codec for s in header.segments)),
        "max_segment_old_bytes": max((s.old_size for s in header.segments), default=0),
        "segment_table": [{"new_offset": s.new_offset, "new_size": s.new_size, "codec": s.codec,
                           "packed_size": s.packed_size, "old_bytes": s.old_size} for s in header.segments],
    }


def _print(summary: dict, as_json: bool) -> None:
    if as_json:
        out.print_json(json.dumps(summary))
        return
    table = Table(show_header=False, box=None)
    for key, value in summary.items():
        if key == "codecs":
            value = ", ".join(f"{count} {codec}" for codec, count in value.items())
        if key != "segment_table":
            table.add_row(key.replace("_", " "), str(value))
    out.print(table)
    if summary.get("segment_table"):
        segments = Table(title="segments, in the order they are applied")
        for column in ("new offset", "size", "codec", "packed", "old bytes read"):
            segments.add_column(column, justify="left" if column == "codec" else "right")
        for row in summary["segment_table"]:
            segments.add_row(f"{row['new_offset']:,}", f"{row['new_size']:,}", row["codec"], f"{row['packed_size']:,}",
                             f"{row['old_bytes']:,}")
        out.print(segments)


@delta_app.command("create")
def create(
    old: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="the version devices run now")],
    new: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="the version to ship")],
    output: Annotated[Path, typer.Option("-o", "--output", help="patch file to write")],
    in_place: Annotated[bool, typer.Option("--in-place", help="make a patch devices can apply inside the old file")] = False,
    compression: Annotated[str, typer.Option(help="lzma (smaller) or zstd (faster to create), for bsdiff segments")] = "lzma",
    codec: Annotated[list[str] | None, typer.Option(
        "--codec", metavar="CODEC",
        help="allow only this codec per segment (repeatable): bsdiff, lzma-dict, lzma-dict-x86. Default: all, and the "
             "smaller wins per segment; bsdiff alone makes a format-1 patch, which agents older than format 2 apply too")] = None,
    as_json: JsonOption = False,
) -> None:
    """Make a patch that turns OLD into NEW, with memory bounded whatever the image size."""
    from services.runtime.delta.create import ALL_CODECS, CreateOptions, create_patch

    if compression not in ("lzma", "zstd"):
        _fail(f"unknown compression {compression!r}: use lzma or zstd")
    unknown = [c for c in codec or [] if c not in ALL_CODECS]
    if unknown:
        _fail(f"unknown codec {unknown[0]!r}: use {', '.join(ALL_CODECS)}")
    options = CreateOptions(compression=compression, in_place=in_place, codecs=tuple(dict.fromkeys(codec or ALL_CODECS)))  # type: ignore[arg-type]
    started = time.monotonic()
    try:
        with _progress("diffing", as_json) as progress:
            header = create_patch(old, new, output, options, progress)
    except ValueError as exc:
        _fail(str(exc))
    summary = _summary(header, output) | {"seconds": round(time.monotonic() - started, 2)}
    _print(summary, as_json)


@delta_app.command("apply")
def apply(
    old: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="the old file (patched itself with --in-place)")],
    patch: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="an ESDELTA1 patch")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="new file to write")] = None,
    in_place: Annotated[bool, typer.Option("--in-place", help="rewrite OLD itself; resumes after a crash")] = False,
    as_json: JsonOption = False,
) -> None:
    """Rebuild the new file from OLD and PATCH, checking every segment and the result's sha256."""
    if in_place == (output is not None):
        _fail("give either -o NEW or --in-place")
    from services.runtime.delta import BadPatch, apply_in_place, apply_patch

    started = time.monotonic()
    try:
        with _progress("patching", as_json) as progress:
            if in_place:
                header = apply_in_place(old, patch, progress=progress)
            else:
                assert output is not None
                header = apply_patch(old, patch, output, progress=progress)
    except BadPatch as exc:
        _fail(f"{patch}: {exc}")
    result = {"output": str(old if in_place else output), "new_size": header.new_size, "new_sha256": header.new_sha256,
              "in_place": in_place, "seconds": round(time.monotonic() - started, 2)}
    _print(result, as_json)


@delta_app.command("info")
def info(
    patch: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="an ESDELTA1 patch")],
    as_json: JsonOption = False,
) -> None:
    """Show what a patch applies to, what it produces and how it is laid out."""
    from services.runtime.delta import BadPatch, patch_info

    try:
        header = patch_info(patch)
    except BadPatch as exc:
        _fail(f"{patch}: {exc}")
    _print(_summary(header, patch), as_json)
