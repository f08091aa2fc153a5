"""Token shard files in llm.c's format: write, check, read (memory-mapped).

Shard file (llm.c `dev/data/data_common.py`, read by llm.c's `dataloader.h`):
  header: 256 x int32 little-endian: [0] magic 20240520, [1] version 1, [2] number of tokens N
  body:   N x uint16 little-endian token ids
Documents are concatenated, each preceded by the EOT token (50256), as llm.c does.
"""
from __future__ import annotations

import os

import numpy as np
from numpy.typing import ArrayLike

from ..errors import UserError
from ..formats.atomic import atomic_write_bytes

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = 4 * HEADER_INTS
MAX_SHARD_TOKENS = 2**31 - 1  # the header's int32 count


def write_shard(path: str | os.PathLike, tokens: ArrayLike) -> None:
    """Write a 1-D sequence of token ids (each in 0..65535) as one shard, atomically."""
    toks = np.asarray(tokens).reshape(-1)
    if toks.size and not np.issubdtype(toks.dtype, np.integer):
        raise UserError(f"{path}: token ids must be integers, got {toks.dtype}")
    if toks.size > MAX_SHARD_TOKENS:
        raise UserError(f"{path}: {toks.size} tokens do not fit one shard (at most {MAX_SHARD_TOKENS})")
    if toks.size and (int(toks.min()) < 0 or int(toks.max()) > 65535):
        bad = int(toks.min()) if int(toks.min()) < 0 else int(toks.max())
        raise UserError(f"{path}: token id {bad} does not fit a shard's uint16 (0..65535)")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = [SHARD_MAGIC, SHARD_VERSION, toks.size]
    atomic_write_bytes(path, header.tobytes(), np.ascontiguousarray(toks, dtype="<u2").data)


def shard_num_tokens(path: str | os.PathLike) -> int:
    """Token count of a shard after checking its header and size (reads 1 KiB)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
    except OSError as e:
        raise UserError(f"cannot read token shard {path}: {e.strerror}")
    if size < HEADER_BYTES:
        raise UserError(f"{path} is not a token shard: {size} bytes, shorter than the {HEADER_BYTES}-byte header")
    magic, version, ntok = (int(x) for x in np.frombuffer(head, dtype="<i4", count=3))
    if magic != SHARD_MAGIC:
        raise UserError(f"{path} is not a token shard (magic {magic}, expected {SHARD_MAGIC})")
    if version != SHARD_VERSION:
        raise UserError(f"{path}: unsupported token shard version {version} (llmpy reads version {SHARD_VERSION})")
    if ntok < 0 or size != HEADER_BYTES + 2 * ntok:
        raise UserError(f"{path} is damaged or truncated: its header says {ntok} tokens "
                        f"({HEADER_BYTES + 2 * ntok} bytes) but the file has {size} bytes")
    return ntok


def read_shard(path: str | os.PathLike, vocab_size: int | None = None) -> np.ndarray:
    """The shard's tokens as a read-only uint16 array (memory-mapped: pages are read on use). With `vocab_size`,
    every id is checked to be < vocab_size (one pass over the file)."""
    ntok = shard_num_tokens(path)
    if ntok == 0:
        return np.zeros(0, dtype=np.uint16)  # an empty file region cannot be mapped
    toks = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(ntok,))
    if vocab_size is not None and int(toks.max()) >= vocab_size:
        i = int(np.argmax(toks >= vocab_size))
        raise UserError(f"{path}: token id {int(toks[i])} at position {i} is outside the vocabulary "
                        f"(size {vocab_size}); the shard was made with another tokenizer?")
    return toks


