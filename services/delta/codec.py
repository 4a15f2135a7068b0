"""Segment compression: lzma (xz) or zstd, with decompression bounded to the promised size.

lzma's dictionary is sized to the segment (at most 8 MiB) so that compressing stays under
~100 MB and a device decompresses with an 8 MiB dictionary; the decoder's memlimit refuses a
hostile stream that asks for more. zstd decoding is capped the same way by max_window_size.
"""

from __future__ import annotations

import lzma
from typing import Literal

import zstandard

Compression = Literal["lzma", "zstd"]
MAX_DICT = 8 << 20
DECODER_MEMORY = 32 << 20
ZSTD_LEVEL = 19


class CorruptStream(ValueError):
    pass


def _lzma_filters(size: int) -> list[dict]:
    dict_size = 1 << 16
    while dict_size < min(size, MAX_DICT):
        dict_size <<= 1
    return [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": dict_size}]


def compress(data: bytes, compression: Compression) -> bytes:
    if compression == "lzma":
        return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_NONE, filters=_lzma_filters(len(data)))
    params = zstandard.ZstdCompressionParameters.from_level(ZSTD_LEVEL, source_size=len(data), window_log=23)
    return zstandard.ZstdCompressor(compression_params=params).compress(data)


def decompress(packed: bytes, compression: Compression, sizes: tuple[int, ...]) -> list[bytes]:
    """The stream cut into parts of exactly `sizes` bytes, or CorruptStream; allocates no more.

    Parts come straight out of the decoder so a segment's streams are never held twice.
    """
    expected = sum(sizes)
    try:
        if compression == "lzma":
            decoder = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=DECODER_MEMORY)
            parts, pending = [], packed
            for size in sizes:
                parts.append(decoder.decompress(pending, max_length=size) if size and not decoder.eof else b"")
                pending = pending if not size else b""
            if pending:  # every part was empty: the stream must still be a complete, empty one
                parts.append(decoder.decompress(pending, max_length=1))
            surplus = decoder.decompress(b"", max_length=1) if not decoder.eof else b""
            complete = decoder.eof and not decoder.unused_data and not surplus
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
