"""The CPU backend runs the reference layers block by block (cache blocking): every blocked op must give what the
whole-tensor layer function gives (bitwise where rows are independent), AdamW must follow its formula, and a
training step must allocate (almost) nothing and be bitwise reproducible."""
import tracemalloc

import numpy as np
import pytest

from llmpy import layers as Lr
from llmpy.backends import cpu as cpu_mod
from llmpy.backends.cpu import CPUBackend, blocks
from llmpy.backends.ops import OpShapes
from llmpy.layers.adamw import adamw_update
from llmpy.models.gpt2 import GPT2Config
from llmpy.models.gpt2 import GPT2
from llmpy.train.optim import AdamW

RNG = np.random.default_rng(77)


@pytest.fixture
def be(monkeypatch):
    """An fp32 backend with tiny blocks, so that every op runs as several blocks with a short last one."""
    monkeypatch.setattr(cpu_mod, "BLOCK", 96)
    monkeypatch.setattr(cpu_mod, "ROW_BLOCK_BYTES", 3 * 37 * 4)  # 3 rows of 37 logits
    b = CPUBackend("fp32")
    C = 12  # a GPT-2 block's ops at B=3, T=11, 2 heads, vocabulary 37
    b.plan_workspace(OpShapes(3, 11, C, 2, 2, C // 2, 37, 37, linears=((3 * C, C), (C, C), (4 * C, C), (C, 4 * C),
                                                                        (37, C)), bias_widths=(3 * C, C, 4 * C)))
    return b


