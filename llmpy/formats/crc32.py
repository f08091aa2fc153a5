"""CRC-32 (zlib's) of large buffers on a thread pool: 16 MiB chunks are checksummed in parallel as soon as they are
read or written (zlib releases the GIL), and joined with crc32_combine, which Python's zlib does not expose.

crc32_combine(c1, c2, n2) is the CRC of A + B from c1 = crc(A), c2 = crc(B) and n2 = len(B): appending n2 zero
bytes to A's CRC register is a linear map over GF(2), a 32x32 bit matrix, so crc(A + B) = M(n2) c1 ^ c2. M(n) is
found by repeated squaring (zlib's crc32.c); it is cached per length (each takes ~2 ms; a tensor's chunks share
one length).
"""
from __future__ import annotations

import functools
import zlib
from concurrent.futures import Executor, Future

import numpy as np

CHUNK = 16 << 20


def chunks(pool: Executor, buf: np.ndarray) -> list[tuple[Future, int]]:
    """(future CRC, length) of each CHUNK of `buf` (bytes: a uint8 array), submitted to `pool` now."""
    return [(pool.submit(zlib.crc32, buf[i:i + CHUNK]), min(CHUNK, buf.nbytes - i))
            for i in range(0, buf.nbytes, CHUNK)]


def join(parts: list[tuple[Future, int]]) -> int:
    """The CRC-32 of the whole buffer from its chunks' (in order)."""
    crc = 0  # the CRC of nothing
    for fut, n in parts:
        crc = combine(crc, fut.result(), n)
    return crc


def combine(crc1: int, crc2: int, len2: int) -> int:
    return _times(_zeros_operator(len2), crc1) ^ crc2


def _times(mat: tuple[int, ...], vec: int) -> int:
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


def _square(mat: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(_times(mat, m) for m in mat)


@functools.lru_cache(maxsize=256)
def _zeros_operator(nbytes: int) -> tuple[int, ...]:
    """The matrix (32 columns as ints) that appends `nbytes` zero bytes to a CRC-32 register."""
    op = tuple(1 << i for i in range(32))  # identity
    power = (0xEDB88320, *(1 << i for i in range(31)))  # one zero bit: the reflected polynomial's shift
    for _ in range(3):
        power = _square(power)  # -> one zero byte
    while nbytes:
        if nbytes & 1:
            op = tuple(_times(power, c) for c in op)
        nbytes >>= 1
        if nbytes:
            power = _square(power)
    return op
