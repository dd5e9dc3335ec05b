"""Bit packing: signed integers of any width from 1 to 64 bits, most significant bit first."""

from __future__ import annotations

import math

import numpy as np

_CHUNK = 2**20  # values packed at once; a multiple of 8 keeps chunks byte-aligned


def pack_bits(q: np.ndarray, width: int) -> bytes:
    """Packs integers ``q`` as ``width``-bit two's complement, most significant bit first.

    Example::

        pack_bits(np.array([1, -3]), 3)  # 001 101 -> b'4' (0b00110100)
    """
    q = np.ascontiguousarray(q, dtype=np.int64).ravel()
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint64)
    chunks = []
    for start in range(0, len(q), _CHUNK):
        u = q[start : start + _CHUNK].view(np.uint64)  # two's complement, then keep `width` bits
        bits = ((u[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)
        chunks.append(np.packbits(bits.ravel()))
    return b"".join(c.tobytes() for c in chunks)


def unpack_bits(data: bytes, count: int, width: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` signed integers of ``width`` bits (int64).

    Example::

        unpack_bits(pack_bits(np.array([1, -3]), 3), 2, 3)  # array([ 1, -3])
    """
    out = np.empty(count, dtype=np.int64)
    for start, chunk in unpack_chunks(data, count, width):
        out[start : start + len(chunk)] = chunk
    return out


def unpack_chunks(data: bytes, count: int, width: int):
    """:func:`unpack_bits` a chunk at a time: yields ``(start, int64 integers)``.

    A reader that converts each chunk as it comes keeps its working memory to one chunk, whatever
    ``count`` is (a 1-bit file would otherwise grow 64 times into int64).

    Example::

        for start, q in unpack_chunks(data, count, width):
            weights[start : start + len(q)] = q
    """
    raw = np.frombuffer(data, dtype=np.uint8)
    weights = np.left_shift(np.uint64(1), np.arange(width - 1, -1, -1, dtype=np.uint64))
    for start in range(0, count, _CHUNK):
        n = min(_CHUNK, count - start)
        first = start * width // 8
        bits = np.unpackbits(raw[first : first + math.ceil(n * width / 8)], count=n * width)
        u = bits.reshape(n, width).astype(np.uint64) @ weights
        negative = (u >> np.uint64(width - 1)) & np.uint64(1)
        yield start, u.astype(np.int64) - (negative.astype(np.int64) << width)


def packed_size(count: int, width: int) -> int:
    """Bytes that :func:`pack_bits` writes for ``count`` integers of ``width`` bits.

    Example::

        packed_size(10, 3)  # 4
    """
    return (count * width + 7) // 8
