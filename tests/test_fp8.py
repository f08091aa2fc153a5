"""--dtype fp8 on the CPU: the recipe of layers/fp8.py (quantizing, scales, delayed scaling), the FP8 product's
forward and backward, and whole GPT-2 / Llama runs that emulate it (determinism, resume, evaluation that leaves the
scales alone, data parallelism over FakeComm). The PyTorch parity of the whole model is tests/test_fp8_torch.py;
the GPU against this emulation, tests/test_cuda_fp8.py."""
import json
import math

import numpy as np
import pytest

ml_dtypes = pytest.importorskip("ml_dtypes")

from llmpy.backends import get_backend  # noqa: E402
from llmpy.errors import UserError  # noqa: E402
from llmpy.formats.checkpoint import load_checkpoint  # noqa: E402
from llmpy.layers import fp8 as F  # noqa: E402
from llmpy.models.gpt2 import GPT2, GPT2Config  # noqa: E402
from llmpy.models.llama3 import Llama, LlamaConfig  # noqa: E402
from llmpy.train import TrainConfig, run  # noqa: E402
from streams import phrase_stream  # noqa: E402

E4M3, E5M2 = ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2


# ---- the recipe ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("role", [F.X, F.D])
def test_quantize_rounds_to_nearest_even_and_saturates(role):
    fmt = (E4M3, E4M3, E5M2)[role]
    codes = np.arange(256, dtype=np.uint8).view(fmt).astype(np.float32)
    finite = np.sort(np.unique(codes[np.isfinite(codes)]))
    q = np.empty(finite.shape, fmt)
    assert F.quantize(q, finite, 1.0, role) == 0  # every representable value is itself
    assert np.array_equal(q.astype(np.float32), finite)
    pos = finite[finite >= 0]
    mid = (pos[1:] + pos[:-1]) / 2  # midpoints round to the neighbour with an even mantissa (even code)
    q = np.empty(mid.shape, fmt)
    F.quantize(q, mid.astype(np.float32), 1.0, role)
    lo_code = np.searchsorted(pos, mid) - 1
    even = np.where(lo_code % 2 == 0, pos[lo_code], pos[lo_code + 1])
    assert np.array_equal(q.astype(np.float32), even)
    x = np.array([F.FMAX[role] * 1.5, -1e30, np.inf, np.nan, 3.0], np.float32)
    q = np.empty(x.shape, fmt)
    assert F.quantize(q, x, 1.0, role) == 3  # the three beyond the range are clamped and counted
    got = q.astype(np.float32)
    assert got[0] == F.FMAX[role] and got[1] == -F.FMAX[role] and got[2] == F.FMAX[role]
    assert np.isnan(got[3]) and got[4] == 3.0


def test_scale_from_amax_lands_the_amax_in_the_top_binade():
    rng = np.random.default_rng(0)
    for role in (F.X, F.D):
        for a in np.exp(rng.uniform(-30, 30, 500)).astype(np.float32):
            s = F.scale_from_amax(float(a), role, 7.0)
            assert math.frexp(s)[0] == 0.5  # a power of two
            assert F.FMAX[role] / 2 < a * s <= F.FMAX[role]
    assert F.scale_from_amax(1.0, F.X, 7.0) == 256.0 and F.scale_from_amax(448.0, F.X, 7.0) == 1.0
    assert F.scale_from_amax(449.0, F.X, 7.0) == 0.5
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        assert F.scale_from_amax(bad, F.X, 7.0) == 7.0


def test_fold_keeps_the_last_steps_and_takes_their_max():
    hist = np.zeros((2, 3, F.HISTORY), np.float32)
    scale = np.ones((2, 3), np.float32)
    for step in range(F.HISTORY + 3):
        pending = np.full((2, 3), 1.0 if step else 100.0, np.float32)  # a large amax once, at step 0
        pending[1, 2] = np.nan  # non-finite amax counts as 0: the scale keeps its last value
        F.fold(hist, pending, scale)
        big = step < F.HISTORY  # step 0's amax leaves the window after HISTORY steps
        assert scale[0, 0] == F.scale_from_amax(100.0 if big else 1.0, F.X, 0.0)
        assert scale[1, 2] == 1.0 and hist[1, 2].max() == 0.0
    assert hist[0, 0, 0] == 1.0


