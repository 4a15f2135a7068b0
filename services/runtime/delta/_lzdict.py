"""LZMA2 with the old bytes as a preset dictionary: an LZ match against the old window.

Python's lzma module cannot set a preset dictionary, so this binds the few liblzma calls it
needs (liblzma.so.5, which CPython's own lzma module links on Linux) through ctypes. The data is
raw LZMA2 (no container): the dictionary size and the preset dictionary come from the patch
header, which was validated against the format's limits, never from the stream, so decoding
allocates at most MAX_SEGMENT_OLD + MAX_SEGMENT_NEW bytes of dictionary. Output is bounded to
the size the header promises.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from dataclasses import dataclass
from functools import cache

from schemas.errors import EdgeswarmError, ReasonCode

LZMA_OK, LZMA_STREAM_END = 0, 1
LZMA_RUN, LZMA_FINISH = 0, 3
LZMA_FILTER_LZMA2 = 0x21
LZMA_VLI_UNKNOWN = 2**64 - 1
MIN_DICT = 4096
MF_HC4 = 0x04
FEED = 256 << 10  # input handed to the encoder per call, so that a cancellation is seen within ~0.1 s


class LzDictError(EdgeswarmError, ValueError):
    code = ReasonCode.BAD_PATCH


class Cancelled(Exception):
    """The encoding was given up on request (creation no longer needs it)."""


class _Stream(ctypes.Structure):
    _fields_ = [
        ("next_in", ctypes.c_void_p), ("avail_in", ctypes.c_size_t), ("total_in", ctypes.c_uint64),
        ("next_out", ctypes.c_void_p), ("avail_out", ctypes.c_size_t), ("total_out", ctypes.c_uint64),
        ("allocator", ctypes.c_void_p), ("internal", ctypes.c_void_p),
        ("reserved_ptr", ctypes.c_void_p * 4), ("seek_pos", ctypes.c_uint64), ("reserved_int2", ctypes.c_uint64),
        ("reserved_int3", ctypes.c_size_t), ("reserved_int4", ctypes.c_size_t), ("reserved_enum", ctypes.c_int * 2),
    ]


class _OptionsLzma(ctypes.Structure):
    _fields_ = [
        ("dict_size", ctypes.c_uint32), ("preset_dict", ctypes.c_void_p), ("preset_dict_size", ctypes.c_uint32),
        ("lc", ctypes.c_uint32), ("lp", ctypes.c_uint32), ("pb", ctypes.c_uint32), ("mode", ctypes.c_int),
        ("nice_len", ctypes.c_uint32), ("mf", ctypes.c_int), ("depth", ctypes.c_uint32),
        ("ext_flags", ctypes.c_uint32), ("ext_size_low", ctypes.c_uint32), ("ext_size_high", ctypes.c_uint32),
        ("reserved_int", ctypes.c_uint32 * 5), ("reserved_enum", ctypes.c_int * 4), ("reserved_ptr", ctypes.c_void_p * 2),
    ]


class _Filter(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint64), ("options", ctypes.c_void_p)]


@cache
def _liblzma() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("liblzma.so.5")  # the soname on every Linux distribution since xz 5.0
    except OSError:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("lzma") or "liblzma.so")
        except OSError as exc:
            raise LzDictError(f"liblzma is not available ({exc}): this device cannot apply lz-dict segments") from None
    lib.lzma_lzma_preset.argtypes = [ctypes.POINTER(_OptionsLzma), ctypes.c_uint32]
    lib.lzma_lzma_preset.restype = ctypes.c_int  # lzma_bool: non-zero means the preset is not supported
    for name in ("lzma_raw_encoder", "lzma_raw_decoder"):
        getattr(lib, name).argtypes = [ctypes.POINTER(_Stream), ctypes.POINTER(_Filter)]
        getattr(lib, name).restype = ctypes.c_int
    lib.lzma_code.argtypes = [ctypes.POINTER(_Stream), ctypes.c_int]
    lib.lzma_code.restype = ctypes.c_int
    lib.lzma_end.argtypes = [ctypes.POINTER(_Stream)]
    lib.lzma_end.restype = None
    return lib


def available() -> bool:
    try:
        _liblzma()
    except LzDictError:
        return False
    return True


def dict_size(window: int, size: int) -> int:
    """The dictionary that holds the whole old window and the whole output: every match stays reachable."""
    return max(MIN_DICT, window + size)


def _address(buffer: bytes | bytearray) -> tuple[int | None, object]:
    """Where the buffer's bytes are, and the object that keeps that address valid (no copy)."""
    if not buffer:
        return None, None
    if isinstance(buffer, bytearray):
        view = (ctypes.c_char * len(buffer)).from_buffer(buffer)
        return ctypes.addressof(view), view
    pointer = ctypes.c_char_p(buffer)
    return ctypes.cast(pointer, ctypes.c_void_p).value, pointer


@dataclass(frozen=True)
class Effort:
    """liblzma encoder settings; decoding needs none of them."""

    preset: int
    match_finder: int | None = None  # None: the preset's
    nice_len: int | None = None
    depth: int | None = None
    # The encoder's dictionary, below the decoder's where window + data is larger: it then matches
    # against the window's last bytes only, and the stream still decodes with the full dictionary
    # (every distance it uses is within both). Where the dictionary passes 16 MiB, liblzma's HC4
    # hash table doubles to 64 MiB: together with the match finder's 4 bytes per dictionary byte,
    # 16 MiB instead of 20 takes ~50 MiB off an encoder that runs beside a suffix sort.
    dict_max: int = 16 << 20


