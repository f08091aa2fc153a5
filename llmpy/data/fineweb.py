"""`llmpy prepare fineweb-edu | fineweb`: a FineWeb sample from the Hugging Face Hub -> llm.c token shards.

The sample's parquet files (`sample/10BT/*.parquet` or `sample/100BT/*.parquet` of the dataset repository
`HuggingFaceFW/fineweb-edu` or `HuggingFaceFW/fineweb`) are downloaded in name order, only as many as the tokens
asked for need, into `cache_dir()/hub/datasets/HuggingFaceFW--<dataset>/main/sample/<sample>/` (formats/hub.py:
resumable, size and sha256 checked; the file listing is kept there as `.tree.json`). Each row's `text` is one
document: tokenized in worker processes, concatenated in file and row order, each preceded by the tokenizer's
document token (GPT-2's EOT, Llama 3's <|begin_of_text|>). The token stream is cut into shards of `shard_tokens`
tokens, named as llm.c's `dev/data/fineweb.py` names them: the first is `{name}_val_000000.bin`, then
`{name}_train_000001.bin`, ... (`name` is `edu_fineweb` or `fineweb`; documents run across shard boundaries; the last
shard holds the rest). uint16 shards for GPT-2's tokenizer, uint32 ones (version 7) for Llama 3's. The same files
give the same shards whatever the number of workers.

Done once: `{name}.stamp.json` beside the shards records what made them (dataset, listing, tokenizer, sizes); a later
call with the same settings finds it and returns at once.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import sys
from collections import deque
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from ..errors import UserError
from ..formats import hub
from ..formats.atomic import atomic_write_bytes
from ..paths import cache_dir, make_dir
from .prepare import SHARD_TOKENS, check_free
from .shards import MAX_SHARD_TOKENS, SHARD32_MAGIC, SHARD32_VERSION, SHARD_MAGIC, SHARD_VERSION, write_shard

# dataset -> (Hub repository, shard name and folder stem, as llm.c's fineweb.py)
DATASETS = {"fineweb-edu": ("HuggingFaceFW/fineweb-edu", "edu_fineweb"),
            "fineweb": ("HuggingFaceFW/fineweb", "fineweb")}
SAMPLES = ("10BT", "100BT")
REVISION = "main"
STAMP_VERSION = 1
MAX_PROCESSES = 1024  # --workers: more processes than any machine runs usefully would only exhaust its memory
TASK_DOCS, TASK_CHARS = 512, 1 << 23  # documents sent to a worker at once: at most this many, or this much text
_INSTALL = "pyarrow is needed to read FineWeb's parquet files: pip install pyarrow (or pip install 'llmpy[data]')"


def default_out_dir(dataset: str = "fineweb-edu", sample: str = "10BT", tokenizer: str = "gpt2") -> Path:
    """llm.c's folder name (`edu_fineweb10B`, `fineweb100B`, ...) in the cache; `-<tokenizer>` for others than
    GPT-2's."""
    folder = f"{DATASETS[dataset][1]}{sample.removesuffix('T')}"
    if tokenizer != "gpt2":
        folder += "-llama3" if tokenizer == "llama3" else "-" + next(iter(_fingerprint(tokenizer).values()))[:16]
    return cache_dir() / folder


def shard_globs(dataset: str = "fineweb-edu", sample: str = "10BT", tokenizer: str = "gpt2",
                out_dir: str | os.PathLike | None = None, name: str | None = None) -> tuple[str, str]:
    """(train_glob, val_glob) of the shards `prepare_fineweb` writes with these settings."""
    out = Path(out_dir).expanduser() if out_dir is not None else default_out_dir(dataset, sample, tokenizer)
    name = name or DATASETS[dataset][1]
    return str(out / f"{name}_train_*.bin"), str(out / f"{name}_val_*.bin")


