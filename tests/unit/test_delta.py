"""ESDELTA1 patches: exact results, in-place application that survives a crash anywhere, refusals."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import struct
import subprocess
import sys
import threading
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path

import bsdiff4.core
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.canonical import canonical_json
from schemas.patch import MAGIC, MAX_HEADER_BYTES, MAX_SEGMENT_NEW, Extent, PatchHeader
from services.runtime.delta import (
    BadPatch,
    _lzdict,
    apply_delta,
    apply_in_place,
    apply_patch,
    create_delta,
    patch_info,
)
from services.runtime.delta._anchors import OldIndex
from services.runtime.delta._x86 import transform, transform_extents
from services.runtime.delta.apply import Journal
from services.runtime.delta.create import (
    ALL_CODECS,
    BLOCK,
    CreateOptions,
    _cut,
    _Job,
    _probe_lz,
    _speculate,
    create_patch,
)

# small segments and windows so that a few hundred KiB exercise many segments and window choices
SMALL = CreateOptions(segment_size=64 << 10, old_budget=2 * BLOCK)
SMALL_IN_PLACE = CreateOptions(segment_size=64 << 10, old_budget=2 * BLOCK, in_place=True)
# every segment with one LZ codec, so that each codec meets every kind of edit
LZ = CreateOptions(segment_size=64 << 10, old_budget=2 * BLOCK, codecs=("lzma-dict",))
LZ_X86_IN_PLACE = CreateOptions(segment_size=64 << 10, old_budget=2 * BLOCK, in_place=True, codecs=("lzma-dict-x86",))


def _bytes(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _edit(old: bytes, kind: str) -> bytes:
    """A new version of `old` as releases produce them: inserted, removed, moved and changed bytes."""
    rng = random.Random(kind)
    new = bytearray(old)
    if kind == "insert-front":  # content moves towards the end: in place needs backward order
        new[1000:1000] = _bytes(7, 50_000)
    elif kind == "delete-front":  # content moves towards the start: forward order
        del new[2000:70_000]
    elif kind == "move-blocks":
        third = len(new) // 3
        new = new[2 * third :] + new[third : 2 * third] + new[:third]
    elif kind == "grow":
        new += _bytes(8, 300_000)
    elif kind == "shrink":
        new = new[: len(new) // 3]
    for _ in range(200):  # scattered small changes, like relocated addresses in code
        i = rng.randrange(len(new))
        new[i] = (new[i] + 1) % 256
    return bytes(new)


KINDS = ["insert-front", "delete-front", "move-blocks", "grow", "shrink"]


@pytest.fixture(scope="module")
def old_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("old") / "old"
    # compressible structure plus noise, about 1.2 MiB: ~20 segments with SMALL options
    path.write_bytes(b"".join(_bytes(i % 40, 4096) + bytes(range(256)) * 8 for i in range(200)))
    return path


def _pair(old_image: Path, tmp_path: Path, kind: str) -> tuple[Path, Path]:
    new = tmp_path / "new"
    new.write_bytes(_edit(old_image.read_bytes(), kind))
    return old_image, new


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("options", [SMALL, SMALL_IN_PLACE, CreateOptions(segment_size=64 << 10, old_budget=BLOCK, compression="zstd"),
                                     LZ, LZ_X86_IN_PLACE],
                         ids=["forward", "in-place", "zstd", "lzma-dict", "lzma-dict-x86-in-place"])
def test_a_patch_rebuilds_exactly_the_new_file_and_is_small(old_image: Path, tmp_path: Path, kind: str, options: CreateOptions) -> None:
    old, new = _pair(old_image, tmp_path, kind)
    patch = tmp_path / "patch"
    header = create_patch(old, new, patch, options)
    assert len(header.segments) > 5
    used = {s.codec for s in header.segments}
    assert used <= set(options.codecs) and (len(options.codecs) > 1 or used == set(options.codecs))
    assert header.format == (1 if used == {"bsdiff"} else 2)
    apply_patch(old, patch, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == new.read_bytes()
    # 200 changed bytes plus what was inserted: far below the file size
    inserted = 300_000 if kind == "grow" else 50_000 if kind == "insert-front" else 0
    if options.in_place and kind == "move-blocks":
        # moved both ways: one direction's bytes are overwritten before they are needed
        inserted = new.stat().st_size // 3
    assert patch.stat().st_size < inserted + 40_000
    if options.in_place:
        assert header.in_place_conflict() is None
        target = tmp_path / "target"
        shutil.copyfile(old, target)
        apply_in_place(target, patch)
        assert target.read_bytes() == new.read_bytes()
        assert not Journal.path(target).exists() and not Journal.stage_path(target).exists()


def test_in_place_patches_choose_the_order_that_keeps_needed_bytes(old_image: Path, tmp_path: Path) -> None:
    old, new = _pair(old_image, tmp_path, "insert-front")
    assert create_patch(old, new, tmp_path / "a", SMALL_IN_PLACE).order == "backward"
    new.write_bytes(_edit(old.read_bytes(), "delete-front"))
    assert create_patch(old, new, tmp_path / "b", SMALL_IN_PLACE).order == "forward"


def test_a_patch_that_would_overwrite_bytes_it_still_needs_is_refused_in_place(old_image: Path, tmp_path: Path) -> None:
    old, new = _pair(old_image, tmp_path, "move-blocks")
    patch = tmp_path / "patch"
    header = create_patch(old, new, patch, SMALL)
    assert header.in_place_conflict() is not None
    target = tmp_path / "target"
    shutil.copyfile(old, target)
    with pytest.raises(BadPatch, match="cannot be applied in place"):
        apply_in_place(target, patch)
    assert target.read_bytes() == old.read_bytes()


class PowerCut(BaseException):
    """Raised from the step hook: nothing after it runs, as when the process dies at that point
    (BaseException so no handler eats it). What it models: a crash or a power cut that keeps what
    was written and synced; "half-written" is a torn segment write. It does not model a disk that
    loses writes it acknowledged as synced."""


@pytest.mark.parametrize(("kind", "options"), [("insert-front", SMALL_IN_PLACE), ("delete-front", SMALL_IN_PLACE),
                                               ("insert-front", LZ_X86_IN_PLACE)], ids=["insert-front", "delete-front", "lzma-dict-x86"])
def test_in_place_application_resumes_after_a_crash_at_every_step(old_image: Path, tmp_path: Path, kind: str, options: CreateOptions) -> None:
    old, new = _pair(old_image, tmp_path, kind)
    patch = tmp_path / "patch"
    header = create_patch(old, new, patch, options)
    steps = [(name, index) for index in range(len(header.segments)) for name in ("rebuilt", "staged", "half-written", "written")]
    target = tmp_path / "target"
    for crash_at in steps:  # every one: what a cut at that point leaves on disk differs from its neighbours
        shutil.copyfile(old, target)

        def cut(name: str, index: int, crash_at: tuple[str, int] = crash_at) -> None:
            if (name, index) == crash_at:
                raise PowerCut

        with pytest.raises(PowerCut):
            apply_in_place(target, patch, step=cut)
        assert Journal.path(target).exists()
        apply_in_place(target, patch)  # the next boot resumes
        assert hashlib.sha256(target.read_bytes()).hexdigest() == header.new_sha256, crash_at
        assert not Journal.path(target).exists()


def test_a_crash_twice_in_a_row_still_resumes(old_image: Path, tmp_path: Path) -> None:
    old, new = _pair(old_image, tmp_path, "insert-front")
    patch, target = tmp_path / "patch", tmp_path / "target"
    create_patch(old, new, patch, SMALL_IN_PLACE)
    shutil.copyfile(old, target)
    for crash_at in [("half-written", 3), ("staged", 5), ("rebuilt", 6), ("written", 7)]:
        with pytest.raises(PowerCut):
            apply_in_place(target, patch, step=lambda n, i, c=crash_at: (_ for _ in ()).throw(PowerCut) if (n, i) == c else None)
    apply_in_place(target, patch)
    assert target.read_bytes() == new.read_bytes()


def test_applying_in_place_again_after_it_finished_is_a_no_op(old_image: Path, tmp_path: Path) -> None:
    """A cut after the application finished but before its caller noted it: the rerun succeeds
    and touches nothing; a file that is neither the old nor the new one is still refused."""
    old, new = _pair(old_image, tmp_path, "insert-front")
    patch, target = tmp_path / "patch", tmp_path / "target"
    create_patch(old, new, patch, SMALL_IN_PLACE)
    shutil.copyfile(old, target)
    header = apply_in_place(target, patch)
    written = target.stat().st_mtime_ns
    assert apply_in_place(target, patch) == header and target.stat().st_mtime_ns == written
    assert target.read_bytes() == new.read_bytes() and not Journal.path(target).exists()
    target.write_bytes(new.read_bytes()[:-1] + bytes([new.read_bytes()[-1] ^ 1]))  # same size, other bytes
    with pytest.raises(BadPatch):
        apply_in_place(target, patch)


def test_a_journal_of_another_patch_stops_in_place_application(old_image: Path, tmp_path: Path) -> None:
    old, new = _pair(old_image, tmp_path, "insert-front")
    patch, other, target = tmp_path / "patch", tmp_path / "other", tmp_path / "target"
    create_patch(old, new, patch, SMALL_IN_PLACE)
    create_patch(old, old, other, SMALL_IN_PLACE)
    shutil.copyfile(old, target)
    with pytest.raises(PowerCut):
        apply_in_place(target, patch, step=lambda n, i: (_ for _ in ()).throw(PowerCut) if (n, i) == ("written", 2) else None)
    with pytest.raises(BadPatch, match="belongs to another patch"):
        apply_in_place(target, other)


# -- refusals --------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["bsdiff", "lzma-dict-x86"])
def made_once(old_image: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> tuple[Path, Path, Path, PatchHeader]:
    old, new = _pair(old_image, tmp_path_factory.mktemp(request.param), "insert-front")
    patch = new.with_name("patch")
    options = SMALL_IN_PLACE if request.param == "bsdiff" else LZ_X86_IN_PLACE
    return old, new, patch, create_patch(old, new, patch, options)


@pytest.fixture
def made(made_once: tuple[Path, Path, Path, PatchHeader], tmp_path: Path) -> tuple[Path, Path, Path, PatchHeader]:
    """A fresh copy of the module's patch, for a test to damage."""
    old, new, patch, header = made_once
    copy = tmp_path / "patch"
    shutil.copyfile(patch, copy)
    return old, new, copy, header


