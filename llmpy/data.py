"""Token shards in llm.c's format, `prepare` (text -> shards) and the training/validation DataLoader.

Shard file (llm.c `dev/data/data_common.py`, read by llm.c's `dataloader.h`):
  header: 256 x int32 little-endian: [0] magic 20240520, [1] version 1, [2] number of tokens N
  body:   N x uint16 little-endian token ids
Documents are concatenated, each preceded by the EOT token (50256), as llm.c does.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from numpy.typing import ArrayLike
from tqdm import tqdm

from .errors import UserError
from .formats.atomic import atomic_write_bytes
from .paths import cache_dir

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = 4 * HEADER_INTS
MAX_SHARD_TOKENS = 2**31 - 1  # the header's int32 count


# ---------------------------------------------------------------------------------------------- shard files

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


# ---------------------------------------------------------------------------------------------- prepare

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _input_files(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    found: dict[Path, Path] = {}
    for inp in inputs:
        p = Path(inp).expanduser()
        if p.is_dir():
            files = [f for f in p.rglob("*.txt") if f.is_file()]
        elif p.is_file():
            files = [p]
        else:
            raise UserError(f"input {inp} does not exist")
        for f in files:
            found.setdefault(f.resolve(), f)  # the same file named twice is one document
    return sorted(found.values(), key=str)


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}); convert it to UTF-8 first")


def _tokenize(texts: Iterator[str], ndocs: int, desc: str) -> list[np.ndarray]:
    """One uint16 array per document: [EOT, tokens...]. Documents go to tiktoken's threads in batches."""
    from .tokenizer import get_tokenizer
    tok = get_tokenizer()
    out: list[np.ndarray] = []
    batch: list[str] = []
    with tqdm(total=ndocs, unit="doc", desc=desc, disable=ndocs < 100) as bar:
        def flush():
            for ids in tok.encode_batch(batch):
                doc = np.empty(len(ids) + 1, dtype=np.uint16)  # ids < 50257 fit uint16
                doc[0] = tok.eot
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
        write_shard(paths[-1], tokens[start:start + shard_tokens])
    return paths


def _prepare_texts(texts: Iterator[str], ndocs: int, out_dir: str | os.PathLike, name: str, val_tokens: int | None,
                   val_fraction: float, shard_tokens: int) -> tuple[list[Path], list[Path]]:
    if not _NAME.fullmatch(name):
        raise UserError(f"bad dataset name {name!r}: use letters, digits, '.', '_' or '-'")
    if not 1 <= shard_tokens <= MAX_SHARD_TOKENS:
        raise UserError(f"shard size must be 1..{MAX_SHARD_TOKENS} tokens, got {shard_tokens}")
    if val_tokens is not None and val_tokens < 0:
        raise UserError(f"val tokens must be >= 0, got {val_tokens}")
    if not 0 <= val_fraction < 1:
        raise UserError(f"val fraction must be in [0, 1), got {val_fraction}")
    docs = _tokenize(texts, ndocs, f"tokenizing {name}")
    total = sum(len(d) for d in docs)
    if total == len(docs):
        raise UserError(f"the corpus for {name} has no text (only {len(docs)} empty documents)")
    tokens = np.concatenate(docs)  # the whole corpus in memory at 2 bytes a token
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
    print(f"{name}: {ndocs} documents, {total:,} tokens (EOT before each document) -> "
          f"val {n_val:,} tokens in {len(val)} shard(s), train {total - n_val:,} tokens in {len(train)} shard(s) "
          f"in {out}")
    return train, val


def prepare(inputs: list[str | os.PathLike], out_dir: str | os.PathLike, name: str, val_tokens: int | None = None,
            val_fraction: float = 0.05, shard_tokens: int = 100_000_000) -> tuple[list[Path], list[Path]]:
    """Tokenize text files (folders: every `*.txt` below them) into `{name}_val_NNNNNN.bin` and
    `{name}_train_NNNNNN.bin` shards of at most `shard_tokens` tokens in `out_dir`; returns (train, val) paths.
    Files are UTF-8 documents taken in sorted path order, each preceded by EOT. Val is the first `val_tokens`
    tokens of that stream (default: the first `val_fraction` of it, rounded down; not cut at a document
    boundary); train is the rest. Older `{name}_(train|val)_NNNNNN.bin` files in `out_dir` are removed."""
    files = _input_files(inputs)
    if not files:
        raise UserError(f"no text files (*.txt) found in {', '.join(map(str, inputs)) or 'the inputs'}")
    return _prepare_texts((_read_text(f) for f in files), len(files), out_dir, name, val_tokens, val_fraction,
                          shard_tokens)


