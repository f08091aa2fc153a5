"""benchmarks/mmfree_decode.py on the CPU with a tiny config: every side, batch and the prefill measured, the bytes
a step reads as the models hold them, and the Llama it compares with of the MatMul-free shape's size."""
import json

import pytest

from benchmarks import mmfree_decode as md
from llmpy.config import config_from_name


@pytest.mark.parametrize("name", ["mmfree:370m", "mmfree:1.3b", "mmfree:2.7b", "mmfree:l2d64v256t32"])
def test_the_llama_has_the_shapes_size(name):
    cfg = config_from_name(name)
    llama = md.llama_like(cfg)
    assert (llama.num_layers, llama.channels, llama.vocab_size, llama.max_seq_len) == (
        cfg.num_layers, cfg.channels, cfg.vocab_size, cfg.max_seq_len)
    assert llama.head_size == 64 and llama.num_heads % llama.num_kv_heads == 0
    assert abs(llama.num_params() / cfg.num_params() - 1) < 0.01
    assert config_from_name(md.llama_name(llama)) == llama


def test_random_weights_are_of_the_shapes_and_load(tmp_path):
    """The fast random weights: each tensor's shape, zero vocabulary padding, valid ternary codes a packed model
    loads."""
    import numpy as np

    from llmpy.backends import get_backend
    from llmpy.formats.ternary import INVALID, PackedTernary
    from llmpy.models.decode import decoder
    cfg = config_from_name("mmfree:l2d64i128v300t16")
    p = md.random_weights(cfg, packed=True)
    assert isinstance(p["iw"], PackedTernary) and p["iw"].shape == (2, 64, 64)
    assert not np.bincount(p["iw"].codes.reshape(-1), minlength=256)[INVALID["base3"]].any()
    assert p["wte"].shape == (384, 64) and not p["wte"][300:].any() and p["wte"][:300].std() > 0.01
    m = decoder(cfg, p, get_backend("cpu"))
    assert np.isfinite(m.decode_step(np.array([[1, 2, 3]]), m.new_decode_state(8))).all()


def test_the_benchmark_runs_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "r.json"
    rep = md.main(["--model", "mmfree:l2d64v256t32", "--device", "cpu", "--seconds", "0", "--steps", "3",
                   "--batches", "1,3", "--prompt-tokens", "64", "--peak-gbs", "100", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(rep))
    (shape,) = rep["shapes"]
    assert shape["llama"] == "llama3:l2d64h1k1f256v256t32"  # MHA at one head: F = I
    assert [r["side"] for r in shape["results"]] == ["packed", "latent", "llama"]
    for r in shape["results"]:
        assert r["prefill"]["tokens"] == 32 and r["prefill"]["tok_s"] > 0  # the prompt cut to the context
        assert [d["batch"] for d in r["decode"]] == [1, 3]
        one, three = r["decode"]
        row = 64 * (2 if r["side"] == "packed" else 4)  # an embedding row: bf16 beside packed codes, else fp32
        assert three["bytes"] - one["bytes"] == 2 * one["state_bytes"] + 2 * row  # 2 more states and rows read
        assert three["state_bytes"] == 3 * one["state_bytes"]
        assert one["mbu"] == pytest.approx(one["bytes"] / (one["ms_step"] / 1e3) / 100e9)
    packed, latent, llama = shape["results"]
    # the packed model reads its codes (< 1/4 of the bf16 weights' bytes); a Llama's KV cache grows with the
    # position decoded (--context 512, cut to 31), a recurrent state does not
    assert packed["decode"][0]["bytes"] < latent["decode"][0]["bytes"] / 4
    assert llama["decode"][0]["state_bytes"] == 2 * 2 * 1 * 1 * 32 * 64 * 4  # k and v, L 2, KV 1, 32 positions fp32
    assert latent["decode"][0]["state_bytes"] == 2 * 64 * 4
    text = capsys.readouterr().out
    assert "| packed | 3 |" in text and "| llama | 32 |" in text and "packed tensors" in text
    assert shape["report"] in text


def test_bad_settings_stop_before_anything_runs(capsys):
    for argv, msg in ((["--sides", "packed,turbo"], "--sides"), (["--batches", "1,x"], "--batches"),
                      (["--batches", "0"], "--batches"), (["--model", "gpt2:d12"], "MatMul-free")):
        with pytest.raises(SystemExit):
            md.main(argv + ["--device", "cpu"])
        assert msg in capsys.readouterr().err


def test_what_bounds_a_step():
    """The larger floor when the step is within twice it, else neither; nothing when no peak is known."""
    assert md.bound(1.5e-3, 1e-3, 0.2e-3) == "bandwidth"
    assert md.bound(1.5e-3, 0.1e-3, 1e-3) == "compute"
    assert md.bound(5e-3, 1e-3, 0.2e-3) == "neither: 5.0x the bandwidth floor"
    assert md.bound(5e-3, 1e-3, None) == "neither: 5.0x the bandwidth floor"
    assert md.bound(5e-3, None, None) == "-"


def test_the_one_kernel_switch_is_set_and_reported(tmp_path, monkeypatch, capsys):
    """--one-kernel sets MMFree.persistent_decode for the run (the CPU has no such kernel: it decodes per op) and
    the report and each shape's header say which; default leaves the library's setting."""
    from llmpy.models.mmfree import MMFree
    monkeypatch.setattr(MMFree, "persistent_decode", False)
    args = ["--model", "mmfree:l2d64v256t32", "--device", "cpu", "--seconds", "0", "--steps", "3", "--batches", "1",
            "--prompt-tokens", "8", "--sides", "packed"]
    rep = md.main(args)
    assert rep["persistent_decode"] is False and "packed batch 1: per-op kernels" in rep["shapes"][0]["report"]
    rep = md.main(args + ["--one-kernel", "on"])
    assert rep["persistent_decode"] is True and MMFree.persistent_decode is True
    assert "packed batch 1: one kernel" in rep["shapes"][0]["report"]
    assert md.main(args + ["--one-kernel", "off"])["persistent_decode"] is False


def test_the_decode_rows_limit_is_set_and_reported(monkeypatch):
    """--decode-rows sets the GPU's routing limit for the run (the JSON reports it for cuda runs, None on the CPU,
    whose packed path has no decode kernel); out of 1..8 it is refused."""
    from llmpy.backends.cuda import mmfree as cuda_mmfree
    monkeypatch.setattr(cuda_mmfree, "_DECODE_ROWS", 8)
    args = ["--model", "mmfree:l2d64v256t32", "--device", "cpu", "--seconds", "0", "--steps", "3", "--batches", "1",
            "--prompt-tokens", "8", "--sides", "packed"]
    rep = md.main(args + ["--decode-rows", "2"])
    assert cuda_mmfree._DECODE_ROWS == 2 and rep["decode_rows"] is None and "; CPU)" in rep["shapes"][0]["report"]
    for bad in ("0", "9"):
        with pytest.raises(SystemExit):
            md.main(args + ["--decode-rows", bad])

