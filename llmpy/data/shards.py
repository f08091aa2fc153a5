"""Token shard files in llm.c's format: write, check, read (memory-mapped).

Shard file (llm.c `dev/data/data_common.py`, read by llm.c's `dataloader.h`):
  header: 256 x int32 little-endian: [0] magic, [1] version, [2] number of tokens N
  body:   N token ids, little-endian: uint16 (magic 20240520, version 1: GPT-2's 50,257 tokens) or uint32 (magic
          20240801, version 7: Llama 3's 128,256)
Documents are concatenated, each preceded by the tokenizer's document token (GPT-2's EOT 50256, Llama 3's
<|begin_of_text|> 128000), as llm.c does.
"""
from __future__ import annotations

import os

import numpy as np
from numpy.typing import ArrayLike

from ..errors import UserError
from ..paths import open_input, reason
from ..formats.atomic import atomic_write_bytes

SHARD_MAGIC, SHARD_VERSION = 20240520, 1        # uint16 token ids
SHARD32_MAGIC, SHARD32_VERSION = 20240801, 7    # uint32 token ids
FORMATS = {(SHARD_MAGIC, SHARD_VERSION): np.dtype("<u2"), (SHARD32_MAGIC, SHARD32_VERSION): np.dtype("<u4")}
HEADER_INTS = 256
HEADER_BYTES = 4 * HEADER_INTS
MAX_SHARD_TOKENS = 2**31 - 1  # the header's int32 count


def write_shard(path: str | os.PathLike, tokens: ArrayLike, *, wide: bool = False) -> None:
    """Write a 1-D sequence of token ids as one shard, atomically: uint16 ids (version 1; ids above 65535 are
    refused), or with wide=True uint32 ids (version 7, for vocabularies such as Llama 3's)."""
    toks = np.asarray(tokens).reshape(-1)
    if toks.size and not np.issubdtype(toks.dtype, np.integer):
        raise UserError(f"{path}: token ids must be integers, got {toks.dtype}")
    if toks.size > MAX_SHARD_TOKENS:
        raise UserError(f"{path}: {toks.size} tokens do not fit one shard (at most {MAX_SHARD_TOKENS})")
    lo, hi = (int(toks.min()), int(toks.max())) if toks.size else (0, 0)
    top = 2**32 - 1 if wide else 65535
    if lo < 0 or hi > top:
        bad = lo if lo < 0 else hi
        raise UserError(f"{path}: token id {bad} does not fit a shard's {'uint32' if wide else 'uint16'} "
                        f"(0..{top})")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = [SHARD32_MAGIC, SHARD32_VERSION, toks.size] if wide else [SHARD_MAGIC, SHARD_VERSION, toks.size]
    atomic_write_bytes(path, header.tobytes(), np.ascontiguousarray(toks, dtype="<u4" if wide else "<u2").data)


def _header(path: str | os.PathLike) -> tuple[int, np.dtype]:
    """(token count, id dtype) of a shard after checking its header and size (reads 1 KiB)."""
    with open_input(path, "token shard") as f:
        try:
            size = os.fstat(f.fileno()).st_size
            head = f.read(HEADER_BYTES)
        except OSError as e:
            raise UserError(f"cannot read token shard {path}: {reason(e)}") from None
    if size < HEADER_BYTES:
        raise UserError(f"{path} is not a token shard: {size} bytes, shorter than the {HEADER_BYTES}-byte header")
    magic, version, ntok = (int(x) for x in np.frombuffer(head, dtype="<i4", count=3))
    if magic not in (SHARD_MAGIC, SHARD32_MAGIC):
        raise UserError(f"{path} is not a token shard (magic {magic}, expected {SHARD_MAGIC} or {SHARD32_MAGIC})")
    dtype = FORMATS.get((magic, version))
    if dtype is None:
        raise UserError(f"{path}: unsupported token shard version {version} for magic {magic} (llmpy reads "
                        f"{SHARD_MAGIC} version {SHARD_VERSION} and {SHARD32_MAGIC} version {SHARD32_VERSION})")
    if ntok < 0 or size != HEADER_BYTES + dtype.itemsize * ntok:
        raise UserError(f"{path} is damaged or truncated: its header says {ntok} tokens "
                        f"({HEADER_BYTES + dtype.itemsize * ntok} bytes) but the file has {size} bytes")
    return ntok, dtype


def shard_num_tokens(path: str | os.PathLike) -> int:
    """Token count of a shard after checking its header and size (reads 1 KiB)."""
    return _header(path)[0]


def read_shard(path: str | os.PathLike, vocab_size: int | None = None) -> np.ndarray:
    """The shard's tokens as a read-only uint16 or uint32 array (memory-mapped: pages are read on use). With
    `vocab_size`, every id is checked to be < vocab_size (one pass over the file)."""
    ntok, dtype = _header(path)
    if ntok == 0:
        return np.zeros(0, dtype=dtype)  # an empty file region cannot be mapped
    toks = np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(ntok,))
    if vocab_size is not None and int(toks.max()) >= vocab_size:
        i = int(np.argmax(toks >= vocab_size))
        raise UserError(f"{path}: token id {int(toks[i])} at position {i} is outside the vocabulary "
                        f"(size {vocab_size}); the shard was made with another tokenizer?")
    return toks
