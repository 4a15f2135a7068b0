"""Segment compression: lzma (xz) or zstd, with decompression bounded to the promised size.

lzma's dictionary is sized to the segment (at most 8 MiB) so that compressing stays under
~100 MB and a device decompresses with an 8 MiB dictionary; the decoder's memlimit refuses a
hostile stream that asks for more. zstd decoding is capped the same way by max_window_size.
"""

from __future__ import annotations

import lzma
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import zstandard

from schemas.errors import EdgeswarmError, ReasonCode

Compression = Literal["lzma", "zstd"]
Effort = Literal["max", "fast"]  # max while another segment's diff runs beside it; fast when nothing hides it
MAX_DICT = 8 << 20
DECODER_MEMORY = 32 << 20
ZSTD_LEVEL = 19
SPLIT_ABOVE = 1 << 20
MAX_STREAMS = 2


class CorruptStream(EdgeswarmError, ValueError):
    code = ReasonCode.BAD_PATCH


def _lzma_filters(size: int, effort: Effort) -> list[dict]:
    dict_size = 1 << 16
    while dict_size < min(size, MAX_DICT):
        dict_size <<= 1
    # bsdiff's streams have no 4-byte structure for the position bits to model and few literal
    # contexts worth 3 bits: lc 2, pb 0 packs them 0.5-1.7% smaller than the defaults (lc 3, pb 2)
    # at the same speed (libpython, libcrypto, pydantic-core, esbuild pairs).
    if effort == "max":
        return [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": dict_size, "lc": 2, "pb": 0}]
    # Long matches are what bsdiff's mostly-zero diff stream is made of: nice_len 192 keeps ~90% of
    # extreme mode's gain over preset 9 for ~60% of its time (libpython, libcrypto pairs).
    return [{"id": lzma.FILTER_LZMA2, "preset": 9, "dict_size": dict_size, "nice_len": 192, "mf": lzma.MF_BT4,
             "lc": 2, "pb": 0}]


def compress(data: bytes, compression: Compression, *, split: bool = True, effort: Effort = "max") -> bytes:
    """`split`: two concatenated xz streams compressed on both cores, half the time for ~1% in
    size; creation turns it off while a diff runs beside it, to stay under its memory budget."""
    if compression == "lzma":
        halves = [data] if len(data) < SPLIT_ABOVE or not split else [data[: len(data) // 2], data[len(data) // 2 :]]
        with ThreadPoolExecutor(len(halves)) as pool:
            return b"".join(pool.map(lambda part: _xz(part, effort), halves))
    params = zstandard.ZstdCompressionParameters.from_level(ZSTD_LEVEL, source_size=len(data), window_log=23)
    return zstandard.ZstdCompressor(compression_params=params).compress(data)


def _xz(data: bytes, effort: Effort = "max") -> bytes:
    return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_NONE, filters=_lzma_filters(len(data), effort))


def _xz_parts(packed: bytes, sizes: tuple[int, ...]) -> tuple[list[bytes], bool]:
    """Cut concatenated xz streams into parts; (parts, whether the input ended exactly at a stream end)."""
    decoder = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=DECODER_MEMORY)
    pending, streams, parts = packed, 1, []
    for size in sizes:
        chunks, need = [], size
        while need:
            if decoder.eof:
                pending = decoder.unused_data
                if not pending or streams >= MAX_STREAMS:
                    break
                decoder, streams = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=DECODER_MEMORY), streams + 1
            out = decoder.decompress(pending, max_length=need)
            pending = b""
            if not out and (decoder.needs_input or not decoder.eof):
                break  # truncated: no more output will come
            chunks.append(out)
            need -= len(out)
        parts.append(b"".join(chunks))
    # more output, or a stream that has not ended, means the stream holds more than promised
    surplus = decoder.decompress(pending, max_length=1) if not decoder.eof else b""
    return parts, decoder.eof and not decoder.unused_data and not surplus


def decompress(packed: bytes, compression: Compression, sizes: tuple[int, ...]) -> list[bytes]:
    """The stream cut into parts of exactly `sizes` bytes, or CorruptStream; allocates no more.

    Parts come straight out of the decoder so a segment's streams are never held twice.
    """
    expected = sum(sizes)
    try:
        if compression == "lzma":
            parts, complete = _xz_parts(packed, sizes)
        else:
            _check_zstd_frame(packed, expected)
            reader = zstandard.ZstdDecompressor(max_window_size=MAX_DICT * 2).stream_reader(packed, read_across_frames=False)
            parts = [reader.read(size) if size else b"" for size in sizes]
            complete = reader.read(1) == b""
    except (lzma.LZMAError, zstandard.ZstdError, MemoryError, EOFError) as exc:
        raise CorruptStream(f"{compression} stream is corrupt: {exc}") from None
    got = sum(len(part) for part in parts)
    if got != expected or not complete or any(len(part) != size for part, size in zip(parts, sizes)):
        raise CorruptStream(f"{compression} stream does not hold exactly the {expected} bytes promised")
    return parts


def _check_zstd_frame(packed: bytes, expected: int) -> None:
    try:
        params = zstandard.get_frame_parameters(packed)
    except zstandard.ZstdError as exc:
        raise CorruptStream(f"zstd frame header is corrupt: {exc}") from None
    if params.content_size != expected:
        raise CorruptStream(f"zstd frame declares {params.content_size} bytes, the header promises {expected}")
