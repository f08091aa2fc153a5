"""Every layer's backward against float64 central differences (relative error < 1e-6)."""
import numpy as np
import pytest

from llmpy import layers as Lr

RNG = np.random.default_rng(1234)
H = 1e-6


def numgrad(loss, x):
    """Central differences of a scalar function with respect to every element of x (perturbed in place)."""
    g = np.zeros_like(x)
    flat, gf = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + H
        lp = loss()
        flat[i] = old - H
        lm = loss()
        flat[i] = old
        gf[i] = (lp - lm) / (2 * H)
    return g


def relerr(a, b):
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def check(analytic, loss, x, tol=1e-6):
    num = numgrad(loss, x)
    assert np.abs(num).max() > 0, "degenerate check: numeric gradient is zero"
    err = relerr(analytic, num)
    assert err < tol, f"relative error {err:.2e}"


def r(*shape):
    return RNG.standard_normal(shape)


def test_encoder():
    B, T, C, V = 2, 3, 4, 7
    tok = np.array([[1, 5, 1], [0, 6, 5]])  # repeats exercise the scatter-add
    wte, wpe, R = r(V, C), r(T + 2, C), r(B, T, C)
    out = np.empty((B, T, C))

    def loss():
        Lr.encoder_forward(out, tok, wte, wpe)
        return (out * R).sum()

    dwte, dwpe = np.zeros_like(wte), np.zeros_like(wpe)
    Lr.encoder_backward(dwte, dwpe, R, tok)
    check(dwte, loss, wte)
    check(dwpe, loss, wpe)


def test_layernorm():
    B, T, C = 2, 3, 5
    x, w, b, R = r(B, T, C), r(C), r(C), r(B, T, C)
    out, mean, rstd = np.empty((B, T, C)), np.empty((B, T)), np.empty((B, T))

    def loss():
        Lr.layernorm_forward(out, mean, rstd, x, w, b)
        return (out * R).sum()

    loss()
    dx0 = r(B, T, C)  # dinp accumulates: start from a non-zero value and subtract it afterwards
    dx, dw, db = dx0.copy(), np.zeros(C), np.zeros(C)
    Lr.layernorm_backward(dx, dw, db, R, x, w, mean, rstd)
    check(dx - dx0, loss, x)
    check(dw, loss, w)
    check(db, loss, b)


def test_layernorm_matches_definition():
    x, w, b = r(4, 6), r(6), r(6)
    out, mean, rstd = np.empty((4, 6)), np.empty(4), np.empty(4)
    Lr.layernorm_forward(out, mean, rstd, x, w, b)
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * w + b
    assert relerr(out, ref) < 1e-12


@pytest.mark.parametrize("bias", [True, False])
def test_matmul(bias):
    N, K, OC = 5, 4, 3
    x, w, R = r(N, K), r(OC, K), r(N, OC)
    bv = r(OC) if bias else None
    out = np.empty((N, OC))

    def loss():
        Lr.matmul_forward(out, x, w, bv)
        return (out * R).sum()

    dx, dw = np.full((N, K), np.nan), np.zeros_like(w)
    db = np.zeros(OC) if bias else None
    Lr.matmul_backward(dx, dw, db, R, x, w)
    check(dx, loss, x)
    check(dw, loss, w)
    if bias:
        check(db, loss, bv)


def test_gelu():
    x, R = r(3, 7) * 2, r(3, 7)
    out = np.empty_like(x)

    def loss():
        Lr.gelu_forward(out, x)
        return (out * R).sum()

    loss()
    ref = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    assert relerr(out, ref) < 1e-14
    dx = np.full_like(x, np.nan)
    Lr.gelu_backward(dx, x, R)
    check(dx, loss, x)
    inplace = R.copy()
    Lr.gelu_backward(inplace, x, inplace)  # the backend runs it in place
    assert np.array_equal(inplace, dx)


def test_residual():
    a, b, R = r(2, 3, 4), r(2, 3, 4), r(2, 3, 4)
    out = np.empty_like(a)

    def loss():
        Lr.residual_forward(out, a, b)
        return (out * R).sum()

    da, db = np.zeros_like(a), np.zeros_like(b)
    Lr.residual_backward(da, db, R)
    check(da, loss, a)
    check(db, loss, b)


def test_attention():
    B, T, NH, hs = 2, 4, 2, 3
    C = NH * hs
    qkv, R = r(B, T, 3 * C), r(B, T, C)
    out, att = np.empty((B, T, C)), np.empty((B, NH, T, T))

    def loss():
        Lr.attention_forward(out, att, qkv, NH)
        return (out * R).sum()

    loss()
    # forward against a direct per-head computation with an explicit causal mask
    q, k, v = (qkv[:, :, i * C:(i + 1) * C].reshape(B, T, NH, hs).transpose(0, 2, 1, 3) for i in range(3))
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hs) + np.triu(np.full((T, T), -np.inf), 1)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    assert relerr(out, (p @ v).transpose(0, 2, 1, 3).reshape(B, T, C)) < 1e-13
    assert np.all(att[..., 0, 1:] == 0)
    dqkv = np.full_like(qkv, np.nan)
    Lr.attention_backward(dqkv, R, qkv, att, NH)
    check(dqkv, loss, qkv)


