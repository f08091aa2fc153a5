"""Llama 3's data path: its tokenizer (fetched once per test session with pip download, sha256-checked; golden
vectors; token for token Meta's own tokenizer.py, long runs of one character class included), llm.c's uint32 shards
(magic 20240801, version 7) beside the uint16 ones, and prepare with it."""
import json
import random
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from llmpy.data.loader import DataLoader
from llmpy.data.prepare import prepare
from llmpy.data.shards import read_shard, shard_num_tokens, write_shard
from llmpy.errors import UserError


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama3-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMPY_CACHE", str(path))
        from llmpy.data.tokenizers import llama3
        llama3.get_tokenizer.cache_clear()
        return llama3.get_tokenizer()


@pytest.mark.slow
def test_tokenizer_golden_vectors_and_special_tokens(tok):
    assert tok.encode("This is a test sentence.") == [2028, 374, 264, 1296, 11914, 13]  # docs/llama3.md's example
    assert tok.vocab_size == 128256
    assert (tok.doc, tok.eot) == (128000, 128001)
    s = tok.special
    assert (s["<|start_header_id|>"], s["<|end_header_id|>"], s["<|eot_id|>"]) == (128006, 128007, 128009)
    assert (s["<|finetune_right_pad_id|>"], s["<|eom_id|>"], s["<|python_tag|>"]) == (128004, 128008, 128010)
    assert s["<|reserved_special_token_245|>"] == 128255 and len(s) == 256
    text = "Naïve café — 12345 tokens\n\n\tend <|eot_id|>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert 128009 not in ids  # special-token text is ordinary text
    assert tok.decode([128000, 9906]) == "<|begin_of_text|>Hello"
    long = "a" * 1_000_001  # past tiktoken's safe input length: encoded in pieces, still exact
    assert tok.decode(tok.encode(long)) == long
    with pytest.raises(UserError, match="outside"):
        tok.decode([128256])


@pytest.fixture(scope="module")
def meta(tmp_path_factory):
    """Meta's own tokenizer: llama_models/llama3/tokenizer.py of llama-models==0.3.0 (it needs only tiktoken and the
    package's tokenizer_utils.py), read from the wheel that pip downloads, over the wheel's tokenizer.model."""
    from llmpy.data.tokenizers import llama3
    d = tmp_path_factory.mktemp("llama-models")
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                        f"{llama3.PACKAGE}=={llama3.VERSION}", "-d", str(d)], capture_output=True, text=True)
    if r.returncode != 0 or not (d / llama3.WHEEL).exists():
        pytest.skip(f"pip download {llama3.PACKAGE}=={llama3.VERSION} failed (offline?)")
    with zipfile.ZipFile(d / llama3.WHEEL) as z:
        for name in ("llama_models/__init__.py", "llama_models/tokenizer_utils.py", "llama_models/llama3/__init__.py",
                     "llama_models/llama3/tokenizer.py", llama3.MEMBER):
            z.extract(name, d / "src")
    sys.path.insert(0, str(d / "src"))
    try:
        from llama_models.llama3.tokenizer import Tokenizer
        yield Tokenizer(d / "src" / llama3.MEMBER)
    finally:
        sys.path.remove(str(d / "src"))
        for name in [m for m in sys.modules if m == "llama_models" or m.startswith("llama_models.")]:
            del sys.modules[name]


