"""Sharded Hugging Face folders (`model.safetensors.index.json` + `model-0000N-of-0000M.safetensors`): read like one
file, the index validated (every shard present, every tensor listed once and where it is)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from llmpy.errors import UserError
from llmpy.formats.checkpoint import load_weights
from llmpy.formats.hf import is_hf_model, read_hf_model, write_hf_model
from llmpy.formats.safetensors import load_safetensors, save_safetensors
from llmpy.models.gpt2 import GPT2Config, spec

pytestmark = pytest.mark.filterwarnings("ignore:no tokenizer exported")
CFG = GPT2Config(max_seq_len=16, vocab_size=200, padded_vocab_size=256, num_layers=3, num_heads=2, channels=8)


def rand(seed=0):
    r = np.random.default_rng(seed)
    p = {s.name: r.standard_normal(s.shape).astype(np.float32) for s in spec(CFG)}
    p["wte"][CFG.vocab_size:] = 0
    return p


def shard(folder, parts=3, index_edit=None):
    """Rewrites the one-file export in `folder` as `parts` shards (as transformers' save_pretrained does)."""
    t, meta = load_safetensors(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(t)
    weight_map = {}
    for i in range(parts):
        fname = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
        chunk = names[i::parts]
        save_safetensors(folder / fname, {n: t[n] for n in chunk}, meta, checksums=False)
        weight_map |= {n: fname for n in chunk}
    index = {"metadata": {"total_size": sum(a.nbytes for a in t.values())}, "weight_map": weight_map}
    if index_edit:
        index_edit(index)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return t


def test_sharded_folder_reads_like_one_file(tmp_path):
    params = rand()
    write_hf_model(tmp_path, CFG, params)
    shard(tmp_path)
    assert is_hf_model(tmp_path) and is_hf_model(tmp_path / "model.safetensors.index.json")
    for src in (tmp_path, tmp_path / "model.safetensors.index.json"):
        cfg, got = load_weights(src)
        assert cfg == CFG
        for n, a in params.items():
            np.testing.assert_array_equal(got[n], a, err_msg=n)


def move(name, to=None):
    def edit(index):
        wm = index["weight_map"]
        wm[name] = to or next(f for f in sorted(set(wm.values())) if f != wm[name])  # default: another shard
    return edit


@pytest.mark.parametrize("case, match", [
    ("missing shard", "lists the shard model-00002-of-00003.safetensors, which is missing"),
    ("listed in the wrong shard",
     r"holds h\.0\.ln_1\.bias, which the index does not list there|puts h\.0\.ln_1\.bias in \S+, which does not hold"),
    ("listed, held nowhere", "the index puts ghost in model-00001-of-00003.safetensors, which does not hold it"),
    ("not listed", "holds wte.weight, which the index does not list there"),
    ("in two shards", "tensor h.0.ln_1.bias is in both"),
    ("outside the folder", "names a shard that is not a file beside it: '../x.safetensors'"),
    ("duplicate key", "duplicate key"),
    ("no weight_map", "no weight_map"),
])
def test_bad_index(tmp_path, case, match):
    write_hf_model(tmp_path, CFG, rand())
    edit = {"listed in the wrong shard": move("h.0.ln_1.bias"),
            "listed, held nowhere": move("ghost", "model-00001-of-00003.safetensors"),
            "not listed": lambda ix: ix["weight_map"].pop("wte.weight"),
            "outside the folder": move("wpe.weight", "../x.safetensors"),
            "no weight_map": lambda ix: ix.pop("weight_map")}.get(case)
    t = shard(tmp_path, index_edit=edit)
    index = tmp_path / "model.safetensors.index.json"
    if case == "missing shard":
        (tmp_path / "model-00002-of-00003.safetensors").unlink()
    elif case == "in two shards":
        other = next(f for f in sorted(tmp_path.glob("model-*")) if
                     json.loads(index.read_text())["weight_map"]["h.0.ln_1.bias"] != f.name)
        extra, meta = load_safetensors(other)
        save_safetensors(other, extra | {"h.0.ln_1.bias": t["h.0.ln_1.bias"]}, meta)
    elif case == "duplicate key":
        index.write_text('{"weight_map": {"wte.weight": "a.safetensors", "wte.weight": "b.safetensors"}}')
    with pytest.raises(UserError, match=match):
        read_hf_model(tmp_path)
    assert not is_hf_model(tmp_path)
    with pytest.raises(UserError, match=match):
        load_weights(tmp_path)
