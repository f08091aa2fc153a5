"""Llama 3's BPE tokenizer, offline: tiktoken over `tokenizer.model` from Meta's PyPI package `llama-models==0.3.0`
(Llama 3 Community License: the file is Meta's; using it accepts that license).

The file is read without importing the package's code: from an installed distribution (`pip install --no-deps
llama-models==0.3.0`) when present, else from its wheel, fetched once with `pip download --no-deps` into the cache.
Either way its sha256 must match. The file holds 128,000 lines "base64(bytes) rank"; the 256 special tokens that follow
(128000..128255) are Meta's list (llama_models/llama3/tokenizer.py).
"""
from __future__ import annotations

import base64
import functools
import hashlib
import importlib.metadata
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import tiktoken

from ...errors import UserError
from ...formats.atomic import atomic_write_bytes
from ...paths import cache_dir

MODEL_SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"
MODEL_BYTES = 2_183_982
PACKAGE, VERSION = "llama-models", "0.3.0"
MEMBER = "llama_models/llama3/tokenizer.model"
WHEEL = "llama_models-0.3.0-py3-none-any.whl"
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
           r"\s+(?!\S)|\s+")
SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
           "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
           "<|eot_id|>", "<|python_tag|>", "<|image|>"]
SPECIAL += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(SPECIAL))]
MAX_CHARS = 400_000  # tiktoken panics on longer single inputs (Meta splits there too)
MAX_RUN = 25_000     # Meta's MAX_NO_WHITESPACES_CHARS: no piece encoded holds a longer run of one class
# the characters str.isspace() calls whitespace (what Meta's split tests), as code points (the tests check them
# against str.isspace over every code point)
SPACES = (0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x1C, 0x1D, 0x1E, 0x1F, 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B),
          0x2028, 0x2029, 0x202F, 0x205F, 0x3000)
_FIX = f"pip install --no-deps {PACKAGE}=={VERSION}"


def _check(data: bytes, where) -> bytes:
    if len(data) != MODEL_BYTES or hashlib.sha256(data).hexdigest() != MODEL_SHA256:
        raise UserError(f"{where} is not Llama 3's tokenizer.model of {PACKAGE}=={VERSION} (wrong size or sha256); "
                        f"try: {_FIX} --force-reinstall")
    return data


def _from_installed() -> bytes | None:
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != VERSION:
        return None
    path = Path(dist.locate_file(MEMBER))
    return _check(path.read_bytes(), path) if path.is_file() else None