@pytest.mark.slow
def test_long_runs_are_split_before_bpe_token_for_token_as_metas_tokenizer(tok, meta):
    """Meta encodes no piece with a run of more than 25,000 whitespace or non-whitespace characters (and none longer
    than 400,000 characters): such runs are cut before BPE, which changes their tokens."""
    long_space = " " * 30_000 + "x"
    ours, theirs = tok.encode(long_space), meta.encode(long_space, bos=False, eos=False)
    assert ours == theirs and len(ours) == 237
    assert len(tok._enc.encode_ordinary(long_space)) == 236  # BPE over the whole run: one token fewer
    r = random.Random(0)
    texts = ["x" + "\n" * 25_001 + "y", "1" * 26_000, ("ab " * 10 + "z" * 25_000) * 3, "q" * 399_990 + "r" * 30_000,
             "\u00a0" * 26_000 + "a", "\u3000" * 50_001, "Naïve café " * 40_000, "", "a" * 25_000]
    for _ in range(10):
        texts.append("".join(r.choice(["a", " ", "\n", "\u2003", "é", "12", ". "]) *
                             r.choice([1, 3, 24_999, 25_000, 25_001, 50_001]) for _ in range(r.randrange(1, 10))))
    want = [meta.encode(t, bos=False, eos=False) for t in texts]
    assert [tok.encode(t) for t in texts] == want
    assert tok.encode_batch(texts) == want


def _metas_split(s: str, most: int):
    """Meta's _split_whitespaces_or_nonwhitespaces (llama_models/llama3/tokenizer.py of llama-models 0.3.0), as
    written there: the oracle of `pieces` without downloading anything."""
    current_slice_len = 0
    current_slice_is_space = s[0].isspace() if len(s) > 0 else False
    slice_start = 0
    for i in range(len(s)):
        is_now_space = s[i].isspace()
        if current_slice_is_space ^ is_now_space:
            current_slice_len = 1
            current_slice_is_space = is_now_space
        else:
            current_slice_len += 1
            if current_slice_len > most:
                yield s[slice_start:i]
                slice_start = i
                current_slice_len = 1
    yield s[slice_start:]


def test_pieces_are_metas_cuts(monkeypatch):
    """`pieces` (NumPy over the code points) cuts where Meta's loop over the characters cuts, at any run length and
    chunk size; its whitespace is str.isspace's, code point for code point."""
    from llmpy.data.tokenizers import llama3
    assert tuple(c for c in range(0x110000) if chr(c).isspace()) == llama3.SPACES
    r = random.Random(0)
    for most, chunk in ((3, 10), (5, 17), (25_000, 400_000)):
        monkeypatch.setattr(llama3, "MAX_RUN", most)
        monkeypatch.setattr(llama3, "MAX_CHARS", chunk)
        for _ in range(400 if most < 100 else 3):
            parts = [r.choice(["a", " ", "\n", "\u3000", "x\u00a0", "é"]) *
                     r.choice([1, 2, most - 1, most, most + 1, 2 * most, 2 * most + 1, 3 * most + 2])
                     for _ in range(r.randrange(0, 40 if most < 100 else 12))]
            text = "".join(parts)
            want = [p for i in range(0, len(text), chunk) for p in _metas_split(text[i:i + chunk], most)]
            assert list(llama3.pieces(text)) == want, text


def test_a_damaged_tokenizer_file_is_refused(tmp_path, monkeypatch):
    from llmpy.data.tokenizers import llama3
    monkeypatch.setenv("LLMPY_CACHE", str(tmp_path))
    monkeypatch.setattr(llama3, "_from_installed", lambda: None)
    (tmp_path / "llama3").mkdir()
    (tmp_path / "llama3" / "tokenizer.model").write_bytes(b"damaged")
    with pytest.raises(UserError, match="sha256"):
        llama3._check(b"damaged", "x")
    # a damaged cached copy is not used: it is fetched again, which here fails cleanly (no pip)
    monkeypatch.setattr(llama3.subprocess, "run", lambda *a, **k: type("R", (), {"returncode": 1, "stderr": "no net",
                                                                                  "stdout": ""})())
    with pytest.raises(UserError, match="could not be fetched"):
        llama3.model_file_bytes()


