"""Llama 3 weights in and out: Hugging Face LlamaForCausalLM folders (ours read by transformers and theirs by us, the
q/k row permutation, both config.json spellings of RoPE, sharded folders), llm.c's Llama 3 file (float fields kept
as floats, zero biases, tied heads), and the CLI's convert between them."""
import json
import struct

import numpy as np
import pytest

from llmpy.backends import get_backend
from llmpy.cli import main
from llmpy.config import config_from_name
from llmpy.errors import UserError
from llmpy.formats.checkpoint import load_weights, save_checkpoint
from llmpy.formats.hf import read_hf_model, write_hf_model
from llmpy.formats.llmc import read_llmc_model, write_llmc_model
from llmpy.models.llama3 import Llama

UNTIED = "llama3:l2d64h4k2f192v300t16r32"
TIED = "llama3:l2d64h4k4f160v256t16-tied"


def weights(name, seed=0):
    cfg = config_from_name(name)
    m = Llama(cfg, get_backend("cpu"), 1, 4, training=False)
    m.init_weights(seed)
    p = m.params_numpy()
    r = np.random.default_rng(seed)
    for n in ("ln1w", "ln2w", "lnfw"):
        p[n] = (p[n] + 0.1 * r.standard_normal(p[n].shape)).astype(np.float32)
    return cfg, p


def logits(cfg, p, x):
    m = Llama(cfg, get_backend("cpu"), *x.shape, training=False)
    m.load_params(p)
    m.forward(x)
    return m.acts["logits"][:, :cfg.vocab_size].reshape(*x.shape, -1).copy()


@pytest.mark.parametrize("name", [UNTIED, TIED])
def test_hf_round_trip(tmp_path, name):
    cfg, p = weights(name)
    write_hf_model(tmp_path / "hf", cfg, p)
    cfg2, p2 = read_hf_model(tmp_path / "hf")
    assert cfg2 == cfg
    for k in p:
        np.testing.assert_array_equal(p2[k], p[k], err_msg=k)
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert conf["model_type"] == "llama" and conf["num_key_value_heads"] == cfg.num_kv_heads
    assert conf["tie_word_embeddings"] == cfg.tied


@pytest.mark.parametrize("name", [UNTIED, TIED])
def test_transformers_reads_our_export_and_we_read_theirs(tmp_path, name):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg, p = weights(name, seed=1)
    x = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 12)).astype(np.int32)
    ours = logits(cfg, p, x)
    write_hf_model(tmp_path / "ours", cfg, p)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours", torch_dtype=torch.float32,
                                                       attn_implementation="eager")
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(x, dtype=torch.long)).logits.numpy()
    assert np.linalg.norm(theirs - ours) / np.linalg.norm(ours) < 1e-5
    # transformers writes config.json its own way (rope_parameters) and may shard: we read that back
    hf.save_pretrained(tmp_path / "theirs", max_shard_size="100KB")
    assert (tmp_path / "theirs" / "model.safetensors.index.json").exists()
    cfg3, p3 = load_weights(tmp_path / "theirs")
    assert cfg3 == cfg
    np.testing.assert_allclose(logits(cfg3, p3, x), ours, rtol=0, atol=1e-5)


def test_hf_config_errors(tmp_path):
    cfg, p = weights(UNTIED)
    write_hf_model(tmp_path / "hf", cfg, p)
    cj = tmp_path / "hf" / "config.json"
    good = json.loads(cj.read_text())
    for change, why in [({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
                        ({"hidden_act": "gelu"}, "hidden_act"), ({"head_dim": 32}, "head_dim"),
                        ({"vocab_size": 301}, "embedding"), ({"rope_theta": -1}, "rope_theta")]:
        cj.write_text(json.dumps(good | change))
        with pytest.raises(UserError, match=why):
            read_hf_model(tmp_path / "hf")
    cj.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(UserError, match="config.json"):
        read_hf_model(tmp_path / "hf")
    cj.unlink()
    with pytest.raises(UserError, match="config.json"):
        read_hf_model(tmp_path / "hf")


@pytest.mark.parametrize("name", [UNTIED, TIED])
def test_llmc_round_trip_and_header(tmp_path, name):
    cfg, p = weights(name, seed=3)
    f = tmp_path / "m.bin"
    write_llmc_model(f, cfg, p)
    raw = f.read_bytes()
    h = struct.unpack("<12i", raw[:48])
    assert h == (20240803, 3, cfg.max_seq_len, cfg.vocab_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads,
                 cfg.channels, h[8], int(cfg.rope_factor != 1), 3, 2 if cfg.rope_factor == 32 else 0)
    mult, eps, theta = struct.unpack("<3f", raw[1024:1036])
    assert (eps, theta) == (np.float32(1e-5), 500000.0) and mult > 0
    cfg2, p2 = read_llmc_model(f)
    assert cfg2 == cfg
    for k in p:
        np.testing.assert_array_equal(p2[k], p[k], err_msg=k)
    write_llmc_model(tmp_path / "m16.bin", cfg, p, dtype="bf16")
    cfg3, p3 = read_llmc_model(tmp_path / "m16.bin")
    assert cfg3 == cfg and np.abs(p3["qkvw"] - p["qkvw"]).max() <= 2 ** -8 * np.abs(p["qkvw"]).max()


def test_llmc_float_fields_are_floats_and_biases_zero(tmp_path):
    cfg = config_from_name("llama3:8b")  # ffn_dim_multiplier 1.3 must survive (master's writer made it 1)
    from llmpy.formats.llmc.llama3 import ffn_hidden, header
    words, extra = header(cfg, 3)
    mult = struct.unpack("<f", extra[:4])[0]
    assert words[8] == 1024 and abs(mult - 1.3) < 1e-6 and ffn_hidden(4096, mult, 1024) == 14336
    small, p = weights(UNTIED)
    f = tmp_path / "m.bin"
    write_llmc_model(f, small, p)
    raw = bytearray(f.read_bytes())
    V, C, L = small.vocab_size, small.channels, small.num_layers
    ln1b_at = 2048 + 4 * (2 * V * C + L * C)  # after the two headers, wte, lm_head and ln1w
    raw[ln1b_at:ln1b_at + 4] = struct.pack("<f", 0.5)
    f.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="bias ln1b is not zero"):
        read_llmc_model(f)


def test_cli_converts_between_the_formats(tmp_path, capsys):
    cfg, p = weights(UNTIED, seed=4)
    save_checkpoint(tmp_path / "c.safetensors", cfg, p)
    assert main(["convert", str(tmp_path / "c.safetensors"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "m.bin")]) == 0
    assert main(["convert", str(tmp_path / "m.bin"), str(tmp_path / "back.safetensors")]) == 0
    cfg2, p2 = load_weights(tmp_path / "back.safetensors")
    assert cfg2 == cfg
    for k in p:
        np.testing.assert_array_equal(p2[k], p[k], err_msg=k)