def prepare_fineweb(dataset: str = "fineweb-edu", sample: str = "10BT", out_dir: str | os.PathLike | None = None,
                    tokens: int | None = None, tokenizer: str = "gpt2", workers: int | None = None,
                    shard_tokens: int = SHARD_TOKENS, name: str | None = None,
                    progress: bool = True, overwrite: bool = False) -> tuple[str, str]:
    """(train_glob, val_glob) of `dataset`'s `sample` tokenized into `out_dir` (default `default_out_dir`); the
    first `tokens` tokens only when given (the last shard is cut there). See the module docstring. Shards of this
    name that an `out_dir` given already holds without this function's stamp beside them (another command's, or a
    run cut short) are refused unless `overwrite`."""
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}: choose from {', '.join(DATASETS)}")
    if sample not in SAMPLES:
        raise UserError(f"unknown FineWeb sample {sample!r}: choose from {', '.join(SAMPLES)}")
    if not 1 <= shard_tokens <= MAX_SHARD_TOKENS:
        raise UserError(f"shard size must be 1..{MAX_SHARD_TOKENS} tokens, got {shard_tokens}")
    if tokens is not None and tokens <= shard_tokens:
        raise UserError(f"--tokens {tokens} fills only the val shard (the first {shard_tokens} tokens): ask for more "
                        "tokens or a smaller --shard-tokens")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if not 1 <= workers <= MAX_PROCESSES:
        raise UserError(f"--workers must be 1..{MAX_PROCESSES} processes, got {workers}")
    repo, stem = DATASETS[dataset]
    name = stem if name is None else name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise UserError(f"bad dataset name {name!r}: use letters, digits, '.', '_' or '-'")
    out = Path(out_dir).expanduser() if out_dir is not None else default_out_dir(dataset, sample, tokenizer)
    globs = shard_globs(dataset, sample, tokenizer, out, name)
    if out_dir is not None and not (out / f"{name}.stamp.json").exists():
        check_free(out, name, overwrite)  # shards this function did not make: refused up front

    _pyarrow_parquet()  # before anything is downloaded
    from .tokenizers import get_tokenizer
    tok = get_tokenizer(tokenizer)  # here first: a tokenizer that must be fetched is fetched once, not per worker
    wide = tok.vocab_size > 65536
    files = [f for f in hub.list_dataset_files(repo, f"sample/{sample}", REVISION) if f.path.endswith(".parquet")]
    if not files:
        raise UserError(f"{repo} lists no parquet files in sample/{sample}")
    files.sort(key=lambda f: f.path)
    want = {"stamp_version": STAMP_VERSION, "repo": repo, "revision": REVISION, "sample": sample,
            "files_sha256": hashlib.sha256(json.dumps([[f.path, f.size, f.sha256] for f in files]).encode()
                                           ).hexdigest(),
            "tokenizer_sha256": _fingerprint(tokenizer),
            "shard_format": [SHARD32_MAGIC, SHARD32_VERSION] if wide else [SHARD_MAGIC, SHARD_VERSION],
            "shard_tokens": shard_tokens, "tokens": tokens}
    stamp_path = out / f"{name}.stamp.json"
    if _stamped(stamp_path, want, out):
        print(f"{name}: the shards in {out} are ready (delete {stamp_path.name} to make them again)")
        return globs
    make_dir(out, "output folder")
    stamp_path.unlink(missing_ok=True)

    used: list[str] = []
    threads = 8 if workers == 1 else 1  # tiktoken's own threads when tokenizing in this process only

    def downloaded() -> Iterator[Path]:  # one at a time, when the reader gets to it: no file more than needed
        for f in files:
            used.append(f.path)
            yield hub.fetch_dataset_file(repo, f, REVISION, progress=progress)

    writer = _ShardWriter(out, name, shard_tokens, np.uint32 if wide else np.uint16, tok.doc, tokens)
    jobs = (None if t is None else (tokenizer, t, threads) for t in _tasks(_texts(downloaded())))
    with tqdm(total=tokens, unit="tok", unit_scale=True, desc=f"tokenizing {name}", file=sys.stderr,
              disable=None if progress else True) as bar, \
            contextlib.closing(_ordered_map(_encode, jobs, workers, tokenizer)) as chunks:
        for chunk in chunks:
            n = writer.add(chunk)
            bar.update(n)
            if writer.full():
                break
    paths = writer.finish()
    if not paths:
        raise UserError(f"{repo} sample/{sample} has no documents")
    ours = re.compile(re.escape(name) + r"_(train|val)_\d{6}\.bin")
    for stale in set(out.glob(f"{name}_*.bin")) - set(paths):  # from an earlier, larger run: the glob would take them
        if ours.fullmatch(stale.name):
            stale.unlink()
    want["shards"] = {p.name: p.stat().st_size for p in paths}
    atomic_write_bytes(stamp_path, json.dumps(want, indent=1).encode())  # last: it says the shards are whole
    ntrain = len(paths) - 1
    print(f"{name}: {writer.docs:,} documents from {len(used)} of {len(files)} files of {repo} sample/{sample}, "
          f"{writer.total:,} tokens ({tokenizer}; a document token before each) -> val {writer.sizes[0]:,} tokens in "
          f"1 shard, train {writer.total - writer.sizes[0]:,} tokens in {ntrain} shard(s) in {out}")
    if not ntrain:
        print(f"warning: the sample held only the val shard's {writer.total:,} tokens: no train shard "
              "(use a smaller --shard-tokens)", file=sys.stderr)
    return globs


def _fingerprint(tokenizer: str) -> dict:
    if tokenizer == "gpt2":
        from .tokenizers.gpt2 import GPT2_FILE_HASHES
        return dict(GPT2_FILE_HASHES)
    if tokenizer == "llama3":
        from .tokenizers.llama3 import fingerprint
        return fingerprint()
    from .tokenizers import get_tokenizer
    return get_tokenizer(tokenizer).fingerprint()


