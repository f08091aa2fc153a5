"""Damaged files are reported by their real cause, in one line: `load_weights` (convert, sample, eval, --init) names
what is wrong with a file it recognizes (truncated, bad header, damaged) instead of "not a ... file"; deeply nested
JSON anywhere in a header, checkpoint metadata, config.json or an index is a UserError, not a RecursionError."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from llmpy.errors import UserError
from llmpy.formats.checkpoint import load_checkpoint, load_weights, save_checkpoint
from llmpy.formats.hf import read_hf_model, write_hf_model
from llmpy.formats.llmc import write_llmc_model
from llmpy.formats.safetensors import load_safetensors, read_safetensors_header, save_safetensors
from llmpy.models.gpt2 import GPT2Config, spec

pytestmark = pytest.mark.filterwarnings("ignore:no tokenizer exported")
CFG = GPT2Config(max_seq_len=16, vocab_size=200, padded_vocab_size=256, num_layers=2, num_heads=2, channels=8)
DEEP = "[" * 100_000 + "]" * 100_000


def rand(seed=0):
    r = np.random.default_rng(seed)
    p = {s.name: r.standard_normal(s.shape).astype(np.float32) for s in spec(CFG)}
    p["wte"][CFG.vocab_size:] = 0
    return p


def one_line_error(fn, *args) -> str:
    with pytest.raises(UserError) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_deeply_nested_safetensors_header(tmp_path):
    p = tmp_path / "deep.safetensors"
    hb = DEEP.encode()
    p.write_bytes(struct.pack("<Q", len(hb)) + hb)
    for fn in (load_safetensors, read_safetensors_header, load_weights):
        assert "nested too deeply" in one_line_error(fn, p)


def test_deeply_nested_checkpoint_metadata(tmp_path):
    p = tmp_path / "ck.safetensors"
    meta = {"format": "llmpy-train-state", "version": "1", "config": json.dumps(CFG.to_dict()), "state": DEEP}
    save_safetensors(p, rand(), meta)
    assert "nested too deeply" in one_line_error(load_checkpoint, p)


def test_deeply_nested_hf_config_and_index(tmp_path):
    write_hf_model(tmp_path / "a", CFG, rand())
    (tmp_path / "a" / "config.json").write_text(DEEP)
    assert "config.json is not a JSON object" in one_line_error(read_hf_model, tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "model.safetensors.index.json").write_text(DEEP)
    assert "nested too deeply" in one_line_error(load_weights, tmp_path / "b")


def test_hf_per_layer_tensors_of_different_shapes(tmp_path):
    write_hf_model(tmp_path, CFG, rand())
    t, meta = load_safetensors(tmp_path / "model.safetensors")
    t["h.1.mlp.c_fc.weight"] = np.ones((8, 24), np.float32)  # layer 0's is (8, 32)
    save_safetensors(tmp_path / "model.safetensors", t, meta, checksums=False)
    msg = one_line_error(load_weights, tmp_path)
    assert "h.1.mlp.c_fc.weight has shape (8, 24), the config implies (8, 32)" in msg


def cut(path, n):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - n])


def test_load_weights_reports_the_real_cause(tmp_path):
    params = rand()
    ck, llmc, hf = tmp_path / "ck.safetensors", tmp_path / "m.bin", tmp_path / "hf"
    save_checkpoint(ck, CFG, params, adam_m=params, adam_v=params)
    write_llmc_model(llmc, CFG, params)
    write_hf_model(hf, CFG, params)

    cut(ck, 100)                                           # checkpoint: truncated
    assert "is truncated" in one_line_error(load_weights, ck)
    cut(llmc, 100)                                         # llm.c: truncated
    assert "m.bin is truncated" in one_line_error(load_weights, llmc)
    raw = llmc.read_bytes()                                # llm.c's magic, then a damaged header
    llmc.write_bytes(raw[:4] + struct.pack("<i", 7) + raw[8:])
    assert "unsupported llm.c model version 7" in one_line_error(load_weights, llmc)
    cut(hf / "model.safetensors", 4)                       # an HF folder: its weights are truncated
    assert "is truncated" in one_line_error(load_weights, hf)

    bad = tmp_path / "bad.safetensors"                     # bad header: size field past the end
    bad.write_bytes(struct.pack("<Q", 10_000) + b'{"a": 1}')
    assert "header size 10000 is absurd" in one_line_error(load_weights, bad)
    bad.write_bytes(struct.pack("<Q", 9) + b'{"a": 1,}')   # a header that is not JSON
    assert "header is not valid JSON" in one_line_error(load_weights, bad)
    renamed = tmp_path / "weights.dat"                     # a safetensors file under another name: still its reader
    renamed.write_bytes(bad.read_bytes())
    assert "header is not valid JSON" in one_line_error(load_weights, renamed)

    save_checkpoint(ck, CFG, params)                       # a checkpoint with a flipped byte: damaged
    raw = bytearray(ck.read_bytes())
    raw[-3] ^= 0x10
    ck.write_bytes(bytes(raw))
    assert "is damaged: tensor 'lnfb'" in one_line_error(load_weights, ck)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "a folder without model.safetensors or model.safetensors.index.json" in one_line_error(load_weights,
                                                                                                  empty)