STAMP_VERSION = 1
SHAKESPEARE_VAL_FRACTION = 0.05


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare_shakespeare(out_dir: str | os.PathLike | None = None) -> tuple[str, str]:
    """(train_glob, val_glob) of the Shakespeare corpus (`llmpy.corpus`, 42 works, ~1.57M tokens) tokenized into
    `out_dir` (default `cache_dir()/shakespeare/`). Works in name order, each preceded by EOT; val is the first
    5% of the tokens (All's Well That Ends Well and most of Antony and Cleopatra), train the rest, one shard
    each. Done once: later calls check a stamp file (corpus, tokenizer and format hashes, shard hashes) and
    return at once. Call it from one process before others read the shards."""
    from .corpus import corpus_sha256, shakespeare_texts
    from .tokenizer import GPT2_FILE_HASHES
    out = Path(out_dir).expanduser() if out_dir is not None else cache_dir() / "shakespeare"
    globs = (str(out / "shakespeare_train_*.bin"), str(out / "shakespeare_val_*.bin"))
    texts = shakespeare_texts()
    want = {"stamp_version": STAMP_VERSION, "shard_format": [SHARD_MAGIC, SHARD_VERSION],
            "corpus_sha256": corpus_sha256(texts), "tokenizer_sha256": GPT2_FILE_HASHES,
            "val_fraction": SHAKESPEARE_VAL_FRACTION}
    stamp_path = out / "shakespeare.stamp.json"
    try:
        stamp = json.loads(stamp_path.read_text())
        if {k: stamp.get(k) for k in want} == want and stamp["shards"] and all(
                _file_sha256(out / f) == h for f, h in stamp["shards"].items()):
            return globs
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # no stamp, a damaged one, or a shard gone: make them again
    stamp_path.unlink(missing_ok=True)
    train, val = _prepare_texts((t for _, t in texts), len(texts), out, "shakespeare", None,
                                SHAKESPEARE_VAL_FRACTION, 100_000_000)
    want["shards"] = {p.name: _file_sha256(p) for p in val + train}
    atomic_write_bytes(stamp_path, json.dumps(want, indent=1).encode())  # last: its presence means the shards are whole
    return globs


# ---------------------------------------------------------------------------------------------- loader

