"""The whole model on the GPU against the CPU reference from the same llm.c checkpoint; determinism, graphs,
resume, recompute, out-of-memory. Marked gpu: skipped where there is none (CI)."""
import json

import numpy as np
import pytest

from llmpy.backends import get_backend
from llmpy.models.gpt2 import GPT2Config, spec
from llmpy.data.shards import write_shard
from llmpy.errors import UserError
from llmpy.formats.llmc import read_llmc_model, write_llmc_model
from llmpy.models.gpt2 import GPT2
from llmpy.train.optim import AdamW
from llmpy.train.step import TrainStep
from llmpy.train import TrainConfig, run

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


def batches(n, seed=0):
    r = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w = r.integers(0, CFG.vocab_size, (B, T + 1)).astype(np.int32)
        out.append((np.ascontiguousarray(w[:, :-1]), np.ascontiguousarray(w[:, 1:])))
    return out


def relerr(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def model_on(device, dtype, ckpt, recompute=0, recompute_keep=0):
    cfg, params = read_llmc_model(ckpt)
    m = GPT2(cfg, get_backend(device, dtype), B, T, recompute=recompute, recompute_keep=recompute_keep)
    m.load_params(params)
    return m


def grads_host(m):
    return {n: np.asarray(m.be.to_numpy(m.grads[n]), np.float64) for n in (s.name for s in spec(m.cfg))}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_loss_and_every_gradient_vs_cpu(ckpt, dtype):
    (x, y), = batches(1)
    cpu, gpu = model_on("cpu", "fp32", ckpt), model_on("cuda", dtype, ckpt)
    lc = cpu.forward(x, y, grad_scale=1 / (B * T))
    cpu.backward()
    lg = gpu.forward(x, y, grad_scale=1 / (B * T))
    gpu.backward()
    print(f"\n{dtype}: loss cpu {lc:.6f} gpu {lg:.6f}")
    assert abs(lg - lc) <= (1e-5 if dtype == "fp32" else 1e-2) * lc
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
    data = batches(2, seed=1) * 5  # two batches in turn: the loss must fall as they are memorised
    losses = {}
    for dev, dt in (("cpu", "fp32"), ("cuda", dtype)):
        m = model_on(dev, dt, ckpt)
        opt = AdamW(m, weight_decay=0.1)
        st = TrainStep(m, opt, 1, grad_clip=1.0)
        losses[dev] = [st.run([b], 1e-3)[0] for b in data]
    diff = np.abs(np.array(losses["cuda"]) - np.array(losses["cpu"]))
    print(f"\n{dtype}: cpu {np.round(losses['cpu'], 5)}\n      gpu {np.round(losses['cuda'], 5)}\n"
          f"      max |diff| {diff.max():.2e}")
    assert losses["cpu"][-1] < losses["cpu"][0]
    assert diff.max() <= LOSS_TOL[dtype]


@pytest.mark.parametrize("recompute,keep", [(1, 0), (2, 0), (1, 1), (2, 1)])
def test_recompute_matches(ckpt, recompute, keep):
    """Recomputing (all layers, or all but the first `keep`) changes memory, not the numbers."""
    (x, y), = batches(1, seed=2)
    out = []
    for rc, k in ((0, 0), (recompute, keep)):
        m = model_on("cuda", "bf16", ckpt, recompute=rc, recompute_keep=k)
        loss = m.forward(x, y, grad_scale=1 / (B * T))
        m.backward()
        out.append((loss, grads_host(m), m.memory_plan()["activations"]))
    (l0, g0, a0), (l1, g1, a1) = out
    assert l0 == l1  # the forward is the same computation
    assert a1 < a0
    for n in g0:
        assert relerr(g1[n], g0[n]) < 1e-2, n


def _shards(tmp_path):
    r = np.random.default_rng(0)
    phrases = [r.integers(0, 50257, 9) for _ in range(30)]
    stream = np.concatenate([phrases[i] for i in r.integers(0, 30, 4000)])
    write_shard(tmp_path / "tr_000.bin", stream[:30000])
    write_shard(tmp_path / "va_000.bin", stream[30000:])
    return str(tmp_path / "tr_*.bin"), str(tmp_path / "va_*.bin")


def _run(tmp_path, name, **kw):
    tr, va = _shards(tmp_path)
    base = dict(init="l2h4c128t64", train_data=tr,
                val_data=va, batch_size=8, seq_len=64, steps=8, val_every=4, val_batches=2, sample_tokens=0,
                progress=False, device="cuda", dtype="bf16", grad_accum=2, out=str(tmp_path / name),
                checkpoint_every=0)
    base.update(kw)
    res = run(TrainConfig(**base))
    ev = [json.loads(line) for line in open(res.out / "metrics.jsonl")]
    return [(e["step"], e.get("train_loss"), e.get("val_loss"), e.get("grad_norm")) for e in ev], res


@pytest.mark.parametrize("lean", [False, True], ids=["fp32-master", "bf16-moments"])
def test_determinism_graph_and_resume(tmp_path, lean):
    """lean: no fp32 master weights, bf16 AdamW moments (stochastic rounding); checkpoints hold them exactly."""
    kw = dict(master_weights=False, moments="bf16") if lean else {}
    a, ra = _run(tmp_path, "a", **kw)
    b, _ = _run(tmp_path, "b", **kw)
    c, _ = _run(tmp_path, "c", graph=False, **kw)
    assert a == b, "two runs with the same seed must be bitwise identical"
    assert a == c, "graph replay and eager execution must be bitwise identical"
    if lean:
        import ml_dtypes
        from llmpy.formats.checkpoint import load_checkpoint
        m = load_checkpoint(ra.out / "checkpoint.safetensors").adam_m
        assert any(np.any(x) for x in m.values())
        assert all(np.array_equal(x, x.astype(ml_dtypes.bfloat16).astype(np.float32)) for x in m.values()), \
            "bf16 moments are saved exactly (as fp32)"
        assert a != _run(tmp_path, "e")[0], "the lean optimizer must change the run"
    _run(tmp_path, "d", stop_at=3, **kw)
    res = run(TrainConfig(resume=str(tmp_path / "d"), progress=False, explicit=("resume",)))
    d = [json.loads(line) for line in open(res.out / "metrics.jsonl")]
    d = [(e["step"], e.get("train_loss"), e.get("val_loss"), e.get("grad_norm")) for e in d]
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

    def metrics(out):
        ev = [json.loads(line) for line in open(out / "metrics.jsonl")]
        return [(e["step"], e.get("train_loss"), e.get("val_loss"), e.get("grad_norm")) for e in ev]
    _run(tmp_path, "t", tune_gemm=True, stop_at=3)
    res = run(TrainConfig(resume=str(tmp_path / "t"), progress=False, explicit=("resume",)))
    tuned = metrics(res.out)
    pins = load_checkpoint(res.out / "checkpoint.safetensors").state["gemm_algos"]
    assert pins["algos"], "a tuned run must record its choices"
    replay, rr = _run(tmp_path, "r", gemm_algos=str(res.out / "checkpoint.safetensors"))
    assert replay == tuned, "a run given the tuned run's choices must equal it bitwise"
    assert load_checkpoint(rr.out / "checkpoint.safetensors").state["gemm_algos"] == pins
    plain, _ = _run(tmp_path, "p")
    for (_, lt, vt, _), (_, lp, vp, _) in zip(tuned, plain):
        assert abs((lt or vt) - (lp or vp)) < LOSS_TOL["bf16"]


def test_out_of_memory_is_a_clear_error():
    from llmpy.config import config_from_name
    with pytest.raises(UserError, match="batch-size|recompute"):
        GPT2(config_from_name("d48"), get_backend("cuda", "bf16"), 1024, 1024)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_decoding_matches_the_cpu(ckpt, dtype):
    """`llmpy sample --device cuda`: the model's own forward one position at a time over a GPU KV cache."""
    from llmpy.models.decode import decoder, generate
    cfg, params = read_llmc_model(ckpt)
    toks = np.random.default_rng(4).integers(0, cfg.vocab_size, (1, 12)).astype(np.int32)
    out = {}
    for dev, dt in (("cpu", "fp32"), ("cuda", dtype)):
        m = decoder(cfg, params, get_backend(dev, dt))
        st = m.new_decode_state(12)
        steps = [m.decode_step(toks[:, :5], st)] + [m.decode_step(toks[:, i:i + 1], st) for i in range(5, 12)]
        out[dev] = np.concatenate(steps)
        if dev == "cuda":
            new = generate(m, [1, 2, 3], 6, rng=np.random.default_rng(0), temperature=0)
            assert len(new) == 6 and all(0 <= t < cfg.vocab_size for t in new)
    err = relerr(out["cuda"], out["cpu"])
    print(f"\n{dtype}: decode logits rel err {err:.2e}")
    assert err < (1e-4 if dtype == "fp32" else 3e-2)
