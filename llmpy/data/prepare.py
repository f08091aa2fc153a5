"""`prepare`: text files -> llm.c token shards (data/shards.py), and the Shakespeare corpus prepared once into the
cache. Documents are concatenated, each preceded by the tokenizer's document token (GPT-2's EOT 50256, Llama 3's
<|begin_of_text|> 128000), as llm.c does; ids above 65535 make uint32 shards."""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from ..errors import UserError
from ..formats.atomic import atomic_write_bytes
from ..paths import cache_dir, file_problem, read_input
from .shards import MAX_SHARD_TOKENS, SHARD32_MAGIC, SHARD32_VERSION, SHARD_MAGIC, SHARD_VERSION, write_shard

VAL_FRACTION = 0.05        # of the tokens, when no --val-tokens
SHARD_TOKENS = 100_000_000  # tokens per shard file (llm.c's)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _input_files(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    found: dict[Path, Path] = {}
    for inp in inputs:
        p = Path(inp).expanduser()
        if os.path.isdir(p):
            files = [f for f in p.rglob("*.txt") if f.is_file()]
        elif (problem := file_problem(p)) is None:
            files = [p]
        else:
            raise UserError(f"input {inp} {problem}")
        for f in files:
            found.setdefault(f.resolve(), f)  # the same file named twice is one document
    return sorted(found.values(), key=str)


def _read_text(path: Path) -> str:
    try:
        return read_input(path, "text file").decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}); convert it to UTF-8 first")


def _tokenize(texts: Iterator[str], ndocs: int, desc: str, tokenizer: str) -> list[np.ndarray]:
    """One array per document: [doc token, tokens...] (uint16 when the vocabulary fits, else uint32). Documents go
    to tiktoken's threads in batches."""
    from .tokenizers import get_tokenizer
    tok = get_tokenizer(tokenizer)
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
    out: list[np.ndarray] = []
    batch: list[str] = []
    with tqdm(total=ndocs, unit="doc", desc=desc, disable=ndocs < 100) as bar:
        def flush():
            for ids in tok.encode_batch(batch):
                doc = np.empty(len(ids) + 1, dtype=dtype)
                doc[0] = tok.doc
                doc[1:] = ids
                out.append(doc)
            bar.update(len(batch))
            batch.clear()
        chars = 0
        for text in texts:
            batch.append(text)
            chars += len(text)
            if len(batch) >= 256 or chars >= 1 << 25:
                flush()
                chars = 0
        flush()
    return out


def _write_split(tokens: np.ndarray, out_dir: Path, name: str, split: str, shard_tokens: int) -> list[Path]:
    paths = []
    for k, start in enumerate(range(0, len(tokens), shard_tokens)):
        paths.append(out_dir / f"{name}_{split}_{k:06d}.bin")
        write_shard(paths[-1], tokens[start:start + shard_tokens], wide=tokens.dtype == np.uint32)
    return paths


def shards_in(out: Path, name: str) -> list[Path]:
    """The `{name}_(train|val)_NNNNNN.bin` shards in folder `out`, in name order."""
    ours = re.compile(re.escape(name) + r"_(train|val)_\d{6}\.bin")
    return sorted(p for p in out.glob(f"{name}_*.bin") if ours.fullmatch(p.name)) if out.is_dir() else []


def check_free(out: Path, name: str, overwrite: bool) -> None:
    """Shards named `name` already in `out` (made by another command, or from other texts) are only replaced when
    the user says so: a one-line refusal otherwise, before anything is read or written."""
    found = shards_in(out, name)
    if found and not overwrite:
        more = f" and {len(found) - 1} more" if len(found) > 1 else ""
        raise UserError(f"{out} already holds shards named {name} ({found[0].name}{more}): choose another --name "
                        "or --out, or add --overwrite to replace them")


def _prepare_texts(texts: Iterator[str], ndocs: int, out_dir: str | os.PathLike, name: str, val_tokens: int | None,
                   val_fraction: float, shard_tokens: int, tokenizer: str,
                   overwrite: bool = True) -> tuple[list[Path], list[Path]]:
    if not _NAME.fullmatch(name):
        raise UserError(f"bad dataset name {name!r}: use letters, digits, '.', '_' or '-'")
    check_free(Path(out_dir).expanduser(), name, overwrite)
    if not 1 <= shard_tokens <= MAX_SHARD_TOKENS:
        raise UserError(f"shard size must be 1..{MAX_SHARD_TOKENS} tokens, got {shard_tokens}")
    if val_tokens is not None and val_tokens < 0:
        raise UserError(f"val tokens must be >= 0, got {val_tokens}")
    if not 0 <= val_fraction < 1:
        raise UserError(f"val fraction must be in [0, 1), got {val_fraction}")
    docs = _tokenize(texts, ndocs, f"tokenizing {name}", tokenizer)
    total = sum(len(d) for d in docs)
    if total == len(docs):
        raise UserError(f"the corpus for {name} has no text (only {len(docs)} empty documents)")
    tokens = np.concatenate(docs)  # the whole corpus in memory at 2 (or 4) bytes a token
    del docs
    n_val = val_tokens if val_tokens is not None else int(total * val_fraction)
    if n_val >= total:
        raise UserError(f"val split of {n_val} tokens leaves no training data (the corpus has {total} tokens)")
    out = Path(out_dir).expanduser()
    val = _write_split(tokens[:n_val], out, name, "val", shard_tokens)
    train = _write_split(tokens[n_val:], out, name, "train", shard_tokens)
    # shards left from an earlier, larger run would be picked up by the `{name}_train_*.bin` glob
    ours = re.compile(re.escape(name) + r"_(train|val)_\d{6}\.bin")
    for stale in set(out.glob(f"{name}_*.bin")) - set(val) - set(train):
        if ours.fullmatch(stale.name):
            stale.unlink()
    print(f"{name}: {ndocs} documents, {total:,} tokens ({tokenizer}; a document token before each) -> "
          f"val {n_val:,} tokens in {len(val)} shard(s), train {total - n_val:,} tokens in {len(train)} shard(s) "
          f"in {out}")
    return train, val