def r(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def test_blocks_cover_the_range_in_order():
    assert blocks(10, 4) == (slice(0, 4), slice(4, 8), slice(8, 10))
    assert blocks(3, 0) == (slice(0, 1), slice(1, 2), slice(2, 3))
    assert blocks(0, 5) == ()


def test_gelu_blocked_is_bitwise_the_layer(be):
    x = r(3, 11, 48) * 3
    out, ref = np.full_like(x, np.nan), np.empty_like(x)
    be.gelu_forward(out, x)
    Lr.gelu_forward(ref, x)
    assert np.array_equal(out, ref)


@pytest.mark.parametrize("gelu", [False, True])
def test_matmul_backward_blocked_is_bitwise_the_layer(be, gelu):
    x, w, dout, pre = r(3, 11, 12), r(48, 12), r(3, 11, 48), r(3, 11, 12) * 2
    dinp, dw, db = np.full((3, 11, 12), np.nan, np.float32), r(48, 12), r(48)
    rdinp, rdw, rdb = np.empty_like(dinp), dw.copy(), db.copy()
    be.matmul_backward(dinp, dw, db, dout, x, w, gelu_pre=pre if gelu else None)
    Lr.matmul_backward(rdinp, rdw, rdb, dout, x, w)
    if gelu:
        Lr.gelu_backward(rdinp, pre, rdinp)
    assert np.array_equal(dinp, rdinp) and np.array_equal(dw, rdw) and np.array_equal(db, rdb)


def test_matmul_backward_gelu_db_is_the_next_layers_bias_sum(be):
    """gelu_db (the bias gradient of the product below, summed with the GELU backward) is bitwise the sum that
    product's own matmul_backward forms from the same dinp."""
    x, w, dout, pre = r(3, 11, 12), r(48, 12), r(3, 11, 48), r(3, 11, 12) * 2
    dinp, dw, gdb = np.full((3, 11, 12), np.nan, np.float32), r(48, 12), r(12)
    rdinp, rdw, rgdb, gdb0 = np.empty_like(dinp), dw.copy(), gdb.copy(), gdb.copy()
    be.matmul_backward(dinp, dw, None, dout, x, w, gelu_pre=pre, gelu_db=gdb)
    be.matmul_backward(rdinp, rdw, None, dout, x, w, gelu_pre=pre)
    be.matmul_backward(None, r(12, 5), rgdb, rdinp, r(3, 11, 5), r(12, 5))  # the layer below's bias sum
    assert np.array_equal(dinp, rdinp) and np.array_equal(dw, rdw)
    assert np.array_equal(gdb, rgdb) and not np.array_equal(gdb, gdb0)
    with pytest.raises(ValueError, match="gelu_pre"):
        be.matmul_backward(dinp, dw, None, dout, x, w, gelu_db=gdb)


def test_layernorm_dinp_sums_are_the_next_products_bias_sum(be):
    """layernorm_backward(dinp_sums=True) hands the column sums of its updated dinp to the product below
    (matmul_backward(db_sums=)): bitwise the sum that product's own matmul_backward forms from dinp, accumulating
    and as a first write; a handle a later call replaced, or one of another width, is refused."""
    x, dout, w, mean, rstd = r(3, 11, 12), r(3, 11, 12), r(12), r(33), np.abs(r(33)) + 0.5
    dinp, dw, db = r(3, 11, 12), r(12), r(12)
    lin, inp = r(12, 5), r(3, 11, 5)  # the product below: out (3, 11, 12) = inp @ lin.T
    sums = be.layernorm_backward(dinp, dw, db, dout, x, w, mean, rstd, dinp_sums=True)
    bias0 = r(12)
    got, want = bias0.copy(), bias0.copy()
    be.matmul_backward(None, None, got, dinp, None, lin, db_sums=sums)
    be.matmul_backward(None, r(12, 5), want, dinp, inp, lin)
    assert np.array_equal(got, want) and not np.array_equal(got, bias0)
    fresh, ref = np.full(12, np.nan, np.float32), np.full(12, np.nan, np.float32)
    be.fresh_grads(fresh)
    be.matmul_backward(None, None, fresh, dinp, None, lin, db_sums=sums)
    be.fresh_grads(ref)
    be.matmul_backward(None, None, ref, dinp, None, lin)
    be.fresh = []
    assert np.array_equal(fresh, ref) and not np.isnan(fresh).any()
    later = be.layernorm_backward(dinp, dw, db, dout, x, w, mean, rstd, dinp_sums=True)
    with pytest.raises(ValueError, match="db_sums"):
        be.matmul_backward(None, None, got, dinp, None, lin, db_sums=sums)
    with pytest.raises(ValueError, match="db_sums"):
        be.matmul_backward(None, None, r(5), inp, None, r(5, 12), db_sums=later)


def test_classifier_blocked_is_bitwise_the_layer(be):
    N, V = 3 * 11, 37
    logits, t = r(3, 11, 64) * 4, RNG.integers(0, V, (3, 11))
    logits[..., V:] = 0
    ref_l, ref_loss = logits[..., :V].reshape(N, V).copy(), np.empty(N, np.float32)
    losses = np.full((3, 11), np.nan, np.float32)
    be.fused_classifier(losses, logits, t, V, dloss=1.0 / N)
    Lr.fused_classifier(ref_loss, ref_l, t.reshape(N), dloss=1.0 / N)
    assert np.array_equal(losses.reshape(N), ref_loss)
    assert np.array_equal(logits[..., :V].reshape(N, V), ref_l)
    assert np.all(logits[..., V:] == 0), "padded columns are never touched"


def test_layernorm_blocked_matches_the_layer(be):
    x1, x2, w, b, dy = r(3, 11, 12), r(3, 11, 12), r(12), r(12), r(3, 11, 12)
    res, out, mean, rstd = (np.full(s, np.nan, np.float32) for s in ((3, 11, 12), (3, 11, 12), (3, 11), (3, 11)))
    be.fused_residual_layernorm_forward(res, out, mean, rstd, x1, x2, w, b)
    rres, rout, rmean, rrstd = np.empty_like(res), np.empty_like(out), np.empty_like(mean), np.empty_like(rstd)
    Lr.residual_forward(rres, x1, x2)
    Lr.layernorm_forward(rout, rmean, rrstd, rres, w, b)
    for got, ref in ((res, rres), (out, rout), (mean, rmean), (rstd, rrstd)):
        assert np.array_equal(got, ref)
    dx0, dw0, db0 = r(3, 11, 12), r(12), r(12)
    dx, dw, db = dx0.copy(), dw0.copy(), db0.copy()
    rdx, rdw, rdb = dx0.copy(), dw0.copy(), db0.copy()
    be.layernorm_backward(dx, dw, db, dy, res, w, mean, rstd)
    Lr.layernorm_backward(rdx, rdw, rdb, dy, res, w, mean, rstd)
    assert np.array_equal(dx, rdx), "rows are independent: the input gradient is bitwise the same"
    # the parameter gradients sum over rows: block partial sums are added in order, so only rounding differs
    np.testing.assert_allclose(dw, rdw, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(db, rdb, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_adamw_follows_the_formula(be, clip):
    n, t, lr, b1, b2, eps, wd = 1000, 3, 1e-2, 0.9, 0.95, 1e-8, 0.1
    p, g, m = r(n), r(n) * 0.1, r(n) * 0.01
    v = np.abs(r(n)) * 1e-3
    norm = float(np.sqrt((g.astype(np.float64) ** 2).sum()))
    hp = np.array([lr, b1, b2, eps, 1 / (1 - b1 ** t), 1 / (1 - b2 ** t), clip, 0], np.float32)
    P, M, V = p.copy(), m.copy(), v.copy()
    be.adamw(P, None, g, M, V, hp, np.array([norm]), wd, 0)
    s = clip / norm if 0 < clip < norm else 1.0
    g64 = g.astype(np.float64) * s
    rm = b1 * m + (1 - b1) * g64
    rv = b2 * v + (1 - b2) * g64 * g64
    rp = p - lr * ((rm / (1 - b1 ** t)) / (np.sqrt(rv / (1 - b2 ** t)) + eps) + wd * p)
    for got, ref in ((M, rm), (V, rv), (P - p, rp - p)):  # the update of p, not p, is what must be exact
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-5
    # elementwise, so blocking changes nothing: one whole-tensor update (same fp32 scalars) gives the same bits
    P2, M2, V2 = p.copy(), m.copy(), v.copy()
    h = [float(x) for x in hp]
    adamw_update(P2, g, M2, V2, np.empty(n, np.float32), np.empty(n, np.float32), lr=h[0], beta1=h[1], beta2=h[2],
                 eps=h[3], bc1=h[4], bc2=h[5], weight_decay=wd, scale=h[6] / norm if 0 < h[6] < norm else 1.0)
    assert np.array_equal(P, P2) and np.array_equal(M, M2) and np.array_equal(V, V2)


def test_adamw_skips_a_non_finite_norm(be):
    p, g, m, v = r(100), r(100), r(100), np.abs(r(100))
    before = [a.copy() for a in (p, m, v)]
    be.adamw(p, None, g, m, v, np.array([1e-2, 0.9, 0.95, 1e-8, 10, 20, 1.0, 0], np.float32),
             np.array([np.nan]), 0.1, 0)
    assert all(np.array_equal(a, b) for a, b in zip((p, m, v), before))


CFG = GPT2Config(max_seq_len=64, vocab_size=2000, padded_vocab_size=2048, num_layers=2, num_heads=4, channels=64)
B, T = 4, 64


def _model(seed=0):
    model = GPT2(CFG, CPUBackend(), B, T)
    model.init_weights(seed)
    opt = AdamW(model, weight_decay=0.1)
    x = np.random.default_rng(seed).integers(0, CFG.vocab_size, (B, T + 1)).astype(np.int32)
    xi, yi = np.ascontiguousarray(x[:, :-1]), np.ascontiguousarray(x[:, 1:])

    def step():
        model.zero_grad()
        model.forward(xi, yi, grad_scale=1.0 / (B * T))
        model.backward()
        opt.step(1e-3, grad_clip=1.0)
    return model, step


def test_training_step_allocates_almost_nothing():
    model, step = _model()
    step()
    step()  # warm-up: lazily built caches (block lists, the causal mask) exist from here on
    tracemalloc.start()
    try:
        step()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    budget = 0.02 * model.acts.nbytes()
    assert peak < budget, f"a step allocated up to {peak} bytes (budget {budget:.0f}, 2% of the activations)"


def test_training_is_bitwise_reproducible():
    out = []
    for _ in range(2):
        model, step = _model(seed=3)
        for _ in range(2):
            step()
        out.append(model.params.flat.copy())
    assert np.array_equal(out[0], out[1])


def test_attention_per_sequence_is_bitwise_the_layer(be):
    B, T, NH, C = 3, 11, 2, 12
    qkv, dout = r(B, T, 3 * C), r(B, T, C)
    out, att = np.full((B, T, C), np.nan, np.float32), np.full((B, NH, T, T), np.nan, np.float32)
    rout, ratt = np.empty_like(out), np.empty_like(att)
    be.attention_forward(out, att, qkv, NH)
    Lr.attention_forward(rout, ratt, qkv, NH)
    assert np.array_equal(out, rout) and np.array_equal(att, ratt)
    dqkv, rdqkv = np.full_like(qkv, np.nan), np.empty_like(qkv)
    be.attention_backward(dqkv, dout, qkv, att, NH)
    Lr.attention_backward(rdqkv, dout, qkv, att, NH)
    assert np.array_equal(dqkv, rdqkv)


def test_grad_sumsq_is_accurate_and_deterministic(be):
    g = r(1000) * 1e-3
    out, again = np.zeros(1), np.zeros(1)
    be.grad_sumsq(out, g)  # blocks of 96 here: fp32 dot products summed in float64
    be.grad_sumsq(again, g)
    exact = float((g.astype(np.float64) ** 2).sum())
    assert abs(out[0] - exact) <= 1e-6 * exact
    assert out[0] == again[0]
