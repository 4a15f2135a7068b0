"""Fuzz target (atheris/libFuzzer) for the delta patch parser and applier.

    python tests/fuzz/fuzz_patch.py -max_total_time=60 [CORPUS_DIR]

Each input is applied as an ESDELTA1 patch to a fixed old file, both to a new file and in place.
Seeds cover every segment codec (bsdiff with lzma and zstd, lzma-dict, lzma-dict-x86), so
mutations reach liblzma's raw decoder with a preset dictionary and the x86 conversion too.
Anything but a typed refusal (BadPatch), a write outside the target or a result other than the
promised bytes is a bug and stops the run. The seeds are real patches, so mutations reach the
segment streams and bsdiff control tuples, not only the header.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports():
    from services.runtime.delta.apply import BadPatch, apply_in_place, apply_patch

from services.runtime.delta.create import CreateOptions, create_patch  # noqa: E402  (not fuzzed, only makes seeds)

# libFuzzer ends the process with exit() at -max_total_time, past any `finally` or atexit: the test
# names a directory it removes itself (EDGESWARM_FUZZ_TMP), or this one would stay behind in /tmp.
WORK = Path(tempfile.mkdtemp(prefix="fuzz-patch-", dir=os.environ.get("EDGESWARM_FUZZ_TMP")))
OLD = WORK / "old"
OLD.write_bytes(bytes(range(256)) * 64 + b"edgeswarm" * 500 + b"\xe8\x10\x00\x00\x00\x90\xe9\xf0\xff\xff\xff" * 300)
OLD_SHA = hashlib.sha256(OLD.read_bytes()).hexdigest()


def write_seeds(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    new = WORK / "seed-new"
    new.write_bytes(b"v2" + OLD.read_bytes()[100:9000] + b"fresh bytes" * 40 + OLD.read_bytes()[9000:])
    for name, options in {"forward": CreateOptions(codecs=("bsdiff",)), "in-place": CreateOptions(in_place=True, codecs=("bsdiff",)),
                          "zstd": CreateOptions(compression="zstd", codecs=("bsdiff",)),
                          # segments cut from one whole-file diff: each opens with a seek tuple
                          "one-diff": CreateOptions(segment_size=4096, codecs=("bsdiff",)),
                          "lzma-dict": CreateOptions(codecs=("lzma-dict",)),
                          "lzma-dict-x86": CreateOptions(in_place=True, codecs=("lzma-dict-x86",))}.items():
        create_patch(OLD, new, directory / name, options)


def test_one_input(data: bytes) -> None:
    patch, out, target = WORK / "patch", WORK / "out", WORK / "target"
    patch.write_bytes(data)
    out.unlink(missing_ok=True)
    try:
        header = apply_patch(OLD, patch, out)
        assert hashlib.sha256(out.read_bytes()).hexdigest() == header.new_sha256
    except BadPatch:
        assert not out.exists()
    shutil.copyfile(OLD, target)
    try:
        header = apply_in_place(target, patch)
        assert hashlib.sha256(target.read_bytes()).hexdigest() == header.new_sha256
    except BadPatch:
        # refused before writing: the target is still the old file, byte for byte
        assert hashlib.sha256(target.read_bytes()).hexdigest() == OLD_SHA
    # no journal, stage or .part file survives a finished or refused application
    assert {p.name for p in WORK.iterdir()} <= {"old", "patch", "out", "target", "seed-new"}


def main() -> None:
    corpus = [a for a in sys.argv[1:] if not a.startswith("-")]
    for directory in corpus:
        write_seeds(Path(directory))
    atheris.Setup(sys.argv, test_one_input)
    try:
        atheris.Fuzz()
    finally:
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