def test_uint32_shards_next_to_uint16_ones(tmp_path):
    ids = np.array([0, 65535, 65536, 128255, 7], np.int64)
    write_shard(tmp_path / "w.bin", ids, wide=True)  # uint32 ids: version 7
    raw = (tmp_path / "w.bin").read_bytes()
    assert raw[:12] == struct.pack("<3i", 20240801, 7, 5) and raw[1024:] == struct.pack("<5I", *ids.tolist())
    assert np.array_equal(read_shard(tmp_path / "w.bin", vocab_size=128256), ids)
    write_shard(tmp_path / "n.bin", [1, 2, 3], wide=True)  # a Llama 3 corpus is uint32 whatever its ids
    assert (tmp_path / "n.bin").read_bytes()[:8] == struct.pack("<2i", 20240801, 7)
    write_shard(tmp_path / "s.bin", [1, 2, 3])
    assert (tmp_path / "s.bin").read_bytes()[:8] == struct.pack("<2i", 20240520, 1)
    with pytest.raises(UserError, match="65536"):
        write_shard(tmp_path / "x.bin", [65536])
    with pytest.raises(UserError, match="outside the vocabulary"):
        read_shard(tmp_path / "w.bin", vocab_size=50257)
    # magic and version must agree; the size must fit the version's id width
    (tmp_path / "bad.bin").write_bytes(struct.pack("<3i", 20240801, 1, 5) + raw[12:])
    with pytest.raises(UserError, match="unsupported token shard version"):
        shard_num_tokens(tmp_path / "bad.bin")
    (tmp_path / "cut.bin").write_bytes(raw[:-2])
    with pytest.raises(UserError, match="damaged or truncated"):
        shard_num_tokens(tmp_path / "cut.bin")


def test_loader_reads_both_versions(tmp_path):
    r = np.random.default_rng(0)
    a = r.integers(0, 128256, 3000)
    write_shard(tmp_path / "d_000.bin", a, wide=True)
    x, y = DataLoader(str(tmp_path / "d_*.bin"), 2, 8, vocab_size=128256).next_batch()
    assert np.array_equal(x.reshape(-1), a[:16]) and np.array_equal(y.reshape(-1), a[1:17])


def test_prepare_with_llama3s_tokenizer(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMPY_CACHE", str(tmp_path / "cache"))
    (tmp_path / "a.txt").write_text("This is a test sentence.")
    (tmp_path / "b.txt").write_text("Another document, longer than the first one by far.")
    train, val = prepare([tmp_path], tmp_path / "out", "d", val_tokens=3, tokenizer="llama3")
    toks = np.concatenate([read_shard(p) for p in val + train])
    assert toks.dtype == np.uint32
    assert toks[:7].tolist() == [128000, 2028, 374, 264, 1296, 11914, 13]  # <|begin_of_text|> before each document
    assert toks[7] == 128000 and tok.decode(toks[8:]) == "Another document, longer than the first one by far."


@pytest.mark.slow
def test_train_and_sample_a_llama_on_llama3_shards(tok, tmp_path, capsys):
    """A Llama with Llama 3's vocabulary trains on uint32 shards made by `prepare --tokenizer llama3`, and its
    samples are decoded with that tokenizer (chosen from the vocabulary)."""
    from llmpy.cli import main
    text = " ".join(["To be, or not to be: that is the question."] * 200)
    (tmp_path / "a.txt").write_text(text)
    assert main(["prepare", str(tmp_path / "a.txt"), "--out", str(tmp_path / "d"), "--tokenizer", "llama3",
                 "--val-tokens", "300"]) == 0
    argv = ["train", "--init", "llama3:l1d32h2k1f64v128256t32", "--train-data", str(tmp_path / "d/data_train_*.bin"),
            "--val-data", str(tmp_path / "d/data_val_*.bin"), "-b", "2", "-t", "32", "--steps", "6", "--lr", "1e-2",
            "--warmup-steps", "0", "--val-every", "3", "--val-batches", "1", "--sample-tokens", "8", "--device", "cpu",
            "--no-progress", "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "--- sample at step 6 ---" in out
    events = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    losses = [e["train_loss"] for e in events if "train_loss" in e]
    assert losses[-1] < losses[0]
    assert main(["sample", "--checkpoint", str(tmp_path / "run"), "--prompt", "To be", "-n", "5",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("To be")