def test_fp8_product_is_the_exact_product_of_representable_operands():
    """Operands already on the FP8 grid (at their scales) are quantized to themselves: the FP8 product's forward
    and both backward products are then the exact products, and dX, dW are the float64 finite differences of
    sum(dY * out)."""
    rng = np.random.default_rng(1)
    N, K, OC = 16, 32, 16
    sx, sw, sd = 2.0 ** 6, 2.0 ** 9, 2.0 ** 14
    grid = lambda shape, s, fmt: (rng.standard_normal(shape).astype(fmt).astype(np.float32) / np.float32(s))  # noqa: E731
    x, w, dy = grid((N, K), sx, E4M3), grid((OC, K), sw, E4M3), grid((N, OC), sd, E5M2)
    xq, wq, dq = np.empty(x.shape, E4M3), np.empty(w.shape, E4M3), np.empty(dy.shape, E5M2)
    assert F.quantize(xq, x, sx, F.X) == F.quantize(wq, w, sw, F.W) == F.quantize(dq, dy, sd, F.D) == 0
    out, dx, dw = np.empty((N, OC), np.float32), np.empty((N, K), np.float32), np.full((OC, K), 5.0, np.float32)
    F.matmul_forward(out, xq, wq, sx, sw)
    F.matmul_backward_dinp(dx, dq, wq, sd, sw)
    F.matmul_backward_dw(dw, dq, xq, sd, sx, accumulate=True)
    x64, w64, d64 = (a.astype(np.float64) for a in (x, w, dy))
    np.testing.assert_allclose(out, x64 @ w64.T, rtol=1e-6, atol=1e-9)

    def f(xv, wv):
        return float(np.sum(d64 * (xv @ wv.T)))
    h = 1e-3
    fd_x = np.zeros_like(x64)
    for idx in np.ndindex(x64.shape):
        e = np.zeros_like(x64)
        e[idx] = h
        fd_x[idx] = (f(x64 + e, w64) - f(x64 - e, w64)) / (2 * h)
    np.testing.assert_allclose(dx, fd_x, rtol=1e-5, atol=1e-9)
    fd_w = np.zeros_like(w64)
    for idx in [(0, 0), (3, 7), (15, 31), (8, 16)]:
        e = np.zeros_like(w64)
        e[idx] = h
        fd_w[idx] = (f(x64, w64 + e) - f(x64, w64 - e)) / (2 * h)
        assert abs(dw[idx] - 5.0 - fd_w[idx]) < 1e-5 * max(1.0, abs(fd_w[idx]))


# ---- models on the emulating backend ---------------------------------------------------------------------------
GCFG = GPT2Config(max_seq_len=32, vocab_size=250, padded_vocab_size=256, num_layers=2, num_heads=4, channels=32)
LCFG = LlamaConfig(max_seq_len=32, vocab_size=250, padded_vocab_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                   channels=32, ffn_hidden=64, tied=True)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fp8_model_step_is_close_to_fp32_and_registers_the_block_products_and_head(family, monkeypatch):
    monkeypatch.setenv("LLMPY_FP8_HEAD", "1")  # the LM head an FP8 product too
    rng = np.random.default_rng(3)
    B, T = 4, 16
    x = rng.integers(0, 250, (B, T)).astype(np.int32)
    y = rng.integers(0, 250, (B, T)).astype(np.int32)
    losses, grads = [], []
    for dtype in ("fp32", "fp8"):
        be = get_backend("cpu", dtype)
        m = GPT2(GCFG, be, B, T) if family == "gpt2" else Llama(LCFG, be, B, T)
        m.init_weights(5)
        if dtype == "fp8":  # four block products a layer, then the LM head
            assert m.fp8_products == 4 * 2 + 1 and be.fp8.calibrate and be.fp8.head == 8
            assert be.fp8.slot(m.params[m.HEAD_WEIGHT]) == 8
            be.fp8_quantize_weights()
            be.fp8_begin_step()
        losses.append(m.forward(x, y, grad_scale=1.0 / (B * T)))
        m.backward()
        grads.append(np.array(m.grads.flat, copy=True))
        if dtype == "fp8":  # the head's output gradient took the fixed scale of its bound 1/(B*T) = 2^-6, no amax
            assert be.fp8.scale[8, F.D] == 2.0 ** 21 == F.head_grad_scale(1.0 / (B * T))  # 57344 = 1.75 * 2^15
            assert be.fp8.pending[8, F.D] == 0 and be.fp8.pending[8, F.X] > 0 and be.fp8.pending[7, F.D] > 0
    assert abs(losses[1] - losses[0]) < 0.01 * losses[0]
    cos = grads[0] @ grads[1] / (np.linalg.norm(grads[0]) * np.linalg.norm(grads[1]))
    assert 0.99 < cos < 1.0  # close, and not the same computation


def test_fp8_head_only_where_asked_and_a_resume_across_the_two_is_refused(monkeypatch):
    monkeypatch.delenv("LLMPY_FP8_HEAD", raising=False)  # the default: the LM head in the compute dtype
    be = get_backend("cpu", "fp8")
    m = GPT2(GCFG, be, 4, 16)
    assert m.fp8_products == 8 and be.fp8.head is None and be.fp8.slot(m.params["wte"]) is None
    state = be.fp8_state()
    monkeypatch.setenv("LLMPY_FP8_HEAD", "1")
    be2 = get_backend("cpu", "fp8")
    m2 = GPT2(GCFG, be2, 4, 16)
    assert m2.fp8_products == 9 and be2.fp8.slot(m2.params["wte"]) == be2.fp8.head == 8
    with pytest.raises(UserError, match="for 8 FP8 products and this run has 9"):
        be2.fp8_load_state(state)
    with pytest.raises(ValueError, match="head_rows"):
        be2.fp8_register([m2.params["qkvw"][0]], 64, head=m2.params["wte"], head_rows=0)