# Presets 6 to 9 differ only in the dictionary size, which is set here. On an 8 MiB segment of a
# Rust binary against a 12 MiB window (biome 1.8.3 -> 1.9.0), preset 6 (BT4 match finder, ~12
# bytes per dictionary byte) takes 9.4 s; the HC4 match finder with nice_len 64 and depth 16
# takes 4.9 s for 5% more and ~7 bytes per dictionary byte, which lets it run beside bsdiff's
# suffix array within creation's memory bound.
FULL = Effort(6, match_finder=MF_HC4, nice_len=64, depth=16)
# Preset 1 (HC4, fast mode) is 4-8x faster than FULL and ~15% larger, and ranks candidates alike.
PROBE = Effort(1)


def _options(window: bytes | bytearray, size: int, effort: Effort, *, encoder: bool) -> tuple[_OptionsLzma, object]:
    options = _OptionsLzma()
    if _liblzma().lzma_lzma_preset(ctypes.byref(options), effort.preset):
        raise LzDictError(f"liblzma does not support preset {effort.preset}")
    if effort.match_finder is not None:
        options.mf = effort.match_finder
    if effort.nice_len is not None:
        options.nice_len = effort.nice_len
    if effort.depth is not None:
        options.depth = effort.depth
    options.dict_size = dict_size(len(window), size)
    if encoder:
        options.dict_size = min(options.dict_size, max(effort.dict_max, MIN_DICT))
    options.preset_dict, keep = _address(window)
    options.preset_dict_size = len(window)
    return options, keep


def _run(encoder: bool, window: bytes | bytearray, data: bytes | bytearray, out_capacity: int, effort: Effort,
         cancel: threading.Event | None = None) -> tuple[bytearray, bool]:
    """(output, whether the stream ended with all input consumed); output never exceeds out_capacity + 1.

    The encoder is fed FEED bytes per call and checks `cancel` between calls; liblzma's output
    does not depend on how its input is split.
    """
    lib = _liblzma()
    options, window_keep = _options(window, len(data) if encoder else out_capacity, effort, encoder=encoder)
    filters = (_Filter * 2)(_Filter(LZMA_FILTER_LZMA2, ctypes.cast(ctypes.pointer(options), ctypes.c_void_p)),
                            _Filter(LZMA_VLI_UNKNOWN, None))
    stream = _Stream()
    start = lib.lzma_raw_encoder if encoder else lib.lzma_raw_decoder
    if start(ctypes.byref(stream), filters) != LZMA_OK:
        raise LzDictError("liblzma refused the filter chain")
    source, source_keep = _address(data)
    output = bytearray(out_capacity + 1)  # one spare byte shows a stream that holds too much
    target = (ctypes.c_char * len(output)).from_buffer(output)
    try:
        stream.next_in = source
        stream.next_out, stream.avail_out = ctypes.addressof(target), len(output)
        fed = len(data) if not encoder else min(FEED, len(data))
        stream.avail_in = fed
        action = LZMA_FINISH if encoder and fed == len(data) else LZMA_RUN
        result = lib.lzma_code(ctypes.byref(stream), action)
        # liblzma answers LZMA_BUF_ERROR instead of looping when no progress is possible
        while result == LZMA_OK and stream.avail_out and (encoder or stream.avail_in):
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            if encoder and not stream.avail_in and fed < len(data):
                more = min(FEED, len(data) - fed)
                stream.avail_in, fed = more, fed + more
                action = LZMA_FINISH if fed == len(data) else LZMA_RUN
            result = lib.lzma_code(ctypes.byref(stream), action)
        if result not in (LZMA_OK, LZMA_STREAM_END):
            raise LzDictError(f"lz-dict stream is corrupt (liblzma error {result})")
        produced, ended = len(output) - stream.avail_out, result == LZMA_STREAM_END and stream.avail_in == 0
    finally:
        lib.lzma_end(ctypes.byref(stream))
        del target, window_keep, source_keep
    del output[produced:]  # in place: a segment's output is never held twice
    return output, ended


def compress(window: bytes | bytearray, data: bytes | bytearray, *, effort: Effort = FULL,
             cancel: threading.Event | None = None) -> bytes:
    """Raw LZMA2 of `data` against `window`; Cancelled once `cancel` is set."""
    # LZMA2 never expands by more than a small fraction: chunk headers on stored chunks.
    capacity = len(data) + len(data) // 64 + 4096
    packed, ended = _run(True, window, data, capacity, effort, cancel)
    if not ended or len(packed) > capacity:
        raise LzDictError("lz-dict encoder did not finish")
    return bytes(packed)


def decompress(window: bytes | bytearray, packed: bytes, size: int) -> bytearray:
    """Exactly `size` bytes from a raw LZMA2 stream primed with `window`, or LzDictError."""
    data, ended = _run(False, window, packed, size, PROBE)  # the decoder reads only the dictionary size
    if len(data) != size or not ended:
        raise LzDictError(f"lz-dict stream does not hold exactly the {size} bytes promised")
    return data