def test_fused_classifier():
    N, V = 6, 9
    logits, t = r(N, V) * 3, RNG.integers(0, V, N)
    losses = np.empty(N)

    def loss():
        Lr.crossentropy_forward(losses, logits, t)
        return losses.mean()

    loss()
    ref = np.log(np.exp(logits).sum(-1)) - logits[np.arange(N), t]
    assert relerr(losses, ref) < 1e-13
    d = logits.copy()
    Lr.fused_classifier(losses, d, t, dloss=1.0 / N)
    check(d, loss, logits)


# ---- Llama 3's layers -------------------------------------------------------------------------------------------

def test_rmsnorm():
    B, T, C = 2, 3, 5
    x, w, R = r(B, T, C), r(C), r(B, T, C)
    out, rstd = np.empty((B, T, C)), np.empty((B, T))

    def loss():
        Lr.rmsnorm_forward(out, rstd, x, w)
        return (out * R).sum()

    loss()
    assert relerr(out, x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * w) < 1e-14
    d0 = r(B, T, C)  # dinp accumulates
    dx, dw = d0.copy(), np.zeros_like(w)
    Lr.rmsnorm_backward(dx, dw, R, x, w, rstd)
    check(dx - d0, loss, x)
    check(dw, loss, w)


@pytest.mark.parametrize("factor", [1.0, 32.0])
def test_rope(factor):
    B, T, NH, K, d = 2, 16, 4, 2, 16
    table = Lr.rope_table(40, Lr.rope_frequencies(d, 500000.0, factor=factor, original_context=16))
    qkv, R = r(B, T, (NH + 2 * K) * d), r(B, T, (NH + 2 * K) * d)
    pos = 7
    out = np.empty_like(qkv)

    def loss():
        out[...] = qkv
        Lr.rope_forward(out, table, NH, K, pos=pos)
        return (out * R).sum()

    loss()
    # against a complex rotation of each pair (Meta's formulation), and v untouched
    f = Lr.rope_frequencies(d, 500000.0, factor=factor, original_context=16).astype(np.float64)
    z = qkv[..., :(NH + K) * d].reshape(B, T, NH + K, d // 2, 2)
    rot = (z[..., 0] + 1j * z[..., 1]) * np.exp(1j * np.outer(np.arange(pos, pos + T), f))[None, :, None]
    want = np.stack([rot.real, rot.imag], -1).reshape(B, T, -1)
    assert relerr(out[..., :(NH + K) * d], want) < 1e-6  # the table is float32
    assert np.array_equal(out[..., (NH + K) * d:], qkv[..., (NH + K) * d:])
    g = R.copy()
    Lr.rope_backward(g, table, NH, K, pos=pos)
    check(g, loss, qkv)


def test_rope_frequencies_llama31_bands():
    """Llama 3.1 scaling at d = 128, theta 5e5, factor 8, context 8192: 29 frequencies kept, 6 blended, 29 divided."""
    base = Lr.rope_frequencies(128, 500000.0)
    scaled = Lr.rope_frequencies(128, 500000.0, factor=8.0)
    kept = np.isclose(scaled, base, rtol=0, atol=0)
    divided = np.isclose(scaled, base / 8, rtol=1e-6, atol=0)
    assert (kept.sum(), divided.sum(), (~kept & ~divided).sum()) == (29, 29, 6)


def test_swiglu():
    N, F = 6, 5
    x, R = r(N, 2 * F), r(N, F)
    out = np.empty((N, F))

    def loss():
        Lr.swiglu_forward(out, x)
        return (out * R).sum()

    loss()
    up, gate = x[:, :F], x[:, F:]
    assert relerr(out, up * gate / (1 + np.exp(-gate))) < 1e-14
    dx = np.full_like(x, np.nan)
    Lr.swiglu_backward(dx, x, R)
    check(dx, loss, x)


def test_grouped_query_attention():
    B, T, NH, K, hs = 2, 5, 4, 2, 3
    C = NH * hs
    qkv, R = r(B, T, (NH + 2 * K) * hs), r(B, T, C)
    out, att = np.full((B, T, C), np.nan), np.empty((B, NH, T, T))

    def loss():
        Lr.attention_forward(out, att, qkv, NH, K)
        return (out * R).sum()

    loss()
    # against plain multi-head attention on k and v repeated for each query head of their group
    q, k, v = qkv[..., :C], qkv[..., C:C + K * hs], qkv[..., C + K * hs:]
    rep = lambda t: np.repeat(t.reshape(B, T, K, hs), NH // K, axis=2).reshape(B, T, C)  # noqa: E731
    ref, ref_att = np.empty((B, T, C)), np.empty((B, NH, T, T))
    Lr.attention_forward(ref, ref_att, np.concatenate([q, rep(k), rep(v)], -1), NH)
    assert relerr(out, ref) < 1e-13
    dqkv = np.full_like(qkv, np.nan)
    Lr.attention_backward(dqkv, R, qkv, att, NH, K)
    check(dqkv, loss, qkv)
    # decoding one position at a time over a K-head cache gives the same outputs
    loss()  # (check() left out from its last perturbation)
    kc, vc = np.full((B, K, 8, hs), np.nan), np.full((B, K, 8, hs), np.nan)
    for t in range(T):
        o = np.full((B, 1, C), np.nan)
        Lr.attention_decode(o, np.ascontiguousarray(qkv[:, t:t + 1]), kc, vc, t, NH, K)
        assert relerr(o[:, 0], out[:, t]) < 1e-12


# ---- the MatMul-free LM's layers ---------------------------------------------------------------------------------

def test_bitlinear_forward_is_the_quantized_product():
    M, K, N = 5, 8, 6
    x, w, g = r(M, K), r(N, K) * 0.3, 1 + 0.1 * r(K)
    out, rstd = np.empty((M, N)), np.empty(M)
    Lr.bitlinear_forward(out, rstd, x, w, g)
    y = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * g
    sx = 127 / np.abs(y).max(-1, keepdims=True)
    qx = np.clip(np.sign(y * sx) * np.floor(np.abs(y * sx) + 0.5), -128, 127)
    sw = 1 / np.abs(w).mean()
    qw = np.clip(np.round(w * sw), -1, 1)  # numpy rounds half to even, as the reference's weights
    assert set(np.unique(qw)) <= {-1.0, 0.0, 1.0} and np.abs(qx).max() == 127
    assert relerr(out, (qx / sx) @ (qw / sw).T) < 1e-13
    assert Lr.round_half_away(np.array([0.5, -0.5, 1.5, -2.5])).tolist() == [1, -1, 2, -3]


def test_bitlinear_straight_through_gradients():
    """The backward is the gradient of the straight-through surrogate: y(x, gamma) @ Wq0^T + yq0 @ W^T with the
    quantized Wq0, yq0 frozen at the point of evaluation (the roundings as identities, the scales constant)."""
    M, K, N = 4, 6, 5
    x, w, g, R = r(M, K), r(N, K) * 0.3, 1 + 0.1 * r(K), r(M, N)
    out, rstd = np.empty((M, N)), np.empty(M)
    Lr.bitlinear_forward(out, rstd, x, w, g)
    qw, sw = Lr.quantize_weight(w)
    Wq0 = qw / sw
    qx, sx = Lr.quantize_activations(x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * g)
    yq0 = qx / sx

    def surrogate():
        y = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * g
        return ((y @ Wq0.T + yq0 @ w.T) * R).sum()

    d0 = r(M, K)  # dinp accumulates
    dx, dw, dg = d0.copy(), np.zeros_like(w), np.zeros_like(g)
    Lr.bitlinear_backward(dx, dw, dg, R, x, w, g, rstd)
    check(dx - d0, surrogate, x)
    check(dw, surrogate, w)
    check(dg, surrogate, g)


@pytest.mark.parametrize("with_state", [False, True])
def test_mlgru(with_state):
    B, T, d = 2, 5, 4
    ai, af, ag, R = r(B, T, d), r(B, T, d), r(B, T, d), r(B, T, d)
    lam, g = np.abs(r(d)) * 0.3, 1 + 0.1 * r(d)
    h0 = r(B, d) if with_state else None
    o, h, rstd = np.empty((B, T, d)), np.empty((B, T, d)), np.empty((B, T))

    def loss():
        Lr.mlgru_forward(o, h, rstd, ai, af, ag, lam, g, h0=h0)
        return (o * R).sum()

    loss()
    # against the recurrence written out step by step
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    f = lam + (1 - lam) * sig(af)
    prev, hs = (np.zeros((B, d)) if h0 is None else h0), []
    for t in range(T):
        prev = f[:, t] * prev + ai[:, t] * sig(ai[:, t]) * (1 - f[:, t])
        hs.append(prev)
    hh = np.stack(hs, 1)
    want = ag / np.sqrt((ag * ag).mean(-1, keepdims=True) + 1e-6) * g * hh * sig(hh)
    assert relerr(o, want) < 1e-13
    if with_state:
        return  # the backward starts from zeros (training); decoding has no backward
    dai, daf, dag = (np.full((B, T, d), np.nan) for _ in range(3))
    dlam, dg = np.zeros(d), np.zeros(d)
    Lr.mlgru_backward(dai, daf, dag, dlam, dg, R, ai, af, ag, lam, g, h, rstd)
    for grad, x in ((dai, ai), (daf, af), (dag, ag), (dlam, lam), (dg, g)):
        check(grad, loss, x)


def test_lower_bounds():
    L, d = 4, 3
    P, R = r(L, d), r(L, d)
    lam = np.empty((L, d))

    def loss():
        Lr.lower_bounds_forward(lam, P)
        return (lam * R).sum()

    loss()
    S = np.exp(P) / np.exp(P).sum(0)
    assert np.all(lam[0] == 0) and relerr(lam[1:], np.cumsum(S, 0)[1:] - S[0]) < 1e-14
    assert np.all(np.diff(lam, axis=0) >= 0)  # they grow with depth
    dP = np.zeros_like(P)
    Lr.lower_bounds_backward(dP, R, P)
    check(dP, loss, P)
