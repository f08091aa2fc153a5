"""MatMul-free weights in and out: the reference's HF layout (`model_type` "hgrn_bit", modeling_hgrn_bit.py's keys,
gate_proj's [gate; up] halves), read by the PyTorch re-implementation of the reference (tests/torch_mmfree.py) and
ours read back, bf16 files like the released checkpoints, the options we refuse, and convert's errors."""
import json

import numpy as np
import pytest

from llmpy.backends import get_backend
from llmpy.cli import main
from llmpy.errors import UserError
from llmpy.formats.bf16 import bf16_bits_to_fp32, fp32_to_bf16_bits
from llmpy.formats.checkpoint import load_weights, save_checkpoint
from llmpy.formats.hf import read_hf_model, write_hf_model
from llmpy.formats.safetensors import load_safetensors, save_safetensors
from llmpy.models.mmfree import MMFree
from mmfree_weights import trained_like

NAME = "mmfree:l2d64i96v300t16"


def weights(seed=0):
    return trained_like(NAME, seed)


def logits(cfg, p, x):
    m = MMFree(cfg, get_backend("cpu"), *x.shape, training=False)
    m.load_params(p)
    m.forward(x)
    return m.acts["logits"][:, :cfg.vocab_size].reshape(*x.shape, -1).copy()


def test_hf_round_trip(tmp_path):
    cfg, p = weights()
    files = write_hf_model(tmp_path / "hf", cfg, p)
    assert {f.name for f in files} == {"model.safetensors", "config.json"}
    cj = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cj["model_type"] == "hgrn_bit" and cj["intermediate_size"] == 96 and not cj["use_short_conv"]
    t = load_safetensors(tmp_path / "hf" / "model.safetensors")[0]
    assert t["model.layers.1.mlp.gate_proj.weight"].shape == (192, 64)
    np.testing.assert_array_equal(t["model.layers.1.mlp.gate_proj.weight"][:96], p["gatew"][1][96:])  # gate first
    assert t["lm_head.weight"].shape == (300, 64) and "lm_head.norm.weight" in t and "model.lower_bounds" in t
    cfg2, p2 = read_hf_model(tmp_path / "hf")
    assert cfg2 == cfg
    for k in p:
        np.testing.assert_array_equal(p2[k], p[k], err_msg=k)


def test_the_reference_reads_our_export(tmp_path):
    torch = pytest.importorskip("torch")
    from torch_mmfree import HGRNBitLM
    cfg, p = weights(1)
    write_hf_model(tmp_path / "hf", cfg, p)
    t = load_safetensors(tmp_path / "hf" / "model.safetensors")[0]
    ref = HGRNBitLM(cfg.vocab_size, cfg.channels, cfg.num_layers, cfg.ffn_hidden)
    ref.load_state_dict({k: torch.tensor(v) for k, v in t.items()}, strict=True)
    x = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 8)).astype(np.int32)
    want = ref(torch.tensor(x, dtype=torch.long)).detach().numpy()
    got = logits(cfg, p, x)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5


def test_a_bf16_checkpoint_like_the_released_ones_loads(tmp_path):
    cfg, p = weights(2)
    write_hf_model(tmp_path / "hf", cfg, p)
    t = load_safetensors(tmp_path / "hf" / "model.safetensors")[0]
    (tmp_path / "hf" / "model.safetensors").unlink()
    save_safetensors(tmp_path / "hf" / "model.safetensors", {}, {"format": "pt"}, checksums=False,
                     bf16={k: fp32_to_bf16_bits(v) for k, v in t.items()})
    cj = json.loads((tmp_path / "hf" / "config.json").read_text())
    del cj["intermediate_size"]  # the released configs leave it to hidden_ratio: 256 ceil(8d/3 / 256) = 256
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cj))
    with pytest.raises(UserError, match="has shape"):  # so their shapes disagree with this test's I = 96
        read_hf_model(tmp_path / "hf")
    cj["intermediate_size"] = 96
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cj))
    cfg2, p2 = read_hf_model(tmp_path / "hf")
    assert cfg2 == cfg
    for k in p:  # each value the bf16 rounding of the original, exactly
        np.testing.assert_array_equal(p2[k], bf16_bits_to_fp32(fp32_to_bf16_bits(p[k])), err_msg=k)


@pytest.mark.parametrize("key, value, why", [("use_short_conv", True, "use_short_conv=True is not supported"),
                                             ("expand_ratio", 2, "expand_ratio=2 is not supported"),
                                             ("use_lower_bound", False, "use_lower_bound=False is not supported"),
                                             ("hidden_act", "gelu", "hidden_act='gelu' is not supported"),
                                             ("hidden_size", 32, "the embedding is 300 x 64")])
def test_unsupported_hgrn_bit_options_are_one_line_errors(tmp_path, key, value, why):
    cfg, p = weights()
    write_hf_model(tmp_path / "hf", cfg, p)
    cj = json.loads((tmp_path / "hf" / "config.json").read_text())
    cj[key] = value
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cj))
    with pytest.raises(UserError, match=why) as e:
        read_hf_model(tmp_path / "hf")
    assert "\n" not in str(e.value)


def test_cli_converts_and_refuses_llmc(tmp_path, capsys):
    cfg, p = weights(4)
    save_checkpoint(tmp_path / "c.safetensors", cfg, p)
    assert main(["convert", str(tmp_path / "c.safetensors"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back.safetensors")]) == 0
    cfg2, p2 = load_weights(tmp_path / "back.safetensors")
    assert cfg2 == cfg
    for k in p:
        np.testing.assert_array_equal(p2[k], p[k], err_msg=k)
    assert main(["convert", str(tmp_path / "c.safetensors"), str(tmp_path / "m.bin")]) == 2
    assert "llm.c" in capsys.readouterr().err
    assert not (tmp_path / "m.bin").exists()
