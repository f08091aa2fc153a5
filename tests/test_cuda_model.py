"""The whole model on the GPU against the CPU reference from the same llm.c checkpoint; determinism, graphs,
resume, recompute, out-of-memory; every family's generation past the context. Marked gpu: skipped where there is none (CI)."""
from functools import partial

import numpy as np
import pytest

from cuda_common import (decode_on_both, forward_backward, loaded_model, one_step_vs_cpu, random_batches, relerr,
                         reproducible_runs, resume_run, resumed_run, run_shards, ten_steps_vs_cpu, train_run)
from decoding import TINY, stepwise_greedy, tiny

from llmpy.backends import get_backend
from llmpy.models.gpt2 import GPT2Config, spec
from llmpy.errors import UserError
from llmpy.formats.llmc import read_llmc_model, write_llmc_model
from llmpy.models.gpt2 import GPT2

pytestmark = pytest.mark.gpu
CFG = GPT2Config(max_seq_len=128, vocab_size=50257, padded_vocab_size=50304, num_layers=4, num_heads=4, channels=256)
B, T = 4, 128
GRAD_TOL = {"fp32": 1e-4, "bf16": 3e-2}   # relative (norm-wise) per parameter gradient
LOSS_TOL = {"fp32": 1e-4, "bf16": 2e-2}   # absolute, per step of a 10-step run


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """An llm.c checkpoint both backends start from (non-trivial biases and gains, so every term matters)."""
    m = GPT2(CFG, get_backend("cpu"), 1, 8, training=False)
    m.init_weights(3)
    p = m.params_numpy()
    r = np.random.default_rng(0)
    for n in ("qkvb", "attprojb", "fcb", "fcprojb", "ln1b", "ln2b", "lnfb"):
        p[n] = (r.standard_normal(p[n].shape) * 0.02).astype(np.float32)
    path = tmp_path_factory.mktemp("ck") / "model.bin"
    write_llmc_model(path, CFG, p)
    return path


batches = partial(random_batches, CFG.vocab_size, B, T)  # batches(n, seed=0)


def model_on(device, dtype, ckpt, recompute=0, recompute_keep=0):
    """A GPT-2 for B x T batches on device in dtype, from the llm.c checkpoint ckpt."""
    cfg, params = read_llmc_model(ckpt)
    return loaded_model(GPT2, cfg, B, T, device, dtype, params, recompute=recompute, recompute_keep=recompute_keep)


def grads_host(m):
    return {n: np.asarray(m.be.to_numpy(m.grads[n]), np.float64) for n in (s.name for s in spec(m.cfg))}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_loss_and_every_gradient_vs_cpu(ckpt, dtype):
    cpu, gpu = one_step_vs_cpu(partial(model_on, ckpt=ckpt), dtype, batches(1)[0])
    gc, gg = grads_host(cpu), grads_host(gpu)
    worst = 0.0
    for name in gc:
        e = relerr(gg[name][:CFG.vocab_size] if name == "wte" else gg[name],
                   gc[name][:CFG.vocab_size] if name == "wte" else gc[name])
        worst = max(worst, e)
        print(f"  grad {name:9s} rel err {e:.2e}")
        assert e < GRAD_TOL[dtype], name
    assert np.all(gg["wte"][CFG.vocab_size:] == 0), "padded vocabulary rows must get no gradient"
    print(f"  worst gradient rel err {worst:.2e}")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_ten_steps_vs_cpu(ckpt, dtype):
    # two batches in turn: the loss must fall as they are memorised
    ten_steps_vs_cpu(partial(model_on, ckpt=ckpt), dtype, batches(2, seed=1) * 5, LOSS_TOL[dtype])


@pytest.mark.parametrize("recompute,keep", [(1, 0), (2, 0), (1, 1), (2, 1)])
def test_recompute_matches(ckpt, recompute, keep):
    """Recomputing (all layers, or all but the first `keep`) changes memory, not the numbers."""
    (x, y), = batches(1, seed=2)
    out = []
    for rc, k in ((0, 0), (recompute, keep)):
        m = model_on("cuda", "bf16", ckpt, recompute=rc, recompute_keep=k)
        loss = forward_backward(m, x, y)
        out.append((loss, grads_host(m), m.memory_plan()["activations"]))
    (l0, g0, a0), (l1, g1, a1) = out
    assert l0 == l1  # the forward is the same computation
    assert a1 < a0
    for n in g0:
        assert relerr(g1[n], g0[n]) < 1e-2, n


def _run(tmp_path, name, **kw):
    """A bf16 CUDA run of the small GPT-2 into tmp_path/name (its shards written afresh): (metrics, result)."""
    return train_run("l2h4c128t64", run_shards(tmp_path), tmp_path / name, **kw)