def test_fp8_refused_where_there_is_no_fp8_path():
    from llmpy.config import config_from_name
    from llmpy.models.mmfree import MMFree
    cfg = config_from_name("mmfree:l1d32i64v250t16")
    with pytest.raises(UserError, match="no FP8 path"):
        MMFree(cfg, get_backend("cpu", "fp8"), 2, 8)
    with pytest.raises(UserError, match="dtype"):
        TrainConfig(dtype="fp4").check()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from llmpy.data.shards import write_shard
    d = tmp_path_factory.mktemp("fp8shards")
    rng = np.random.default_rng(0)
    stream = phrase_stream(rng, 1500)
    write_shard(d / "tr_000.bin", stream[:8000])
    write_shard(d / "va_000.bin", stream[8000:])
    return str(d / "tr_*.bin"), str(d / "va_*.bin")


def _cfg(shards, out, **kw):
    base = dict(init="l2h2c32t32", train_data=shards[0], val_data=shards[1], batch_size=4, seq_len=16, steps=6,
                val_every=0, val_batches=2, sample_tokens=0, progress=False, device="cpu", dtype="fp8", out=str(out),
                lr=3e-3)
    base.update(kw)
    return TrainConfig(**base)


def _trace(out):
    return [(e["step"], e.get("train_loss"), e.get("val_loss"), e.get("fp8_clamped"))
            for e in map(json.loads, open(f"{out}/metrics.jsonl"))]


@pytest.mark.slow
def test_fp8_runs_are_deterministic_resume_bitwise_and_evaluation_leaves_the_scales_alone(shards, tmp_path,
                                                                                             monkeypatch):
    monkeypatch.setenv("LLMPY_FP8_HEAD", "1")  # the LM head too (its fixed gradient scale: no history)
    kw = dict(grad_accum=2, lr_schedule="cosine", warmup_steps=1)
    a = run(_cfg(shards, tmp_path / "a", **kw))
    b = run(_cfg(shards, tmp_path / "b", val_every=2, **kw))  # evaluations between the steps
    part = run(_cfg(shards, tmp_path / "part", stop_at=2, **kw))
    assert part.steps_done < 6
    resumed = run(TrainConfig(resume=str(tmp_path / "part"), progress=False, explicit=("resume",)))
    ta = [t for t in _trace(a.out) if t[1] is not None]
    assert len(ta) == 6 and all(t[3] is not None for t in ta)  # the clamp count is logged every step
    assert ta == [t for t in _trace(b.out) if t[1] is not None]
    assert ta == [t for t in _trace(resumed.out) if t[1] is not None]
    ca, cr = (load_checkpoint(r.out / "checkpoint.safetensors") for r in (a, resumed))
    assert all(np.array_equal(ca.params[k], cr.params[k]) for k in ca.params)
    assert ca.state["fp8"] == cr.state["fp8"]
    hist = np.array(ca.state["fp8"]["fp8_amax_history"])  # 8 block products, then the head (its D scale fixed)
    assert hist.shape == (9, 3, F.HISTORY) and np.all(hist[:, :, 6:] == 0)
    assert np.all(hist[:8, :, :6] > 0) and np.all(hist[8, :2, :6] > 0) and np.all(hist[8, 2] == 0)
    fp32 = run(_cfg(shards, tmp_path / "fp32", dtype=None, **kw))
    l8 = [t[1] for t in ta]
    l32 = [t[1] for t in _trace(fp32.out) if t[1] is not None]
    assert l8 != l32 and max(abs(p - q) for p, q in zip(l8, l32)) < 0.05 * l32[0]


@pytest.mark.slow
@pytest.mark.parametrize("zero", [0, 1, 2])
def test_fp8_data_parallel_matches_one_rank_with_accumulation(shards, tmp_path, zero):
    """Two thread ranks over FakeComm, plain data parallel and ZeRO-1/2: the ranks' amax are combined by max, so
    both take the scales one rank with two micro-batches takes, and the run is the same. Under ZeRO each rank
    updates its shard of the weights and gathers the rest, then quantizes the whole weights for the next step."""
    from fakes import FakeComm
    from test_data_parallel import ThreadDist, on_threads
    one = run(_cfg(shards, tmp_path / "one", grad_accum=2, steps=4, shuffle=False))
    comms = FakeComm.group(2, timeout=60)
    two = on_threads(2, lambda r: run(_cfg(shards, tmp_path / "two", steps=4, shuffle=False, zero=zero),
                                      dist=ThreadDist(comms[r])))
    np.testing.assert_allclose(two[0].train_losses, one.train_losses, rtol=1e-5)
    assert two[1].train_losses == two[0].train_losses