def _stamped(stamp_path: Path, want: dict, out: Path) -> bool:
    try:
        stamp = json.loads(stamp_path.read_text())
        return ({k: stamp.get(k) for k in want} == want and bool(stamp["shards"])
                and all((out / f).stat().st_size == n for f, n in stamp["shards"].items()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False  # none, a damaged one, or a shard gone: make them again


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(_INSTALL) from None
    return pq


def _texts(paths: Iterable[Path]) -> Iterator[list[str] | None]:
    """The `text` column of each parquet file, in batches of rows, in file and row order (null texts skipped); None
    after each file."""
    pq = _pyarrow_parquet()
    import pyarrow as pa
    for path in paths:
        try:
            pf = pq.ParquetFile(path)
            if "text" not in pf.schema_arrow.names:
                raise UserError(f"{path} has no `text` column (it has: {', '.join(pf.schema_arrow.names)})")
            for batch in pf.iter_batches(batch_size=1024, columns=["text"]):
                yield [t for t in batch.column(0).to_pylist() if t is not None]
        except (pa.ArrowException, OSError) as e:
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{path} is not a readable parquet file ({why}): delete it and run again") from None
        yield None


def _tasks(batches: Iterable[list[str] | None]) -> Iterator[list[str] | None]:
    """Re-cut row batches into worker tasks of at most TASK_DOCS documents or about TASK_CHARS characters; a task
    ends with its file, and the None after each file is passed on."""
    task: list[str] = []
    chars = 0
    for batch in batches:
        if batch is None:
            if task:
                yield task
            yield None
            task, chars = [], 0
            continue
        for text in batch:
            task.append(text)
            chars += len(text)
            if len(task) >= TASK_DOCS or chars >= TASK_CHARS:
                yield task
                task, chars = [], 0
    if task:
        yield task


def _encode(job: tuple[str, list[str], int]) -> np.ndarray:
    """[doc, ids of text 0..., doc, ids of text 1..., ...] for a task's texts (runs in a worker process)."""
    from .tokenizers import get_tokenizer
    tokenizer, texts, threads = job
    tok = get_tokenizer(tokenizer)
    ids = tok.encode_batch(texts, num_threads=threads)
    n = sum(len(x) for x in ids) + len(ids)
    return np.fromiter(itertools.chain.from_iterable(itertools.chain((tok.doc,), x) for x in ids),
                       dtype=np.uint16 if tok.vocab_size <= 65536 else np.uint32, count=n)


def _worker_init(tokenizer: str) -> None:
    from .tokenizers import get_tokenizer
    get_tokenizer(tokenizer)


def _ordered_map(fn: Callable, jobs: Iterable, workers: int, tokenizer: str) -> Iterator:
    """fn over jobs in `workers` processes (spawned: safe beside threads), results in job order, with a bounded
    number of jobs in flight (Pool.imap would read every job ahead: the whole dataset). A None job is a barrier:
    every result before it is handed out before the next job is read (so a consumer that has enough by then never
    makes the next file be downloaded). Closing the generator stops the workers."""
    if workers == 1:
        yield from (fn(job) for job in jobs if job is not None)
        return
    with multiprocessing.get_context("spawn").Pool(workers, _worker_init, (tokenizer,)) as pool:
        pending: deque = deque()
        for job in jobs:
            if job is None:
                while pending:
                    yield pending.popleft().get()
                continue
            pending.append(pool.apply_async(fn, (job,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class _ShardWriter:
    """Fills one shard's buffer after the other; shard 0 is val, the others train (llm.c's names); stops at
    `limit` tokens when given."""

    def __init__(self, out: Path, name: str, shard_tokens: int, dtype, doc: int, limit: int | None):
        self.out, self.name, self.doc, self.limit = out, name, doc, limit
        self.buf = np.empty(shard_tokens if limit is None else min(shard_tokens, limit), dtype=dtype)
        self.fill = self.total = self.docs = 0
        self.paths: list[Path] = []
        self.sizes: list[int] = []

    def full(self) -> bool:
        return self.limit is not None and self.total >= self.limit

    def add(self, toks: np.ndarray) -> int:
        """Takes the tokens of whole documents (each starting with the document token); returns how many it kept."""
        if self.limit is not None:
            toks = toks[:self.limit - self.total]
        self.docs += int(np.count_nonzero(toks == self.doc))
        kept = len(toks)
        while len(toks):
            n = min(len(toks), len(self.buf) - self.fill)
            self.buf[self.fill:self.fill + n] = toks[:n]
            self.fill += n
            toks = toks[n:]
            if self.fill == len(self.buf):
                self._write()
        self.total += kept
        return kept

    def _write(self) -> None:
        k = len(self.paths)
        path = self.out / f"{self.name}_{'val' if k == 0 else 'train'}_{k:06d}.bin"
        write_shard(path, self.buf[:self.fill], wide=self.buf.dtype == np.uint32)
        self.paths.append(path)
        self.sizes.append(self.fill)
        self.fill = 0

    def finish(self) -> list[Path]:
        if self.fill:
            self._write()
        return self.paths