class DataLoader:
    """Batches of B sequences of T tokens from the shards matching `pattern` (sorted), for process `rank` of
    `world`.

    shuffle=False follows llm.c's dataloader exactly: shard by shard, batch i of a shard with ntok tokens
    (i < num_samples = (ntok-1) // (B*T*world)) is the B*T+1 tokens from i*B*T*world + rank*B*T; inputs are the
    first B*T, targets the same window shifted by one. After the last shard it wraps to the first (next epoch).
    shuffle=True (deterministic): epoch e visits shards in the order default_rng([seed, e]).permutation(n), and
    within shard file k (index in the sorted list) samples in default_rng([seed, e, k]).permutation(num_samples).

    `next_batch()` returns the same two preallocated int32 (B, T) arrays every call, overwritten in place: copy
    them to keep them. Shard headers are checked when the loader is made, token ids (against `vocab_size`) when a
    shard is first read. Only one shard is open at a time.
    """

    def __init__(self, pattern: str, B: int, T: int, *, rank: int = 0, world: int = 1, shuffle: bool = False,
                 seed: int = 0, vocab_size: int | None = None):
        if B < 1 or T < 1 or world < 1 or not 0 <= rank < world or seed < 0:
            raise UserError(f"bad loader settings: B={B} T={T} rank={rank} world={world} seed={seed} "
                            "(need B, T, world >= 1, 0 <= rank < world, seed >= 0)")
        self.pattern, self.B, self.T, self.rank, self.world = pattern, B, T, rank, world
        self.shuffle, self.seed, self.vocab_size = bool(shuffle), seed, vocab_size
        self.files = sorted(glob.glob(os.path.expanduser(pattern)))
        if not self.files:
            raise UserError(f"no token shards match {pattern!r}")
        span = B * T * world
        self._ntok = [shard_num_tokens(f) for f in self.files]
        self._num_samples = [(n - 1) // span if n else 0 for n in self._ntok]
        for f, n, ns in zip(self.files, self._ntok, self._num_samples):
            if ns == 0:
                raise UserError(f"{f} has {n} tokens, too few for one batch of B*T*world+1 = {span + 1} tokens "
                                f"(B={B}, T={T}, world={world}); use a smaller B or T")
        self.inputs = np.empty((B, T), dtype=np.int32)
        self.targets = np.empty((B, T), dtype=np.int32)
        self._in_flat, self._tgt_flat = self.inputs.reshape(-1), self.targets.reshape(-1)  # views
        self._validated: set[int] = set()
        self._loaded, self._tokens = -1, np.zeros(0, dtype=np.uint16)
        self.reset()

    @property
    def num_batches_per_epoch(self) -> int:
        """Batches in one pass over all shards (the same for every rank)."""
        return sum(self._num_samples)

    def reset(self) -> None:
        """Back to the first batch of epoch 0."""
        self._seek(0, 0, 0)

    def _seek(self, epoch: int, shard_pos: int, sample_pos: int) -> None:
        self._epoch, self._shard_pos, self._sample_pos = epoch, shard_pos, sample_pos
        self._order = self._shard_order(epoch)
        self._open_shard()

    def _shard_order(self, epoch: int) -> np.ndarray:
        n = len(self.files)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def _open_shard(self) -> None:
        k = int(self._order[self._shard_pos])
        if k != self._loaded:
            self._tokens = read_shard(self.files[k], None if k in self._validated else self.vocab_size)
            if len(self._tokens) != self._ntok[k]:
                raise UserError(f"{self.files[k]} changed while it was being read (now {len(self._tokens)} tokens)")
            self._validated.add(k)
            self._loaded = k
        self._perm = (np.random.default_rng([self.seed, self._epoch, k]).permutation(self._num_samples[k])
                      if self.shuffle else None)

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets), int32 (B, T): the loader's own buffers, overwritten by the next call."""
        if self._sample_pos >= self._num_samples[self._loaded]:
            self._shard_pos += 1
            if self._shard_pos == len(self.files):
                self._seek(self._epoch + 1, 0, 0)
            else:
                self._sample_pos = 0
                self._open_shard()
        i = self._sample_pos if self._perm is None else int(self._perm[self._sample_pos])
        BT = self.B * self.T
        start = i * BT * self.world + self.rank * BT
        window = self._tokens[start:start + BT + 1]
        np.copyto(self._in_flat, window[:-1])
        np.copyto(self._tgt_flat, window[1:])
        self._sample_pos += 1
        return self.inputs, self.targets

    def state(self) -> dict:
        """Position and settings, JSON-serialisable. The position is the same on every rank, so one rank's state
        can resume all of them."""
        return {"epoch": self._epoch, "shard_pos": self._shard_pos, "sample_pos": self._sample_pos,
                "B": self.B, "T": self.T, "world": self.world, "rank": self.rank, "shuffle": self.shuffle,
                "seed": self.seed, "files": [os.path.basename(f) for f in self.files]}

    def load_state(self, d: dict) -> None:
        """Continue exactly where the loader that saved `d` was. The shards may have moved folder; their names,
        B, T, world, shuffle (and seed when shuffling) must match."""
        try:
            epoch, shard_pos, sample_pos = int(d["epoch"]), int(d["shard_pos"]), int(d["sample_pos"])
            theirs = {k: d[k] for k in ("B", "T", "world", "shuffle", "seed", "files")}
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"data loader state is malformed ({e!r})")
        ours = self.state()
        keys = ["B", "T", "world", "shuffle"] + (["seed"] if self.shuffle else [])
        diff = [f"{k}={theirs[k]} (saved) vs {ours[k]} (now)" for k in keys if theirs[k] != ours[k]]
        if diff:
            raise UserError(f"cannot resume the data loader: {', '.join(diff)}")
        if list(theirs["files"]) != ours["files"]:
            raise UserError(f"cannot resume the data loader: it was saved over {len(theirs['files'])} shards "
                            f"{theirs['files'][:3]}..., but {self.pattern!r} matches {len(ours['files'])} shards "
                            f"{ours['files'][:3]}...")
        if epoch < 0 or not 0 <= shard_pos < len(self.files) or sample_pos < 0:
            raise UserError(f"data loader state has an impossible position: epoch {epoch}, shard {shard_pos}, "
                            f"sample {sample_pos}")
        k = int(self._shard_order(epoch)[shard_pos])
        if sample_pos > self._num_samples[k]:
            raise UserError(f"data loader state has sample {sample_pos} but shard {self.files[k]} has "
                            f"{self._num_samples[k]} batches")
        self._seek(epoch, shard_pos, sample_pos)