@pytest.mark.parametrize("lean", [False, True], ids=["fp32-master", "bf16-moments"])
def test_determinism_graph_and_resume(tmp_path, lean):
    """lean: no fp32 master weights, bf16 AdamW moments (stochastic rounding); checkpoints hold them exactly."""
    kw = dict(master_weights=False, moments="bf16") if lean else {}
    shards = run_shards(tmp_path)
    a, ra = reproducible_runs("l2h4c128t64", shards, tmp_path, **kw)
    if lean:
        import ml_dtypes
        from llmpy.formats.checkpoint import load_checkpoint
        m = load_checkpoint(ra.out / "checkpoint.safetensors").adam_m
        assert any(np.any(x) for x in m.values())
        assert all(np.array_equal(x, x.astype(ml_dtypes.bfloat16).astype(np.float32)) for x in m.values()), \
            "bf16 moments are saved exactly (as fp32)"
        assert a != _run(tmp_path, "e")[0], "the lean optimizer must change the run"
    d, res = resumed_run("l2h4c128t64", shards, tmp_path, **kw)
    assert d == a, "a resumed run must continue bitwise identically"
    from llmpy.formats.checkpoint import load_checkpoint
    pa = load_checkpoint(ra.out / "checkpoint.safetensors")
    pd = load_checkpoint(res.out / "checkpoint.safetensors")
    assert all(np.array_equal(pa.params[k], pd.params[k]) for k in pa.params)
    assert all(np.array_equal(pa.compute_bf16[k], pd.compute_bf16[k]) for k in pa.params)


def test_tuned_products_replay_bitwise(tmp_path):
    """--tune-gemm: the algorithm choices go into the checkpoint; a resume, and a fresh run given them
    (--gemm-algos), replay the same kernels, so both equal the tuned run bitwise; the tuned run stays within bf16
    noise of the default one."""
    from llmpy.formats.checkpoint import load_checkpoint

    _run(tmp_path, "t", tune_gemm=True, stop_at=3)
    tuned, res = resume_run(tmp_path / "t")
    pins = load_checkpoint(res.out / "checkpoint.safetensors").state["gemm_algos"]
    assert pins["algos"], "a tuned run must record its choices"
    replay, rr = _run(tmp_path, "r", gemm_algos=str(res.out / "checkpoint.safetensors"))
    assert replay == tuned, "a run given the tuned run's choices must equal it bitwise"
    assert load_checkpoint(rr.out / "checkpoint.safetensors").state["gemm_algos"] == pins
    plain, _ = _run(tmp_path, "p")
    for (_, lt, vt, _), (_, lp, vp, _) in zip(tuned, plain):
        assert abs((lt or vt) - (lp or vp)) < LOSS_TOL["bf16"]


@pytest.mark.parametrize("name", list(TINY))
def test_generation_past_the_context_on_the_gpu(name, tmp_path):
    """Every family's prefills on the GPU (attention_forward and kv_cache_write, the recurrent and packed paths, a
    bf16 embedding under fp32) give, in fp32, the greedy tokens of decoding steps on the same GPU: past the context
    and from a prompt longer than it; bf16 runs the same way."""
    from llmpy.models.decode import decoder, generate
    cfg, p = tiny(name, tmp_path)
    maxT = cfg.max_seq_len
    long = list(np.random.default_rng(1).integers(0, cfg.vocab_size, 2 * maxT + 3))
    for dtype in ("fp32", "bf16"):
        dec = decoder(cfg, p, get_backend("cuda", dtype))
        for prompt in ([5, 6, 7], long):
            got = generate(dec, prompt, 3 * maxT, rng=np.random.default_rng(0), temperature=0)
            assert len(got) == 3 * maxT and all(0 <= t < cfg.vocab_size for t in got)
            if dtype == "fp32":
                assert got == stepwise_greedy(dec, prompt, 3 * maxT), prompt


def test_out_of_memory_is_a_clear_error():
    from llmpy.config import config_from_name
    with pytest.raises(UserError, match="batch-size|recompute"):
        GPT2(config_from_name("d48"), get_backend("cuda", "bf16"), 1024, 1024)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_decoding_matches_the_cpu(ckpt, dtype):
    """`llmpy sample --device cuda`: the model's own forward one position at a time over a GPU KV cache."""
    from llmpy.models.decode import generate
    cfg, params = read_llmc_model(ckpt)
    toks = np.random.default_rng(4).integers(0, cfg.vocab_size, (1, 12)).astype(np.int32)
    cpu, gpu, m = decode_on_both(cfg, params, dtype, toks)
    new = generate(m, [1, 2, 3], 6, rng=np.random.default_rng(0), temperature=0)
    assert len(new) == 6 and all(0 <= t < cfg.vocab_size for t in new)
    err = relerr(gpu, cpu)
    print(f"\n{dtype}: decode logits rel err {err:.2e}")
    assert err < (1e-4 if dtype == "fp32" else 3e-2)