def prepare(inputs: list[str | os.PathLike], out_dir: str | os.PathLike, name: str, val_tokens: int | None = None,
            val_fraction: float = VAL_FRACTION, shard_tokens: int = SHARD_TOKENS,
            tokenizer: str = "gpt2", overwrite: bool = False) -> tuple[list[Path], list[Path]]:
    """Tokenize text files (folders: every `*.txt` below them) into `{name}_val_NNNNNN.bin` and
    `{name}_train_NNNNNN.bin` shards of at most `shard_tokens` tokens in `out_dir`; returns (train, val) paths.
    Files are UTF-8 documents taken in sorted path order, each preceded by the tokenizer's document token (GPT-2:
    EOT; Llama 3: <|begin_of_text|>, in uint32 shards). Val is the first `val_tokens`
    tokens of that stream (default: the first `val_fraction` of it, rounded down; not cut at a document
    boundary); train is the rest. Shards of that name already in `out_dir` are refused, unless `overwrite`: then
    they are replaced (older ones beyond the new count removed)."""
    files = _input_files(inputs)
    if not files:
        raise UserError(f"no text files (*.txt) found in {', '.join(map(str, inputs)) or 'the inputs'}")
    return _prepare_texts((_read_text(f) for f in files), len(files), out_dir, name, val_tokens, val_fraction,
                          shard_tokens, tokenizer, overwrite)


STAMP_VERSION = 1
SHAKESPEARE_VAL_FRACTION = 0.05


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare_shakespeare(out_dir: str | os.PathLike | None = None, tokenizer: str = "gpt2",
                        overwrite: bool = False) -> tuple[str, str]:
    """(train_glob, val_glob) of the Shakespeare corpus (`llmpy.corpus`, 42 works, ~1.57M GPT-2 tokens) tokenized
    into `out_dir` (default `cache_dir()/shakespeare/`, or `shakespeare-<tokenizer>/` for another tokenizer than
    GPT-2's). Works in name order, each preceded by the document token; val is the first
    5% of the tokens (All's Well That Ends Well and most of Antony and Cleopatra), train the rest, one shard
    each. Done once: later calls check a stamp file (corpus, tokenizer and format hashes, shard hashes) and
    return at once; shards a stamp vouches for are made again when they no longer match it, but shakespeare_*
    shards without a stamp in an `out_dir` given are refused unless `overwrite`. Call it from one process before
    others read the shards."""
    from .corpus import corpus_sha256, shakespeare_texts
    if tokenizer == "gpt2":
        from .tokenizers.gpt2 import GPT2_FILE_HASHES as hashes
        shard_format, folder = [SHARD_MAGIC, SHARD_VERSION], "shakespeare"
    elif tokenizer == "llama3":
        from .tokenizers.llama3 import fingerprint
        hashes, shard_format, folder = fingerprint(), [SHARD32_MAGIC, SHARD32_VERSION], f"shakespeare-{tokenizer}"
    else:  # a tokenizer file: one folder per file content
        from .tokenizers import get_tokenizer
        tok = get_tokenizer(tokenizer)
        hashes = tok.fingerprint()
        shard_format = [SHARD_MAGIC, SHARD_VERSION] if tok.vocab_size <= 65536 else [SHARD32_MAGIC, SHARD32_VERSION]
        folder = f"shakespeare-{next(iter(hashes.values()))[:16]}"
    out = Path(out_dir).expanduser() if out_dir is not None else cache_dir() / folder
    globs = (str(out / "shakespeare_train_*.bin"), str(out / "shakespeare_val_*.bin"))
    texts = shakespeare_texts()
    want = {"stamp_version": STAMP_VERSION, "shard_format": shard_format,
            "corpus_sha256": corpus_sha256(texts), "tokenizer_sha256": hashes,
            "val_fraction": SHAKESPEARE_VAL_FRACTION}
    stamp_path = out / "shakespeare.stamp.json"
    try:
        stamp = json.loads(stamp_path.read_text())
        if {k: stamp.get(k) for k in want} == want and stamp["shards"] and all(
                _file_sha256(out / f) == h for f, h in stamp["shards"].items()):
            return globs
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # no stamp, a damaged one, or a shard gone: make them again
    ours = out_dir is None or stamp_path.exists()  # the cache, or shards this function made before
    stamp_path.unlink(missing_ok=True)
    train, val = _prepare_texts((t for _, t in texts), len(texts), out, "shakespeare", None,
                                SHAKESPEARE_VAL_FRACTION, SHARD_TOKENS, tokenizer, overwrite or ours)
    want["shards"] = {p.name: _file_sha256(p) for p in val + train}
    atomic_write_bytes(stamp_path, json.dumps(want, indent=1).encode())  # last: its presence means the shards are whole
    return globs