def _rewrite(patch: Path, header: dict, payload: bytes | None = None) -> None:
    raw = patch.read_bytes()
    (length,) = struct.unpack("<I", raw[8:12])
    body = raw[12 + length :] if payload is None else payload
    text = canonical_json(header)
    patch.write_bytes(MAGIC + struct.pack("<I", len(text)) + text + body)


def _header(patch: Path) -> dict:
    return json.loads(patch_info(patch).to_bytes())


def _switch_codecs(header: dict) -> None:
    """bsdiff segments claim to be LZ (their streams say otherwise); LZ segments swap x86 on or off."""
    header["format"] = 2
    for segment in header["segments"]:
        segment["codec"] = {"lzma-dict-x86": "lzma-dict"}.get(segment.get("codec", "bsdiff"), "lzma-dict-x86")


HOSTILE = {
    "new size a terabyte": lambda h: h.update(new_size=1 << 40),
    "segment too large": lambda h: h["segments"][0].update(new_size=MAX_SEGMENT_NEW + 1),
    "extent beyond old": lambda h: h["segments"][0]["old"].append({"offset": h["old_size"], "length": 10}),
    "huge extent": lambda h: h["segments"][0]["old"].append({"offset": 0, "length": 1 << 40}),
    "negative offset": lambda h: h["segments"][0].update(new_offset=-1),
    "overlapping segments": lambda h: h["segments"][1].update(new_offset=h["segments"][1]["new_offset"] - 1),
    "sizes do not add up": lambda h: h["segments"][0].update(diff_size=h["segments"][0]["diff_size"] + 1),
    "partial control tuple": lambda h: h["segments"][0].update(control_size=h["segments"][0]["control_size"] + 1),
    "unknown compression": lambda h: h.update(compression="bzip3"),
    "unknown format": lambda h: h.update(format=3),
    "unknown codec": lambda h: h["segments"][0].update(codec="brotli"),
    "lz segment in format 1": lambda h: (h.update(format=1), h["segments"][0].update(codec="lzma-dict")),
    "codec switched": lambda h: _switch_codecs(h),
    "extra field": lambda h: h.update(shell="rm -rf /"),
    "wrong order": lambda h: h.update(order="forward"),
    "stream longer than promised": lambda h: (h["segments"][0].update(diff_size=h["segments"][0]["diff_size"] - 1),
                                              h["segments"][0].update(extra_size=h["segments"][0]["extra_size"] + 1),
                                              h["segments"][0].update(control_size=h["segments"][0]["control_size"] - 24)),
    "another new file": lambda h: h.update(new_sha256="0" * 64),
    "another old file": lambda h: h.update(old_sha256="0" * 64),
    "packed sizes swapped": lambda h: (h["segments"][0].update(packed_size=h["segments"][0]["packed_size"] + 1),
                                       h["segments"][1].update(packed_size=h["segments"][1]["packed_size"] - 1)),
}


