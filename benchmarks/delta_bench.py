"""Delta benchmark on real binaries: ESDELTA1 against bsdiff4, zstd --patch-from, xdelta3, detools, xz.

    python3 benchmarks/delta_bench.py            # all pairs (downloads ~200 MB once, ~1 h on 2 cores)
    python3 benchmarks/delta_bench.py --quick    # the two shared-library pairs only (~2 min)
    python3 benchmarks/delta_bench.py --json     # the same figures as JSON

Pairs are fetched by the script from registries this machine reaches and cached in
~/.cache/edgeswarm/delta-bench: two Debian builds of shared libraries (bookworm and
bookworm-security), two releases of the ruff wheel (a 31 MB Rust binary) from PyPI, and two
root-filesystem tars assembled from the same ~27 Debian packages at those two Debian versions.
Every tool runs as its own process; its time and peak RSS (wait4) are measured in the same run,
and every apply is checked byte for byte. Ratios are against whole-file bsdiff4, which is
skipped where its ~17x memory would not fit this machine.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

CACHE = Path.home() / ".cache" / "edgeswarm" / "delta-bench"
DEBIAN = "http://deb.debian.org/debian"
SECURITY = "http://deb.debian.org/debian-security"
TOOL_TIMEOUT = 30 * 60
ROOTFS_PACKAGES = [
    "libnode108", "postgresql-15", "mariadb-server-core", "git", "qemu-system-x86", "libicu72", "libperl5.36",
    "perl-base", "libpython3.11", "libpython3.11-stdlib", "python3.11-minimal", "libpython3.11-minimal", "libc6",
    "systemd", "libsystemd0", "libssl3", "openssh-client", "openssh-server", "sudo", "tzdata", "libxml2",
    "libglib2.0-0", "bind9-libs", "curl", "libcurl4", "libexpat1", "libpng16-16",
]


@dataclass
class Run:
    seconds: float
    peak_rss_mb: float


@dataclass
class ToolResult:
    tool: str
    size: int | None = None
    create: Run | None = None
    apply: Run | None = None
    correct: bool | None = None
    note: str = ""
    apply_working_mb: float | None = None  # apply's peak RSS minus the same tool's on a 4 KiB pair


@dataclass
class PairResult:
    name: str
    old_size: int
    new_size: int
    tools: list[ToolResult] = field(default_factory=list)
    esd_apply_working_mb: float | None = None


# -- fetching -----------------------------------------------------------------------------------


def _download(url: str, dest: Path) -> Path:
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(f"{dest.name}.{os.getpid()}.part")
        with urllib.request.urlopen(url, timeout=120) as response, open(part, "wb") as out:
            shutil.copyfileobj(response, out)
        part.rename(dest)
    return dest


def _packages(base: str, suite: str) -> dict[str, dict[str, str]]:
    index = _download(f"{base}/dists/{suite}/main/binary-amd64/Packages.xz", CACHE / f"{suite}-Packages.xz")
    out: dict[str, dict[str, str]] = {}
    for block in lzma.open(index).read().decode().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(" "))
        if "Package" in fields:
            out[fields["Package"]] = fields
    return out


def _newer(a: str, b: str) -> bool:
    return subprocess.run(["dpkg", "--compare-versions", a, "gt", b]).returncode == 0


def _debs(package: str, main: dict, security: dict) -> tuple[Path, Path]:
    """(older .deb, newer .deb); the same file twice when only one version exists."""
    candidates = [(main[package]["Version"], f"{DEBIAN}/{main[package]['Filename']}")]
    if package in security:
        candidates.append((security[package]["Version"], f"{SECURITY}/{security[package]['Filename']}"))
    candidates.sort(key=lambda c: c[0])
    if len(candidates) == 2 and _newer(candidates[0][0], candidates[1][0]):
        candidates.reverse()
    paths = [_download(url, CACHE / "debs" / Path(url).name) for _, url in candidates]
    return paths[0], paths[-1]


def _extract_deb(deb: Path, into: Path) -> None:
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(into)], check=True)


def _library_pair(name: str, package: str, member: str, main: dict, security: dict) -> tuple[str, Path, Path]:
    old_deb, new_deb = _debs(package, main, security)
    paths = []
    for deb in (old_deb, new_deb):
        out = CACHE / "files" / f"{deb.stem}-{Path(member).name}"
        if not out.exists():
            with tempfile.TemporaryDirectory() as tmp:
                _extract_deb(deb, Path(tmp))
                shutil.copyfile(Path(tmp) / member, out)
        paths.append(out)
    return name, paths[0], paths[1]


def _ruff_pair() -> tuple[str, Path, Path]:
    paths = []
    for version in ("0.8.0", "0.8.1"):
        out = CACHE / "files" / f"ruff-{version}"
        if not out.exists():
            with tempfile.TemporaryDirectory() as tmp:
                subprocess.run([sys.executable, "-m", "pip", "download", f"ruff=={version}", "--no-deps", "--only-binary", ":all:",
                                "--platform", "manylinux_2_17_x86_64", "-d", tmp, "-q"], check=True)
                wheel = next(Path(tmp).glob("*.whl"))
                shutil.unpack_archive(wheel, Path(tmp) / "x", "zip")
                shutil.copyfile(next((Path(tmp) / "x").glob("*.data/scripts/ruff")), out)
        paths.append(out)
    return "ruff 0.8.0 -> 0.8.1 (PyPI wheel, Rust)", paths[0], paths[1]


def _rootfs_pair(main: dict, security: dict) -> tuple[str, Path, Path]:
    tars = [CACHE / "files" / "rootfs-old.tar", CACHE / "files" / "rootfs-new.tar"]
    if not all(t.exists() for t in tars):
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            roots = [Path(tmp) / "old", Path(tmp) / "new"]
            for package in ROOTFS_PACKAGES:
                for deb, root in zip(_debs(package, main, security), roots):
                    _extract_deb(deb, root)
            for root, tar in zip(roots, tars):
                # deterministic: same order, owners and times in both, like an image build
                subprocess.run(["tar", "--sort=name", "--mtime=@0", "--owner=0", "--group=0", "--numeric-owner",
                                "-C", str(root), "-cf", str(tar), "."], check=True)
    changed = sum(1 for p in ROOTFS_PACKAGES if p in security and security[p]["Version"] != main[p]["Version"])
    return f"rootfs tar, {len(ROOTFS_PACKAGES)} Debian packages ({changed} updated)", tars[0], tars[1]


def fetch_pairs(quick: bool, wanted: list[str]) -> Iterator[tuple[str, Path, Path]]:
    """The pairs, each fetched only when its turn comes (and only if `wanted` names it)."""
    main, security = _packages(DEBIAN, "bookworm"), _packages(SECURITY, "bookworm-security")
    makers: list[tuple[str, Callable[[], tuple[str, Path, Path]]]] = [
        ("libpython", lambda: _library_pair("libpython3.11.so (Debian, C)", "libpython3.11",
                                            "usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0", main, security)),
        ("libcrypto", lambda: _library_pair("libcrypto.so.3 (Debian, C)", "libssl3",
                                            "usr/lib/x86_64-linux-gnu/libcrypto.so.3", main, security)),
    ]
    if not quick:
        makers += [("ruff", _ruff_pair), ("rootfs", lambda: _rootfs_pair(main, security))]
    for key, make in makers:
        if not wanted or any(word in key for word in wanted):
            yield make()


# -- measuring ----------------------------------------------------------------------------------


def measure(argv: list[str], stdout: Path | None = None, timeout: float = TOOL_TIMEOUT) -> Run:
    """Run a command to completion under GNU time: wall time and the command's own peak RSS.

    (wait4 on a child of this process would report this process's RSS, inherited at fork.)
    """
    with tempfile.NamedTemporaryFile("r") as report, open(stdout or os.devnull, "wb") as out:
        process = subprocess.Popen(["/usr/bin/time", "-f", "%e %M", "-o", report.name, *argv], stdout=out,
                                   stderr=subprocess.PIPE, start_new_session=True)
        try:
            _, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
            raise RuntimeError(f"timed out after {timeout:.0f} s") from None
        if process.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({process.returncode}): {stderr.decode()[-300:]}")
        seconds, rss_kb = report.read().split()[-2:]
    return Run(round(float(seconds), 2), round(int(rss_kb) / 1024, 1))


def _available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return 0.0


PY = sys.executable
REPO = Path(__file__).resolve().parents[1]


def tools(old: Path, new: Path, work: Path) -> dict[str, tuple[list[str] | None, list[str], Path]]:
    """name -> (create argv, apply argv, patch path); the apply writes work/out-<name>."""
    big = max(old.stat().st_size, new.stat().st_size)
    window = str(max(1 << 19, 1 << max(big - 1, 1).bit_length()))  # xdelta3's minimum -B is 512 KiB
    return {
        "xz -9 (full)": ([ "xz", "-9", "-T1", "-k", "-c", str(new)], ["xz", "-d", "-c", str(work / "full.xz")], work / "full.xz"),
        "bsdiff4": ([PY, "-c", "import bsdiff4,sys; bsdiff4.file_diff(*sys.argv[1:])", str(old), str(new), str(work / "p.bsdiff4")],
                    [PY, "-c", "import bsdiff4,sys; bsdiff4.file_patch(*sys.argv[1:])", str(old), str(work / "out-bsdiff4"), str(work / "p.bsdiff4")],
                    work / "p.bsdiff4"),
        "zstd -19 --long=31 --patch-from": (
            ["zstd", "-q", "-f", "-19", "--long=31", "--single-thread", f"--patch-from={old}", str(new), "-o", str(work / "p.zst")],
            ["zstd", "-q", "-f", "-d", "--long=31", "--memory=2048MB", f"--patch-from={old}", str(work / "p.zst"), "-o", str(work / "out-zstd -19 --long=31 --patch-from")],
            work / "p.zst"),
        "xdelta3 -9": (["xdelta3", "-9", "-f", "-e", "-B", window, "-s", str(old), str(new), str(work / "p.vcdiff")],
                       ["xdelta3", "-d", "-f", "-B", window, "-s", str(old), str(work / "p.vcdiff"), str(work / "out-xdelta3 -9")],
                       work / "p.vcdiff"),
        "detools (sequential, lzma)": (
            [PY, "-c", "import detools,sys; detools.create_patch_filenames(*sys.argv[1:])", str(old), str(new), str(work / "p.detools")],
            [PY, "-c", "import detools,sys; detools.apply_patch_filenames(*sys.argv[1:])", str(old), str(work / "p.detools"), str(work / "out-detools (sequential, lzma)")],
            work / "p.detools"),
        "ESDELTA1 (edgeswarm, lzma)": (
            [PY, "-m", "services.cli", "delta", "create", str(old), str(new), "-o", str(work / "p.esd"), "--json"],
            [PY, "-m", "services.cli", "delta", "apply", str(old), str(work / "p.esd"), "-o", str(work / "out-ESDELTA1 (edgeswarm, lzma)"), "--json"],
            work / "p.esd"),
    }


# rough peak memory of whole-file suffix-array diffing, per byte of the larger file
WHOLE_FILE_FACTOR = {"bsdiff4": 17, "detools (sequential, lzma)": 12}


def bench_pair(name: str, old: Path, new: Path, work: Path, skip: set[str], timeout: float) -> PairResult:
    result = PairResult(name, old.stat().st_size, new.stat().st_size)
    for tool, (create, apply, patch) in tools(old, new, work).items():
        row = ToolResult(tool)
        result.tools.append(row)
        need = WHOLE_FILE_FACTOR.get(tool, 0) * max(result.old_size, result.new_size) / 2**20
        if tool in skip:
            row.note = "skipped (--skip)"
            continue
        if need > 0.8 * _available_mb():
            row.note = f"skipped: needs ~{need / 1024:.1f} GiB, {_available_mb() / 1024:.1f} GiB available"
            continue
        print(f"  {tool} ...", file=sys.stderr, flush=True)
        try:
            row.create, row.apply, out = _run_tool(tool, create, apply, patch, work, timeout)
            row.size = patch.stat().st_size
            row.correct = subprocess.run(["cmp", "-s", str(out), str(new)]).returncode == 0
            out.unlink()
            # The same rule for every tool: what applying needs beyond the tool's own process (an
            # interpreter, a binary), measured by the same tool on a 4 KiB pair.
            baseline = _tiny_apply(tool, work / "tiny", timeout)
            row.apply_working_mb = round(row.apply.peak_rss_mb - baseline.peak_rss_mb, 1)
        except RuntimeError as exc:
            row.note = str(exc)[:200]
    ours = next(t for t in result.tools if t.tool.startswith("ESDELTA1"))
    result.esd_apply_working_mb = ours.apply_working_mb
    shutil.rmtree(work / "tiny", ignore_errors=True)
    for leftover in work.iterdir():
        leftover.unlink()
    return result


def _run_tool(tool: str, create: list[str], apply: list[str], patch: Path, work: Path,
              timeout: float) -> tuple[Run, Run, Path]:
    if tool.startswith("xz"):
        out = work / "out-xz"
        return measure(create, stdout=patch, timeout=timeout), measure(apply, stdout=out, timeout=timeout), out
    return measure(create, timeout=timeout), measure(apply, timeout=timeout), work / f"out-{tool}"


def _tiny_apply(tool: str, work: Path, timeout: float) -> Run:
    work.mkdir(exist_ok=True)
    tiny_old, tiny_new = work / "tiny-old", work / "tiny-new"
    tiny_old.write_bytes(bytes(range(256)) * 16)
    tiny_new.write_bytes(tiny_old.read_bytes() + b"x")
    create, apply, patch = tools(tiny_old, tiny_new, work)[tool]
    _, run, out = _run_tool(tool, create, apply, patch, work, timeout)
    out.unlink(missing_ok=True)
    return run


def print_table(pair: PairResult) -> None:
    from rich.console import Console
    from rich.table import Table

    reference = next((t for t in pair.tools if t.tool == "bsdiff4" and t.size), None)
    zstd = next((t for t in pair.tools if t.tool.startswith("zstd") and t.size), None)
    table = Table(title=f"{pair.name}: old {pair.old_size / 1e6:.1f} MB, new {pair.new_size / 1e6:.1f} MB")
    for column in ("tool", "size", "x bsdiff4", "create s", "x", "create MB", "apply s", "apply MB", "working MB", "ok",
                   "note"):
        table.add_column(column, justify="left" if column in ("tool", "note") else "right")
    for t in pair.tools:
        def ratio(value: float | None, base: float | None) -> str:
            return f"{value / base:.2f}" if value and base else "-"
        table.add_row(
            t.tool, f"{t.size:,}" if t.size else "-", ratio(t.size, reference.size if reference else None),
            f"{t.create.seconds:.1f}" if t.create else "-",
            ratio(t.create.seconds if t.create else None, reference.create.seconds if reference and reference.create else None),
            f"{t.create.peak_rss_mb:.0f}" if t.create else "-", f"{t.apply.seconds:.1f}" if t.apply else "-",
            f"{t.apply.peak_rss_mb:.0f}" if t.apply else "-",
            f"{t.apply_working_mb:.0f}" if t.apply_working_mb is not None else "-",
            {True: "yes", False: "NO", None: "-"}[t.correct], t.note,
        )
    Console(width=max(Console().width, 150)).print(table)
    ours = next(t for t in pair.tools if t.tool.startswith("ESDELTA1"))
    best_other = min((t.size for t in (reference, zstd) if t and t.size), default=None)
    if ours.size and best_other:
        print(f"  ESDELTA1 / min(bsdiff4, zstd --patch-from) = {ours.size / best_other:.3f}; "
              f"apply working memory {pair.esd_apply_working_mb} MB (peak RSS minus a tiny patch's)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the two shared-library pairs")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--skip", default="", help="comma-separated tool names to leave out (e.g. detools for speed)")
    parser.add_argument("--pairs", default="", help="comma-separated words: only pairs whose name contains one (e.g. rootfs)")
    parser.add_argument("--timeout", type=float, default=TOOL_TIMEOUT, help="seconds before a tool's run is given up")
    parser.add_argument("--save", type=Path, help="also write the figures as JSON to this file (kept up to date after each pair)")
    args = parser.parse_args()
    for binary, package in (("xdelta3", "xdelta3"), ("zstd", "zstd"), ("xz", "xz-utils"), ("/usr/bin/time", "time")):
        if not shutil.which(binary) and os.geteuid() == 0:
            subprocess.run(["apt-get", "install", "-y", "-q", package], check=True, stdout=subprocess.DEVNULL)
    if subprocess.run([PY, "-c", "import detools"], capture_output=True).returncode:
        subprocess.run([PY, "-m", "pip", "install", "-q", "detools"], check=True)
    os.chdir(REPO)
    (CACHE / "files").mkdir(parents=True, exist_ok=True)
    skip = {t for t in args.skip.split(",") if t}
    skip = {name for name in tools(Path("/"), Path("/"), CACHE) if any(s in name for s in skip)}
    results = []
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        for name, old, new in fetch_pairs(args.quick, [w for w in args.pairs.split(",") if w]):
            print(f"{name}", file=sys.stderr, flush=True)
            results.append(bench_pair(name, old, new, Path(tmp), skip, args.timeout))
            if not args.json:
                print_table(results[-1])
            if args.save:
                args.save.write_text(json.dumps([asdict(r) for r in results], indent=2))
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))


if __name__ == "__main__":
    main()