def model_file_bytes() -> bytes:
    """The verified tokenizer.model: installed package, or the cached copy, or fetched once from PyPI."""
    data = _from_installed()
    if data is not None:
        return data
    cached = cache_dir() / "llama3" / "tokenizer.model"
    if cached.is_file():
        data = cached.read_bytes()
        if len(data) == MODEL_BYTES and hashlib.sha256(data).hexdigest() == MODEL_SHA256:
            return data
    downloads = cache_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    print(f"fetching Llama 3's tokenizer ({PACKAGE}=={VERSION}, 6.6 MB, Llama 3 Community License) from PyPI",
          file=sys.stderr, flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=".pip-download.", dir=downloads))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               f"{PACKAGE}=={VERSION}", "-d", str(tmp)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        wheel = tmp / WHEEL
        if r.returncode != 0 or not wheel.exists():
            last = (r.stderr.strip() or r.stdout.strip() or "no output").splitlines()[-1]
            raise UserError(f"Llama 3's tokenizer could not be fetched with pip download ({last}); try: {_FIX}")
        try:
            with zipfile.ZipFile(wheel) as z:
                data = _check(z.read(MEMBER), f"{MEMBER} in {WHEEL}")
        except (zipfile.BadZipFile, KeyError) as e:
            raise UserError(f"the downloaded {WHEEL} is damaged ({e}); try: {_FIX}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cached.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(cached, data)
    return data


def _ranks(data: bytes) -> dict[bytes, int]:
    ranks = {}
    for i, line in enumerate(data.splitlines()):
        token, rank = line.split()
        if int(rank) != i:
            raise UserError("Llama 3's tokenizer.model has its ranks out of order")
        ranks[base64.b64decode(token)] = i
    return ranks


class Tokenizer:
    """Llama 3's BPE. `encode` treats text as ordinary (special-token text is encoded as plain text); documents are
    preceded by `doc` (<|begin_of_text|>) in shards; `eot` (<|end_of_text|>) ends a sample."""
    name = "llama3"

    def __init__(self, encoding: tiktoken.Encoding):
        self._enc = encoding
        self.vocab_size: int = encoding.n_vocab                     # 128256
        self.special = {t: 128000 + i for i, t in enumerate(SPECIAL)}
        self.doc: int = self.special["<|begin_of_text|>"]            # 128000
        self.eot: int = self.special["<|end_of_text|>"]              # 128001

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        for piece in pieces(text):
            out += self._enc.encode_ordinary(piece)
        return out

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        """encode() of each text; their pieces go to tiktoken's threads together."""
        split = [list(pieces(t)) for t in texts]
        if all(len(p) == 1 for p in split):
            return self._enc.encode_ordinary_batch([p[0] for p in split], num_threads=num_threads)
        ids = iter(self._enc.encode_ordinary_batch([q for p in split for q in p], num_threads=num_threads))
        return [[i for _ in p for i in next(ids)] for p in split]

    def decode(self, ids: Iterable[int]) -> str:
        ids = ids.ravel().tolist() if isinstance(ids, np.ndarray) else [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise UserError(f"token id {bad[0]} is outside the tokenizer's vocabulary 0..{self.vocab_size - 1}")
        return self._enc.decode(ids, errors="replace")


def pieces(text: str) -> Iterator[str]:
    """The substrings Meta's tokenizer encodes one by one (llama_models/llama3/tokenizer.py, `encode`): chunks of
    MAX_CHARS characters, each cut so that no piece holds a run of more than MAX_RUN whitespace or non-whitespace
    characters. Meta's loop over the characters cuts a run that starts at a before a + MAX_RUN, a + 2 MAX_RUN, ...
    while the run goes on (its count restarts at each cut); the cuts here are the same, the runs found with NumPy."""
    for i in range(0, len(text), MAX_CHARS):
        chunk = text[i:i + MAX_CHARS]
        start = 0
        for a, b in _long_runs(chunk) if len(chunk) > MAX_RUN else ():
            for cut in range(a + MAX_RUN, b, MAX_RUN):
                yield chunk[start:cut]
                start = cut
        yield chunk[start:]


@functools.cache
def _space_table() -> np.ndarray:
    """bool (0x110000,): whether each code point is whitespace (SPACES)."""
    table = np.zeros(0x110000, bool)
    table[list(SPACES)] = True
    return table


def _long_runs(chunk: str) -> list[tuple[int, int]]:
    """(start, end) of each maximal run of more than MAX_RUN whitespace or non-whitespace characters in `chunk`."""
    space = _space_table()[np.frombuffer(chunk.encode("utf-32-le", "surrogatepass"), "<u4")]
    edges = np.flatnonzero(space[1:] != space[:-1]) + 1
    starts, ends = np.r_[0, edges], np.r_[edges, len(chunk)]
    long = ends - starts > MAX_RUN
    return list(zip(starts[long].tolist(), ends[long].tolist()))


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> Tokenizer:
    """Llama 3's tokenizer, built once per process."""
    ranks = _ranks(model_file_bytes())
    special = {t: len(ranks) + i for i, t in enumerate(SPECIAL)}
    return Tokenizer(tiktoken.Encoding(name="llama3-llmpy", pat_str=PATTERN, mergeable_ranks=ranks,
                                       special_tokens=special))


def _byte_chars() -> list[str]:
    """GPT-2's byte-to-character table (`bytes_to_unicode`), which the `tokenizers` byte-level BPE spells tokens
    with: printable bytes stand for themselves, the others for characters from U+0100 on."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def hf_tokenizer_files(max_len: int) -> dict[str, bytes]:
    """Llama 3's tokenizer as the files transformers loads (tokenizer.json for `tokenizers`, tokenizer_config.json),
    keyed by file name, the way Meta's Hugging Face repositories hold it: a byte-level BPE whose merges are every
    split of each token into two tokens, in the order of the token's rank (which is tiktoken's rule: the pair
    whose join ranks lowest merges first; `ignore_merges` takes a piece that is a token whole, as tiktoken does),
    Meta's split regex before it, the 256 special tokens, and <|begin_of_text|> put before each text (what
    `llmpy prepare` puts before each document). `max_len`: the model's context. Unlike our `encode`, transformers
    matches special-token text as the special token."""
    ranks = _ranks(model_file_bytes())
    chars = _byte_chars()

    def spell(b: bytes) -> str:
        return "".join(chars[x] for x in b)
    merges = []
    for token in ranks:  # in rank order
        pairs = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        pairs.sort(key=lambda p: (ranks[p[0]], ranks[p[1]]))
        merges += [[spell(a), spell(b)] for a, b in pairs]
    specials = [{"id": len(ranks) + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True} for i, t in enumerate(SPECIAL)]
    bos = {"id": SPECIAL[0], "type_id": 0}
    tokenizer = {  # the `tokenizers` library's serialization, as in Meta's Llama 3 repositories on the Hub
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": specials, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": PATTERN}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": {"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
            {"type": "TemplateProcessing",
             "single": [{"SpecialToken": bos}, {"Sequence": {"id": "A", "type_id": 0}}],
             "pair": [{"SpecialToken": bos}, {"Sequence": {"id": "A", "type_id": 0}},
                      {"SpecialToken": bos | {"type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
             "special_tokens": {SPECIAL[0]: {"id": SPECIAL[0], "ids": [len(ranks)], "tokens": [SPECIAL[0]]}}}]},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {spell(t): r for t, r in ranks.items()}, "merges": merges}}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len, "bos_token": SPECIAL[0],
              "eos_token": SPECIAL[1], "clean_up_tokenization_spaces": False,
              "model_input_names": ["input_ids", "attention_mask"]}
    return {"tokenizer.json": (json.dumps(tokenizer, ensure_ascii=False) + "\n").encode("utf-8"),
            "tokenizer_config.json": (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode("utf-8")}


def fingerprint() -> dict:
    """What a cache stamp needs to know that shards were made with this very tokenizer."""
    return {"llama3 tokenizer.model": MODEL_SHA256}