@pytest.mark.parametrize("attack", list(HOSTILE))
def test_a_hostile_header_is_refused_and_nothing_is_written(made: tuple[Path, Path, Path, PatchHeader], tmp_path: Path, attack: str) -> None:
    old, _, patch, _ = made
    header = _header(patch)
    HOSTILE[attack](header)
    _rewrite(patch, header)
    with pytest.raises(BadPatch):
        apply_patch(old, patch, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.part").exists()
    target = tmp_path / "target"
    shutil.copyfile(old, target)
    with pytest.raises(BadPatch):
        apply_in_place(target, patch)
    assert target.read_bytes() == old.read_bytes()
    assert not Journal.path(target).exists()


@pytest.mark.parametrize("damage", ["magic", "empty", "truncated header", "header length huge", "not json",
                                    "duplicate key", "truncated payload", "trailing bytes", "flipped payload byte"])
def test_a_damaged_patch_is_refused_with_a_clear_error(made: tuple[Path, Path, Path, PatchHeader], tmp_path: Path, damage: str) -> None:
    old, _, patch, _ = made
    raw = bytearray(patch.read_bytes())
    (length,) = struct.unpack("<I", raw[8:12])
    if damage == "magic":
        raw[:8] = b"BSDIFF40"
    elif damage == "empty":
        raw = bytearray()
    elif damage == "truncated header":
        raw = raw[: 12 + length // 2]
    elif damage == "header length huge":
        raw[8:12] = struct.pack("<I", MAX_HEADER_BYTES + 1)
    elif damage == "not json":
        raw[12:16] = b"\xff\xfe{["
    elif damage == "duplicate key":
        text = raw[12 : 12 + length].decode().replace('{"compression":"lzma"', '{"compression":"lzma","compression":"zstd"', 1)
        raw = bytearray(MAGIC + struct.pack("<I", len(text)) + text.encode() + raw[12 + length :])
    elif damage == "truncated payload":
        raw = raw[:-100]
    elif damage == "trailing bytes":
        raw += b"\0" * 10
    else:
        raw[12 + length + 40] ^= 0xFF
    patch.write_bytes(bytes(raw))
    with pytest.raises(BadPatch) as refused:
        apply_patch(old, patch, tmp_path / "out")
    assert len(str(refused.value)) > 10
    assert not (tmp_path / "out").exists()


def test_a_patch_for_another_size_is_refused_before_work(made: tuple[Path, Path, Path, PatchHeader], tmp_path: Path) -> None:
    old, new, patch, _ = made
    with pytest.raises(BadPatch, match="promised"):
        apply_delta(old, patch, tmp_path / "out", expected_size=new.stat().st_size + 1)


def test_a_patch_for_another_old_file_is_refused(made: tuple[Path, Path, Path, PatchHeader], tmp_path: Path) -> None:
    _, _, patch, _ = made
    other = tmp_path / "other"
    other.write_bytes(_bytes(99, 1000))
    with pytest.raises(BadPatch, match="for a .*-byte file"):
        apply_patch(other, patch, tmp_path / "out")


# -- properties -------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(old=st.binary(max_size=3000), new=st.binary(max_size=3000), in_place=st.booleans(), data=st.data())
def test_any_pair_of_files_round_trips(tmp_path: Path, old: bytes, new: bytes, in_place: bool, data: st.DataObject) -> None:
    if data.draw(st.booleans()):  # often a related pair, the case deltas exist for
        new = old[: len(old) // 2] + new[:100] + old[len(old) // 2 :]
    paths = {name: tmp_path / name for name in ("old", "new", "patch", "out", "target")}
    paths["old"].write_bytes(old)
    paths["new"].write_bytes(new)
    codecs = data.draw(st.lists(st.sampled_from(ALL_CODECS), min_size=1, max_size=3, unique=True))
    options = CreateOptions(segment_size=data.draw(st.integers(64, 2048)), old_budget=BLOCK, in_place=in_place, codecs=tuple(codecs))
    create_patch(paths["old"], paths["new"], paths["patch"], options)
    apply_patch(paths["old"], paths["patch"], paths["out"])
    assert paths["out"].read_bytes() == new
    if in_place:
        paths["target"].write_bytes(old)
        apply_in_place(paths["target"], paths["patch"])
        assert paths["target"].read_bytes() == new


@settings(max_examples=60, deadline=None)
@given(old=st.binary(max_size=4000), new=st.binary(min_size=1, max_size=4000), cuts=st.lists(st.integers(1, 3999), max_size=6), data=st.data())
def test_whole_file_bsdiff_streams_cut_into_segments_rebuild_each_segment(old: bytes, new: bytes, cuts: list[int], data: st.DataObject) -> None:
    if data.draw(st.booleans()):
        new = old[len(old) // 3 :] + new[:50] + old[: len(old) // 3]  # related: long matches that cross the cuts
    starts = sorted({0, *(c for c in cuts if c < len(new))})
    streams = bsdiff4.core.diff(old, new)
    pieces = _cut(*streams, starts, len(new))
    for index, (start, end, (control, diff, extra)) in enumerate(zip(starts, [*starts[1:], len(new)], pieces)):
        assert bsdiff4.core.patch(old, end - start, control, diff, extra) == new[start:end]
        assert _cut(*streams, starts, len(new), only={index})[index] == (control, diff, extra)  # the probe's shortcut
    some = data.draw(st.sets(st.integers(0, len(starts) - 1), min_size=1))
    assert all(_cut(*streams, starts, len(new), only=some)[index] == pieces[index] for index in some)


SHARED = CreateOptions(segment_size=64 << 10, old_budget=2 << 20)  # the 1.2 MiB image fits one window


@pytest.mark.parametrize("kind", KINDS)
def test_an_old_file_that_fits_one_window_is_sorted_once_for_all_segments(
        old_image: Path, tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = _pair(old_image, tmp_path, kind)
    diffs: list[int] = []
    real_diff = bsdiff4.core.diff

    def counted(old_bytes: bytes, new_bytes: bytes) -> tuple[bytes, bytes, bytes]:
        diffs.append(len(new_bytes))
        return real_diff(old_bytes, new_bytes)

    monkeypatch.setattr(bsdiff4.core, "diff", counted)
    monkeypatch.setattr(OldIndex, "of_file", lambda path: pytest.fail("no window to choose, so no index"))
    header = create_patch(old, new, tmp_path / "patch", SHARED)
    assert diffs == [new.stat().st_size] and len(header.segments) > 5
    assert all([(e.offset, e.length) for e in s.old] == [(0, old.stat().st_size)] for s in header.segments)
    apply_patch(old, tmp_path / "patch", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == new.read_bytes()
    inserted = 300_000 if kind == "grow" else 50_000 if kind == "insert-front" else 0
    assert (tmp_path / "patch").stat().st_size < inserted + 40_000


def test_in_place_windows_that_fit_need_no_index_either(old_image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = _pair(old_image, tmp_path, "delete-front")
    monkeypatch.setattr(OldIndex, "of_file", lambda path: pytest.fail("no window to choose, so no index"))
    create_patch(old, new, tmp_path / "patch", CreateOptions(segment_size=64 << 10, old_budget=2 << 20, in_place=True))
    target = tmp_path / "target"
    shutil.copyfile(old, target)
    apply_in_place(target, tmp_path / "patch")
    assert target.read_bytes() == new.read_bytes()


# -- codecs: x86 branch conversion, LZMA2 against the old window, the format-1 files already shipped ---


def _code_like(draw_bytes: bytes, opcodes: list[int]) -> bytearray:
    """Bytes with call/jump opcodes at the given places, their offsets' top bytes 00 or FF as in code."""
    buf = bytearray(draw_bytes)
    for at in opcodes:
        if at + 5 <= len(buf):
            buf[at] = 0xE8 if at % 2 else 0xE9
            buf[at + 4] = 0xFF if at % 3 else 0x00
    return buf


# bytes from a small alphabet: opcodes inside other opcodes' offsets, top bytes 00/FF, all common
CODE_BYTES = st.lists(st.sampled_from([0x00, 0xFF, 0xE8, 0xE9, 0x90, 0x12]), max_size=600).map(bytes)


@settings(max_examples=300, deadline=None)
@given(raw=st.one_of(CODE_BYTES, st.binary(max_size=4000)), opcodes=st.lists(st.integers(0, 4000), max_size=400),
       address=st.integers(0, (1 << 40)), cut=st.tuples(st.integers(0, 100), st.integers(0, 100)))
def test_x86_conversion_is_undone_exactly_and_touches_nothing_outside_its_range(raw: bytes, opcodes: list[int], address: int,
                                                                                  cut: tuple[int, int]) -> None:
    original = _code_like(raw, opcodes)
    # the whole buffer, and a range of it (percentages of its length)
    start = len(original) * min(cut) // 100
    for lo, hi in ((0, len(original)), (start, start + (len(original) - start) * max(cut) // 100)):
        buf = bytearray(original)
        transform(buf, lo, hi, address, encode=True)
        assert buf[:lo] == original[:lo] and buf[hi:] == original[hi:]
        for at in range(lo, max(lo, hi - 4)):  # opcode bytes outside converted offsets never change
            if original[at] in (0xE8, 0xE9) and buf[at] != original[at]:
                assert any(0 < at - other <= 4 and original[other] in (0xE8, 0xE9) for other in range(max(lo, at - 4), at))
        transform(buf, lo, hi, address, encode=False)
        assert buf == original


def test_x86_conversion_writes_a_call_as_its_absolute_target() -> None:
    plain_call = bytes(b"\x90" * 16 + b"\xe8" + (0x20).to_bytes(4, "little") + b"\x90" * 8)
    call = bytearray(plain_call)
    transform(call, 0, len(call), 0x1000, encode=True)
    assert int.from_bytes(call[17:21], "little") == 0x1000 + 16 + 5 + 0x20  # where the call lands
    plain_moved = bytes(b"\x90" * 48 + b"\xe8" + (0x20 - 32).to_bytes(4, "little", signed=True) + b"\x90" * 8)
    moved = bytearray(plain_moved)
    transform(moved, 0, len(moved), 0x1000, encode=True)
    assert moved[49:53] == call[17:21]  # the same target from 32 bytes further on: the same bytes
    window = bytearray(plain_call + plain_moved)  # two extents, each at its own file address
    transform_extents(window, [(0x1000, len(call)), (0x1000, len(moved))], encode=True)
    assert window == call + moved


@pytest.mark.parametrize("window_type", [bytes, bytearray])
def test_lzma_dict_rebuilds_exactly_and_uses_the_window(window_type: type) -> None:
    window = _bytes(1, 200_000)
    data = window[50_000:150_000] + b"new code" * 100 + window[:20_000]
    packed = _lzdict.compress(window_type(window), data)
    assert len(packed) < 2_000  # everything but 800 bytes is a match into the window
    assert _lzdict.decompress(window_type(window), packed, len(data)) == data
    assert _lzdict.decompress(b"", _lzdict.compress(b"", data), len(data)) == data


@pytest.mark.parametrize("dict_max", [4096, 64 << 10, 150_000, 300_000, 1 << 20])
def test_an_encoder_dictionary_below_the_decoders_still_rebuilds_exactly(dict_max: int) -> None:
    """The encoder's dictionary is capped (memory); the decoder's holds window + data. Matches it
    can no longer reach (the window's head) cost size, never correctness, wherever the cap falls."""
    window = _bytes(7, 200_000)
    data = window[:30_000] + b"new" * 500 + window[150_000:190_000] + window[60_000:100_000] + _bytes(8, 10_000)
    capped = _lzdict.compress(window, data, effort=replace(_lzdict.FULL, dict_max=dict_max))
    assert _lzdict.decompress(window, capped, len(data)) == data
    full = _lzdict.compress(window, data)
    assert len(full) <= len(capped)
    if dict_max >= len(window) + len(data):
        assert capped == full
    if dict_max <= 64 << 10:  # the window's head and middle are out of reach: those bytes are literals
        assert len(capped) > len(full) + 20_000


@pytest.mark.parametrize("damage", ["fewer bytes promised", "more bytes promised", "truncated", "trailing bytes", "garbage",
                                    "flipped byte", "empty", "another window"])
def test_a_damaged_lzma_dict_stream_is_refused(damage: str) -> None:
    window, data = _bytes(2, 100_000), _bytes(2, 100_000)[1000:60_000] + _bytes(3, 5000)
    packed, size, used_window = bytearray(_lzdict.compress(window, data)), len(data), window
    if damage == "fewer bytes promised":
        size -= 1
    elif damage == "more bytes promised":
        size += 1
    elif damage == "truncated":
        packed = packed[:-3]
    elif damage == "trailing bytes":
        packed += b"\0\0"
    elif damage == "garbage":
        packed = bytearray(_bytes(4, len(packed)))
    elif damage == "flipped byte":
        packed[len(packed) // 2] ^= 0x40
    elif damage == "empty":
        packed = bytearray()
    else:
        used_window = _bytes(5, 100_000)
    try:
        rebuilt = _lzdict.decompress(used_window, bytes(packed), size)
    except _lzdict.LzDictError as exc:
        assert "lz-dict" in str(exc)
        return
    # a flipped literal or another window can still decode to the right length: then the bytes differ,
    # which the segment's sha256 catches (test_a_damaged_patch_is_refused_with_a_clear_error)
    assert damage in ("flipped byte", "another window") and rebuilt != data


def test_the_lzma_dict_encoder_gives_the_same_stream_however_its_input_is_fed(monkeypatch: pytest.MonkeyPatch) -> None:
    window, data = _bytes(1, 300_000), _bytes(1, 200_000)[:150_000] + _bytes(2, 150_000)
    fed_in_pieces = _lzdict.compress(window, data)
    monkeypatch.setattr(_lzdict, "FEED", 1 << 30)
    assert _lzdict.compress(window, data) == fed_in_pieces
    assert bytes(_lzdict.decompress(window, fed_in_pieces, len(data))) == data


def test_lz_encoding_starts_early_only_where_the_window_explains_the_segment_poorly_and_stops_when_cancelled() -> None:
    window = _bytes(1, 1 << 20)
    extents = [Extent(offset=0, length=len(window))]

    def job(data: bytes) -> _Job:
        made = _Job(0, data, extents, window, early=True)
        made.probe = Future()
        made.probe.set_result(_probe_lz(window, data, extents, 0, ["lzma-dict"], sampled=True))
        return made

    assert _speculate(job(window[1000:] + _bytes(3, 1000))) is None  # a small change: bsdiff's, not encoded early
    rebuilt = job(window[: 256 << 10] + _bytes(4, 256 << 10))  # half new: LZ may win
    candidate = _speculate(rebuilt)
    assert candidate is not None and candidate.segment.codec == "lzma-dict"
    assert bytes(_lzdict.decompress(window, candidate.packed, len(rebuilt.data))) == rebuilt.data
    rebuilt.cancel.set()
    assert _speculate(rebuilt) is None
    halfway = threading.Event()
    threading.Timer(0.05, halfway.set).start()
    with pytest.raises(_lzdict.Cancelled):
        _lzdict.compress(_bytes(5, 8 << 20), _bytes(6, 8 << 20), cancel=halfway)  # incompressible: seconds if not stopped


def test_a_bsdiff_only_patch_is_format_1_byte_for_byte(old_image: Path, tmp_path: Path) -> None:
    """Agents that predate format 2 read exactly this: no codec key, format 1."""
    old, new = _pair(old_image, tmp_path, "grow")
    header = create_patch(old, new, tmp_path / "patch", CreateOptions(segment_size=256 << 10, codecs=("bsdiff",)))
    raw = (tmp_path / "patch").read_bytes()
    assert header.format == 1 and raw.startswith(MAGIC) and b'"codec"' not in raw[: 12 + struct.unpack("<I", raw[8:12])[0]]


def test_a_format_1_patch_made_by_the_previous_release_still_applies_both_ways(tmp_path: Path) -> None:
    """tests/unit/data/esdelta-format1.esd was made by the code before format 2, from these two files."""
    rng = random.Random(1)
    old = bytearray(b"".join(rng.randbytes(512) + bytes(range(256)) * 4 for _ in range(40)))
    new = bytearray(old)
    new[3000:3000] = b"inserted by release 1.0.1 " * 40
    for _ in range(50):
        i = rng.randrange(len(new))
        new[i] ^= 0x5A
    (tmp_path / "old").write_bytes(old)
    patch = Path(__file__).parent / "data" / "esdelta-format1.esd"
    header = apply_patch(tmp_path / "old", patch, tmp_path / "new")
    assert header.format == 1 and (tmp_path / "new").read_bytes() == new
    apply_in_place(tmp_path / "old", patch)
    assert (tmp_path / "old").read_bytes() == new


def test_without_liblzma_lz_segments_are_refused_as_a_bad_patch_and_creation_keeps_to_bsdiff(
        old_image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A device without liblzma.so.5 refuses the patch (the agent then fetches the full artifact)."""
    old, new = _pair(old_image, tmp_path, "grow")
    create_patch(old, new, tmp_path / "lz", CreateOptions(segment_size=256 << 10, codecs=("lzma-dict",)))

    def missing() -> None:
        raise _lzdict.LzDictError("liblzma is not available (test): this device cannot apply lz-dict segments")

    monkeypatch.setattr(_lzdict, "_liblzma", missing)
    with pytest.raises(BadPatch, match="liblzma is not available"):
        apply_patch(old, tmp_path / "lz", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert create_patch(old, new, tmp_path / "plain", CreateOptions(segment_size=256 << 10)).format == 1
    with pytest.raises(ValueError, match="need liblzma"):
        create_patch(old, new, tmp_path / "none", CreateOptions(codecs=("lzma-dict-x86",)))


def test_codec_options_are_checked() -> None:
    with pytest.raises(ValueError, match="non-empty subset"):
        CreateOptions(codecs=())
    with pytest.raises(ValueError, match="non-empty subset"):
        CreateOptions(codecs=("brotli",))  # type: ignore[arg-type]


# -- command line -----------------------------------------------------------------------------------


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "services.cli", "delta", *map(str, args)], capture_output=True, text=True, timeout=120)


def test_the_cli_creates_inspects_and_applies_patches_and_refuses_bad_ones(old_image: Path, tmp_path: Path) -> None:
    old, new = _pair(old_image, tmp_path, "insert-front")
    patch, out, target = tmp_path / "p.esd", tmp_path / "out", tmp_path / "target"
    created = _cli("create", old, new, "-o", patch, "--in-place", "--json")
    assert created.returncode == 0, created.stderr
    info = _cli("info", patch, "--json")
    assert info.returncode == 0 and '"in_place_safe": true' in info.stdout and f'"new_size": {new.stat().st_size}' in info.stdout
    shown = json.loads(info.stdout)
    assert sum(shown["codecs"].values()) == shown["segments"] == len(shown["segment_table"])
    forced = _cli("create", old, new, "-o", tmp_path / "x86.esd", "--codec", "lzma-dict-x86")
    assert forced.returncode == 0, forced.stderr
    assert "lzma-dict-x86" in _cli("info", tmp_path / "x86.esd").stdout
    assert _cli("apply", old, tmp_path / "x86.esd", "-o", out).returncode == 0 and out.read_bytes() == new.read_bytes()
    unknown = _cli("create", old, new, "-o", tmp_path / "no.esd", "--codec", "brotli")
    assert unknown.returncode == 1 and "unknown codec 'brotli'" in unknown.stderr
    assert _cli("apply", old, patch, "-o", out).returncode == 0 and out.read_bytes() == new.read_bytes()
    shutil.copyfile(old, target)
    assert _cli("apply", "--in-place", target, patch).returncode == 0 and target.read_bytes() == new.read_bytes()
    patch.write_bytes(patch.read_bytes()[:-10])
    refused = _cli("apply", old, patch, "-o", tmp_path / "out2")
    assert refused.returncode == 1 and "truncated or padded" in refused.stderr
    assert not (tmp_path / "out2").exists()
    assert _cli("apply", old, patch).returncode != 0  # neither -o nor --in-place


def test_the_default_api_makes_and_applies_patches(tmp_path: Path) -> None:
    old, new, patch, out = (tmp_path / n for n in ("old", "new", "patch", "out"))
    old.write_bytes(bytes(range(256)) * 400)
    new.write_bytes(old.read_bytes()[:50_000] + b"edgeswarm" * 100 + old.read_bytes()[50_000:])
    assert create_delta(old, new, patch) < 2000
    apply_delta(old, patch, out, expected_size=new.stat().st_size)
    assert out.read_bytes() == new.read_bytes()
