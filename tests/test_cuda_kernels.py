"""Each CUDA op against the NumPy reference layer on fresh random inputs, outputs poisoned (NaN) first.
fp32 within 1e-5 relative; bf16 within bf16 rounding (1e-2 relative)."""
import math

import numpy as np
import pytest

from llmpy import layers as Lr
from llmpy.backends.ops import OpShapes
from llmpy.errors import UserError

pytestmark = pytest.mark.gpu
TOL = {"fp32": 1e-5, "bf16": 1e-2}
DTYPES = ["fp32", "bf16"]


@pytest.fixture(scope="module", params=DTYPES)
def be(request):
    from llmpy.backends.cuda.backend import CUDABackend
    return CUDABackend(request.param)


def rng():
    return np.random.default_rng(np.random.SeedSequence().entropy)  # fresh inputs every run


def dev(be, a, dtype=None):
    """host fp32 -> device array in the backend's activation dtype (or `dtype`)."""
    a = np.asarray(a, np.float32)
    if dtype == np.float32 or (dtype is None and be.act_dtype == np.float32):
        return be.asarray(a, np.float32)
    out = be.xp.empty(a.shape, dtype=be.act_dtype)
    be.load_f32(out, a)
    return out


def host(be, x):
    return np.asarray(be.to_numpy(x), dtype=np.float64)


def poison(be, shape, dtype=None):
    """An output buffer full of NaN (all-ones bytes are NaN in fp32 and bf16): unwritten elements show."""
    x = be.xp.empty(shape, dtype=dtype or be.act_dtype)
    be.xp.cuda.runtime.memset(x.data.ptr, 0xFF, x.nbytes)
    be.xp.cuda.Device().synchronize()  # the memset runs on the legacy stream, which be.stream does not wait for
    return x


def rounded(be, a):
    """What the device holds for host values a (bf16 inputs are rounded before the op runs)."""
    return host(be, dev(be, a))


def check(be, got, ref, tol=None):
    got = host(be, got)
    ref = np.asarray(ref, np.float64)
    assert not np.isnan(got).any(), "an output element was not written"
    err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert err <= (tol or TOL[be.dtype_name]), f"relative error {err:.2e}"


@pytest.mark.parametrize("pos_table", [True, False])
def test_encoder(be, pos_table):
    """GPT-2's token + position embedding, and Llama's token embedding alone (wpe, dwpe None)."""
    r = rng()
    B, T, C, V = 4, 64, 128, 1000
    tok = r.integers(0, 50, (B, T)).astype(np.int32)  # many repeats: exercises the segmented backward
    wte, wpe = rounded(be, r.standard_normal((V, C))), rounded(be, r.standard_normal((T, C)))
    if not pos_table:
        wpe = None
    out = poison(be, (B, T, C))
    tokd = be.asarray(tok)
    be.plan_workspace(_shapes(B, T, C, 2))
    be.set_tokens(tokd, tok)
    be.encoder_forward(out, tokd, dev(be, wte), dev(be, wpe) if pos_table else None)
    ref = np.empty((B, T, C))
    Lr.encoder_forward(ref, tok, wte, wpe)
    check(be, out, ref)
    dout = rounded(be, r.standard_normal((B, T, C)))
    w0, p0 = rounded(be, r.standard_normal((V, C))), rounded(be, r.standard_normal((T, C)))
    dwte, dwpe = dev(be, w0), dev(be, p0) if pos_table else None
    be.encoder_backward(dwte, dwpe, dev(be, dout), tokd)
    rw, rp = w0.copy(), p0.copy() if pos_table else None
    Lr.encoder_backward(rw, rp, dout, tok)
    check(be, dwte, rw)
    if pos_table:
        check(be, dwpe, rp)


def _shapes(B, T, C, NH, V=1000, bias_widths=None, kv_heads=None):
    """The op sizes of a GPT-2-like stack (biases on qkv, attention proj, fc, fc proj) at these sizes."""
    Vp = (V + 127) // 128 * 128
    K = kv_heads or NH
    hs = C // NH
    return OpShapes(B=B, T=T, channels=C, heads=NH, kv_heads=K, head_size=hs, vocab=V, logits=Vp,
                    linears=(((NH + 2 * K) * hs, C), (C, C), (4 * C, C), (C, 4 * C), (Vp, C)),
                    bias_widths=((NH + 2 * K) * hs, C, 4 * C, C) if bias_widths is None else bias_widths)


@pytest.mark.parametrize("N,C", [(300, 320), (70, 1600)])
def test_layernorm_and_fused_residual(be, N, C):
    """300 rows: two chunks of the parameter gradients' column sums, the last one short; 320 channels: a partial
    slab of columns in those sums; 1600: GPT-2 d48's width (several slabs, lanes with unequal numbers of packs in
    the row kernels)."""
    r = rng()
    x1, x2 = rounded(be, r.standard_normal((N, C))), rounded(be, r.standard_normal((N, C)))
    w, b = rounded(be, 1 + 0.1 * r.standard_normal(C)), rounded(be, r.standard_normal(C))
    res, out = poison(be, (N, C)), poison(be, (N, C))
    mean, rstd = poison(be, N, np.float32), poison(be, N, np.float32)
    be.plan_workspace(_shapes(5, 60, C, C // 64, bias_widths=()))  # the partials are sized by LayerNorm's 2C alone
    be.fused_residual_layernorm_forward(res, out, mean, rstd, dev(be, x1), dev(be, x2), dev(be, w), dev(be, b))
    xr = host(be, res)  # the LayerNorm reads the stored (rounded) residual
    check(be, res, x1 + x2)
    ro, rm, rr = np.empty((N, C)), np.empty(N), np.empty(N)
    Lr.layernorm_forward(ro, rm, rr, xr, w, b)
    check(be, out, ro)
    check(be, mean, rm, 1e-5 if be.dtype_name == "fp32" else 1e-4)
    check(be, rstd, rr, 1e-5)
    dout, d0 = rounded(be, r.standard_normal((N, C))), rounded(be, r.standard_normal((N, C)))
    dw0, db0 = rounded(be, r.standard_normal(C)), rounded(be, r.standard_normal(C))
    dinp, dw, db = dev(be, d0), dev(be, dw0), dev(be, db0)
    be.layernorm_backward(dinp, dw, db, dev(be, dout), dev(be, xr), dev(be, w), mean, rstd)
    rd, rdw, rdb = d0.copy(), dw0.copy(), db0.copy()
    Lr.layernorm_backward(rd, rdw, rdb, dout, xr, w, rm, rr)
    check(be, dinp, rd)
    check(be, dw, rdw)
    check(be, db, rdb)


@pytest.mark.parametrize("N,C", [(300, 320), (70, 1600)])
def test_rmsnorm_and_fused_residual(be, N, C):
    """The sizes of test_layernorm_and_fused_residual, for the same reasons."""
    r = rng()
    eps = 1e-5
    x1, x2 = rounded(be, r.standard_normal((N, C))), rounded(be, r.standard_normal((N, C)))
    w = rounded(be, 1 + 0.1 * r.standard_normal(C))
    res, out, out2 = poison(be, (N, C)), poison(be, (N, C)), poison(be, (N, C))
    rstd, rstd2 = poison(be, N, np.float32), poison(be, N, np.float32)
    be.plan_workspace(_shapes(5, 60, C, C // 64, bias_widths=()))  # Llama has no biases: the partials are 2C wide
    be.fused_residual_rmsnorm_forward(res, out, rstd, dev(be, x1), dev(be, x2), dev(be, w), eps)
    xr = host(be, res)  # the RMSNorm reads the stored (rounded) residual
    check(be, res, x1 + x2)
    ro, rr = np.empty((N, C)), np.empty(N)
    Lr.rmsnorm_forward(ro, rr, xr, w, eps)
    check(be, out, ro)
    check(be, rstd, rr, 1e-5)
    be.rmsnorm_forward(out2, rstd2, dev(be, x1), dev(be, w), eps)  # the plain forward, a different input
    ro2, rr2 = np.empty((N, C)), np.empty(N)
    Lr.rmsnorm_forward(ro2, rr2, x1, w, eps)
    check(be, out2, ro2)
    check(be, rstd2, rr2, 1e-5)
    # backward: dinp and dw accumulate
    dout, d0 = rounded(be, r.standard_normal((N, C))), rounded(be, r.standard_normal((N, C)))
    dw0 = rounded(be, r.standard_normal(C))
    dinp, dw = dev(be, d0), dev(be, dw0)
    be.rmsnorm_backward(dinp, dw, dev(be, dout), dev(be, xr), dev(be, w), rstd)
    rd, rdw = d0.copy(), dw0.copy()
    Lr.rmsnorm_backward(rd, rdw, dout, xr, w, rr)
    check(be, dinp, rd)
    check(be, dw, rdw)


@pytest.mark.parametrize("C", [320, 1600])
def test_norm_row_kernels_batched_or_not_same_bits(be, C, monkeypatch):
    """The norms' row kernels come in two forms (one pack a lane in flight, or four: backend.ROWS_BATCHED picks by
    rows, so the tests above run the batched ones): the same sums in the same order, the same bits."""
    from llmpy.backends.cuda import backend as B
    r = rng()
    N = 300
    x1, x2, dout, d0 = (dev(be, r.standard_normal((N, C))) for _ in range(4))
    w, b = dev(be, 1 + 0.1 * r.standard_normal(C)), dev(be, r.standard_normal(C))
    be.plan_workspace(_shapes(5, 60, C, C // 64, bias_widths=()))
    got = []
    for limit in (10**9, 0):  # every call batched, then none
        monkeypatch.setattr(B, "ROWS_BATCHED", limit)
        res, out, out2, out3, dinp, dinp2 = (poison(be, (N, C)) for _ in range(6))
        mean, rstd, rstd2 = (poison(be, N, np.float32) for _ in range(3))
        be.fused_residual_layernorm_forward(res, out, mean, rstd, x1, x2, w, b)
        be.layernorm_forward(out2, mean, rstd, res, w, b)
        be.copy_(dinp, d0)
        be.layernorm_backward(dinp, dev(be, np.zeros(C)), dev(be, np.zeros(C)), dout, res, w, mean, rstd)
        be.rmsnorm_forward(out3, rstd2, res, w, 1e-5)
        be.copy_(dinp2, d0)
        be.rmsnorm_backward(dinp2, dev(be, np.zeros(C)), dout, res, w, rstd2)
        got.append([be.to_numpy(a).view(np.uint8) for a in (res, out, out2, mean, rstd, dinp, out3, rstd2, dinp2)])
    for a, b_ in zip(*got):
        assert np.array_equal(a, b_)


@pytest.mark.parametrize("B,T,C", [(5, 60, 320), (150, 60, 1600), (7, 10, 768)])
def test_layernorm_backward_onepass_and_dinp_sums(be, B, T, C):
    """LayerNorm's backward in one pass (common.cuh norm_backward_onepass; test_layernorm_and_fused_residual ran it
    too) and the separate kernels (dinp kernel, then column sums) against NumPy. 320 channels: 40 packs a row, six
    row groups a block; 9000 rows: blocks of 64 rows, the last block short; 768: d12's width. Besides dinp, dw, db:
    the column sums of the updated dinp (dinp_sums) taken by matmul_backward's db_sums, as a first write and
    accumulating, and a stale handle refused. The one pass twice: the same bits."""
    r, N = rng(), B * T
    x, dout, d0 = (rounded(be, r.standard_normal((N, C))) for _ in range(3))
    w = rounded(be, 1 + 0.1 * r.standard_normal(C))
    mean = be.asarray(0.1 * r.standard_normal(N), np.float32)
    rstd = be.asarray(0.5 + r.random(N), np.float32)
    be.plan_workspace(_shapes(B, T, C, C // 64, bias_widths=()))
    lin = dev(be, 0.02 * r.standard_normal((C, C)))  # a product whose output gradient is the updated dinp
    rd, rdw, rdb = d0.copy(), np.zeros(C), np.zeros(C)
    Lr.layernorm_backward(rd, rdw, rdb, dout, x, w, host(be, mean), host(be, rstd))
    runs = []
    for onepass in (True, False, True):
        if not onepass:
            be._ln_onepass = lambda *a: None  # an instance attribute over the method: the separate kernels
        assert (be._ln_onepass(N, C, 2) is not None) == onepass
        dinp, dw, db = dev(be, d0), dev(be, np.zeros(C)), dev(be, np.zeros(C))
        sums = be.layernorm_backward(dinp, dw, db, dev(be, dout), dev(be, x), dev(be, w), mean, rstd, dinp_sums=True)
        bias = dev(be, np.full(C, 0.5))
        be.matmul_backward(None, None, bias, dinp, None, lin, db_sums=sums)  # accumulates: bias += sums
        fresh = poison(be, C)
        be.fresh_grads(fresh)  # counts as zero: the first write overwrites it (the NaNs must go)
        be.matmul_backward(None, None, fresh, dinp, None, lin, db_sums=sums)
        be.fresh = []
        check(be, dinp, rd)
        check(be, dw, rdw)
        check(be, db, rdb)
        stored = host(be, dinp)  # the sums are over the stored (rounded) dinp
        check(be, bias, 0.5 + stored.sum(0))
        check(be, fresh, stored.sum(0))
        runs.append([be.to_numpy(a).view(np.uint8) for a in (dinp, dw, db, bias, fresh)])
        with pytest.raises(ValueError, match="db_sums"):  # a handle a later call replaced
            be.layernorm_backward(dinp, dw, db, dev(be, dout), dev(be, x), dev(be, w), mean, rstd, dinp_sums=True)
            be.matmul_backward(None, None, bias, dinp, None, lin, db_sums=sums)
        if not onepass:
            del be._ln_onepass  # the one-pass kernel again
    for a, b_ in zip(runs[0], runs[2]):
        assert np.array_equal(a, b_)


@pytest.mark.parametrize("T,pos", [(16, 0), (16, 16), (1, 23)])
def test_rope(be, T, pos):
    """In place on q and k of a GQA qkv (NH=8, K=2, hs=64) with Llama 3.1's scaled frequencies (original_context 16
    puts all three bands in hs=64); v untouched. pos > 0 is decoding (T = 1) or a later window of the table."""
    r = rng()
    B, NH, K, hs, maxT = 2, 8, 2, 64, 32
    W, R = (NH + 2 * K) * hs, (NH + K) * hs
    table = Lr.rope_table(maxT, Lr.rope_frequencies(hs, 500000.0, factor=32.0, original_context=16))
    tab = be.asarray(table, np.float32)
    qkv = rounded(be, r.standard_normal((B, T, W)))
    d = dev(be, qkv)
    be.rope_forward(d, tab, NH, K, pos=pos)
    ref = qkv.copy()
    Lr.rope_forward(ref, table, NH, K, pos=pos)
    got = host(be, d)
    check(be, d[..., :R], ref[..., :R])
    assert np.array_equal(got[..., R:], qkv[..., R:]), "v must be left alone"
    # backward (positions 0..15; not T = 1, whose only position 0 is the identity): the transposed rotation
    g = rounded(be, r.standard_normal((B, 16, W)))
    dg = dev(be, g)
    be.rope_backward(dg, tab, NH, K)
    rg = g.copy()
    Lr.rope_backward(rg, table, NH, K)
    check(be, dg[..., :R], rg[..., :R])
    assert np.array_equal(host(be, dg)[..., R:], g[..., R:])
    with pytest.raises(ValueError):  # a table too short for these positions
        be.rope_forward(d, tab, NH, K, pos=maxT - T + 1)


def test_swiglu(be):
    r = rng()
    N, F = 200, 264  # F % 8 == 0 (16-byte packs in bf16) but not a multiple of the block
    x = rounded(be, r.standard_normal((N, 2 * F)) * 2)
    out = poison(be, (N, F))
    xd = dev(be, x)
    be.swiglu_forward(out, xd)
    ref = np.empty((N, F))
    Lr.swiglu_forward(ref, x)
    check(be, out, ref)
    dout = rounded(be, r.standard_normal((N, F)))
    dinp = poison(be, (N, 2 * F))
    be.swiglu_backward(dinp, xd, dev(be, dout))
    rdi = np.empty((N, 2 * F))
    Lr.swiglu_backward(rdi, x, dout)
    check(be, dinp[:, :F], rdi[:, :F])  # up and gate halves separately: a swapped half shows
    check(be, dinp[:, F:], rdi[:, F:])
    # redo (recompute fused into the backward): the forward's output bit for bit, and the same dinp
    dinp2, redo = poison(be, (N, 2 * F)), poison(be, (N, F))
    be.swiglu_backward(dinp2, xd, dev(be, dout), redo=redo)
    assert np.array_equal(host(be, redo), host(be, out))
    assert np.array_equal(host(be, dinp2), host(be, dinp))
    with pytest.raises(UserError, match="divisible"):
        be.swiglu_forward(poison(be, (4, 6)), dev(be, np.ones((4, 12))))


@pytest.mark.parametrize("gelu", [False, True])
def test_matmul(be, gelu):
    r = rng()
    M, K, OC = 192, 128, 384
    x, w, b = (rounded(be, r.standard_normal(s) * 0.5) for s in ((M, K), (OC, K), (OC,)))
    out, pre = poison(be, (M, OC)), poison(be, (M, OC))
    be.matmul_forward(out, dev(be, x), dev(be, w), dev(be, b), gelu_pre=pre if gelu else None)
    ref = np.empty((M, OC))
    Lr.matmul_forward(ref, x, w, b)
    if gelu:
        check(be, pre, ref)
        g = np.empty_like(ref)
        Lr.gelu_forward(g, ref)
        check(be, out, g)
    else:
        check(be, out, ref)
    # backward: dinp overwritten (times gelu'(pre) when given); dw, db accumulate
    dout = rounded(be, r.standard_normal((M, OC)))
    prex = rounded(be, r.standard_normal((M, K)))
    dw0, db0 = rounded(be, r.standard_normal((OC, K))), rounded(be, r.standard_normal(OC))
    dinp, dw, db = poison(be, (M, K)), dev(be, dw0), dev(be, db0)
    be.plan_workspace(_shapes(4, 48, K, 4, bias_widths=(OC,)))  # column-sum partials sized by this bias
    be.matmul_backward(dinp, dw, db, dev(be, dout), dev(be, x), dev(be, w), gelu_pre=dev(be, prex) if gelu else None)
    rdi, rdw, rdb = np.empty((M, K)), dw0.copy(), db0.copy()
    Lr.matmul_backward(rdi, rdw, rdb, dout, x, w)
    if gelu:
        Lr.gelu_backward(rdi, prex, rdi)
    check(be, dinp, rdi)
    check(be, dw, rdw)
    check(be, db, rdb)


def test_gelu_backward_with_bias_sums(be):
    """matmul_backward(gelu_pre=, gelu_db=): the GELU backward fused with the column sums of its result (the
    bias gradient of the product below) against NumPy, and bitwise against the two-kernel path (GELU backward,
    then the product below's own bias sum). Rows not a multiple of the 256-row chunks, 4 chunks and a tail."""
    r = rng()
    M, K, OC = 3 * 256 + 40, 136, 64
    x, w, dout = (rounded(be, r.standard_normal(s) * 0.5) for s in ((M, K), (OC, K), (M, OC)))
    prex = rounded(be, r.standard_normal((M, K)) * 2)
    db0 = rounded(be, r.standard_normal(K))
    be.plan_workspace(_shapes(4, 256, K, 4, bias_widths=(K, OC)))  # 1024 rows of partials
    dinp, gdb = poison(be, (M, K)), dev(be, db0)
    be.matmul_backward(dinp, dev(be, np.zeros((OC, K))), None, dev(be, dout), dev(be, x), dev(be, w),
                       gelu_pre=dev(be, prex), gelu_db=gdb)
    rdi, rdw = np.empty((M, K)), np.zeros((OC, K))
    Lr.matmul_backward(rdi, rdw, None, dout, x, w)
    Lr.gelu_backward(rdi, prex, rdi)
    check(be, dinp, rdi)
    check(be, gdb, db0 + rdi.sum(0))
    # the two-kernel path: the same dinp and the same bias sums, bit for bit
    dinp2, gdb2 = poison(be, (M, K)), dev(be, db0)
    be.matmul_backward(dinp2, dev(be, np.zeros((OC, K))), None, dev(be, dout), dev(be, x), dev(be, w),
                       gelu_pre=dev(be, prex))
    be.matmul_backward(None, dev(be, np.zeros((K, 8))), gdb2, dinp2, dev(be, np.zeros((M, 8))),
                       dev(be, np.zeros((K, 8))))
    assert np.array_equal(host(be, dinp), host(be, dinp2))
    assert np.array_equal(host(be, gdb), host(be, gdb2))
    # gelu_redo (recompute 1): inp = gelu(gelu_pre) written by the same kernel, gelu_forward's bits, before the
    # weight gradient reads it; dinp and the bias sums unchanged
    pred, dout_d, w_d = dev(be, prex), dev(be, dout), dev(be, w)
    dinp3, gdb3, g3, dw3 = poison(be, (M, K)), dev(be, db0), poison(be, (M, K)), dev(be, np.zeros((OC, K)))
    be.matmul_backward(dinp3, dw3, None, dout_d, g3, w_d, gelu_pre=pred, gelu_db=gdb3, gelu_redo=True)
    g_ref, dw_ref = poison(be, (M, K)), dev(be, np.zeros((OC, K)))
    be.gelu_forward(g_ref, pred)
    be.matmul_backward(None, dw_ref, None, dout_d, g_ref, w_d)
    assert np.array_equal(host(be, g3), host(be, g_ref))
    assert np.array_equal(host(be, dinp3), host(be, dinp))
    assert np.array_equal(host(be, gdb3), host(be, gdb))
    assert np.array_equal(host(be, dw3), host(be, dw_ref))
    g_np = np.empty((M, K))
    Lr.gelu_forward(g_np, prex)
    check(be, dw3, dout.T @ g_np)


@pytest.mark.parametrize("NH,K", [(4, 4), (8, 2)])
@pytest.mark.parametrize("impl", ["fallback", "cudnn"])
def test_attention(be, impl, NH, K):
    """Multi-head (K = NH, called as GPT-2 does, without kv_heads) and grouped-query attention (K < NH)."""
    from llmpy.backends.cuda.backend import CUDABackend
    if impl == "cudnn" and be.dtype_name != "bf16":
        pytest.skip("cuDNN flash attention is half precision only")
    b2 = CUDABackend(be.dtype_name, attention=impl)
    r = rng()
    B, T, hs = 2, 128, 64
    C, W = NH * hs, (NH + 2 * K) * hs
    kw = {} if K == NH else {"kv_heads": K}
    (shape, kind) = b2.attention_state(B, T, NH, K, hs)
    with pytest.raises(UserError, match="divide"):
        b2.attention_state(B, T, NH, 3, hs)
    b2.plan_workspace(_shapes(B, T, C, NH, kv_heads=K))
    assert type(b2._attention(B, T, NH, hs, K)).__name__.lower().startswith(impl[:5])
    qkv = rounded(b2, r.standard_normal((B, T, W)))
    out = poison(b2, (B, T, C))
    state = poison(b2, shape, np.float32 if kind == "stat" else None)
    b2.attention_forward(out, state, dev(b2, qkv), NH, **kw)
    ref, att = np.empty((B, T, C)), np.empty((B, NH, T, T))
    Lr.attention_forward(ref, att, qkv, NH, K)
    check(b2, out, ref)
    dout = rounded(b2, r.standard_normal((B, T, C)))
    dqkv = poison(b2, (B, T, W))
    b2.attention_backward(dqkv, dev(b2, dout), dev(b2, qkv), state, NH, out=out, **kw)
    rq = np.empty((B, T, W))
    Lr.attention_backward(rq, dout, qkv, att, NH, K)
    check(b2, dqkv, rq)
    for lo, hi in ((0, NH), (NH, NH + K), (NH + K, NH + 2 * K)):  # dq, dk, dv each (dk, dv: the group sums)
        check(b2, dqkv[..., lo * hs:hi * hs], rq[..., lo * hs:hi * hs])
    if impl == "cudnn":  # --fast-attention: cuDNN's non-deterministic backward, the same gradients within bf16
        b2.fast_attention = True
        d2 = poison(b2, (B, T, W))
        b2.attention_backward(d2, dev(b2, dout), dev(b2, qkv), state, NH, out=out, **kw)
        check(b2, d2, rq)
        assert b2._attention(B, T, NH, hs, K) is not b2.attn[(B, T, NH, K, hs, False)], "a plan of its own"


@pytest.mark.parametrize("NH,K", [(4, 4), (8, 2)])
def test_attention_decode(be, NH, K):
    """Decoding one position at a time into a poisoned KV cache (B, K, maxT, hs), against the NumPy step: a read
    past pos, a write to the wrong slot, a wrong head/group/sequence offset or a read of the new row before it is
    written shows as NaN or a mismatch."""
    r = rng()
    B, hs, maxT = 2, 64, 40
    C, W = NH * hs, (NH + 2 * K) * hs
    kw = {} if K == NH else {"kv_heads": K}
    kc, vc = poison(be, (B, K, maxT, hs)), poison(be, (B, K, maxT, hs))
    rk, rv = np.full((B, K, maxT, hs), np.nan), np.full((B, K, maxT, hs), np.nan)
    for pos in range(maxT):  # from an empty cache to its last slot
        qkv = rounded(be, r.standard_normal((B, 1, W)))
        out = poison(be, (B, 1, C))
        be.attention_decode(out, dev(be, qkv), kc, vc, pos, NH, **kw)
        ref = np.empty((B, 1, C))
        Lr.attention_decode(ref, qkv, rk, rv, pos, NH, K)
        check(be, out, ref)
        if pos == 12:
            k = host(be, kc)
            assert np.array_equal(k[:, :, :pos + 1], rk[:, :, :pos + 1]), "k written to the wrong slot"
            assert np.isnan(k[:, :, pos + 1:]).all(), "cache written past pos"
    assert np.array_equal(host(be, kc), rk) and np.array_equal(host(be, vc), rv)
    with pytest.raises(ValueError):
        be.attention_decode(out, dev(be, qkv), kc, vc, maxT, NH, **kw)


def test_fused_classifier(be):
    r = rng()
    N, V = 64, 1001  # the last 16-byte pack of a row is partly vocabulary, partly padding
    Vp = 1024
    shift = np.where(np.arange(N)[:, None] % 7 == 0, 60.0, 0.0)  # rows far above the first packs' running max
    logits = rounded(be, r.standard_normal((N, Vp)) * 3 + shift)
    t = r.integers(0, V, N).astype(np.int32)
    dl = dev(be, logits)
    losses = poison(be, N, np.float32)
    be.fused_classifier(losses, dl, be.asarray(t), V, dloss=1.0 / N)
    rl, d = np.empty(N), logits[:, :V].copy()
    Lr.fused_classifier(rl, d, t, dloss=1.0 / N)
    check(be, losses, rl, 1e-5)
    got = host(be, dl)
    assert np.all(got[:, V:] == 0), "the padded columns must get no gradient"
    check(be, dl[:, :V], d)
    # a NaN logit makes its row's loss NaN (a diverged step must show), wherever it is in the row
    bad = logits.copy()
    bad[3, 7], bad[5, V - 1], bad[6, :V] = np.nan, np.nan, np.nan
    lb = poison(be, N, np.float32)
    be.fused_classifier(lb, dev(be, bad), be.asarray(t), V)
    got = host(be, lb)
    assert np.isnan(got[[3, 5, 6]]).all() and np.isfinite(np.delete(got, [3, 5, 6])).all()


def test_adamw_and_norm(be):
    r = rng()
    be.plan_workspace(_shapes(2, 32, 64, 2))  # the norm's partial sums live in the workspace
    n = 10_000
    g = rounded(be, r.standard_normal(n) * 0.1)
    p = r.standard_normal(n).astype(np.float32)
    m, v = (r.standard_normal(n) * 0.01).astype(np.float32), (r.random(n) * 1e-3).astype(np.float32)
    gd = dev(be, g)
    norm, sumsq = poison(be, 1, np.float32), poison(be, 1, np.float32)
    be.grad_sumsq(sumsq, gd)
    be.norm_from_sumsq(norm, sumsq, be.asarray(np.array([np.nan], np.float32)))
    assert np.isnan(host(be, norm)[0]), "a non-finite loss must make the norm NaN (no update)"
    be.norm_from_sumsq(norm, sumsq, be.asarray(np.array([2.5], np.float32)))
    ref_norm = np.sqrt((g.astype(np.float64) ** 2).sum())
    check(be, norm, [ref_norm], 1e-5)
    lr, b1, b2, eps, wd, t, clip = 1e-2, 0.9, 0.95, 1e-8, 0.1, 7, 0.5 * ref_norm  # clipping is on
    seed = np.array([12345], np.uint32).view(np.float32)[0]
    hp = be.asarray(np.array([lr, b1, b2, eps, 1 / (1 - b1 ** t), 1 / (1 - b2 ** t), clip, seed], np.float32))
    md, vd = be.asarray(m), be.asarray(v)
    master = be.asarray(p) if be.dtype_name == "bf16" else None
    pd = dev(be, p)
    be.adamw(pd, master, gd, md, vd, hp, norm, wd, 0)
    s = clip / ref_norm
    gm = g * s
    rm = b1 * m + (1 - b1) * gm
    rv = b2 * v + (1 - b2) * gm * gm
    rp = p - lr * ((rm / (1 - b1 ** t)) / (np.sqrt(rv / (1 - b2 ** t)) + eps) + wd * p)
    check(be, md, rm, 1e-5)
    check(be, vd, rv, 1e-5)
    if master is not None:
        check(be, master, rp, 1e-6)
        # stochastic rounding: each bf16 weight is one of the two neighbours of the fp32 value, unbiased
        got = host(be, pd)
        assert np.all(np.abs(got - rp) <= np.abs(rp) * 2 ** -7 + 1e-30)
        assert abs(np.mean(got - rp)) < 1e-4 * np.mean(np.abs(rp))
    else:
        check(be, pd, rp, 1e-6)
    # a non-finite norm skips the update
    before = host(be, md)
    be.xp.cuda.runtime.memset(norm.data.ptr, 0xFF, norm.nbytes)
    be.adamw(pd, master, gd, md, vd, hp, norm, wd, 0)
    assert np.array_equal(host(be, md), before)


def test_adamw_bf16_moments_and_vector_paths(be):
    """bf16 moments (stochastic rounding): the weights get exactly the update of fp32 moments holding the same
    values, each moment is one of the two bf16 neighbours of its fp32 value (unbiased on average); the 16-byte
    path and the element-wise one (unaligned views) give the same bits; the norm's vector loads and tail."""
    if be.dtype_name != "bf16":
        pytest.skip("bf16 moments need a bf16 backend")
    import ml_dtypes
    r = rng()
    be.plan_workspace(_shapes(2, 32, 64, 2))
    bf = be.param_dtype
    for n in (5, 8, 10_003, 1 << 20):
        g = r.standard_normal(n) * 0.1
        gd = dev(be, g)
        norm, sumsq = poison(be, 1, np.float32), poison(be, 1, np.float32)
        be.grad_sumsq(sumsq, gd)
        ref = (host(be, gd) ** 2).sum()
        assert host(be, sumsq)[0] == pytest.approx(ref, rel=1e-5), n
    n = 10_003
    g0 = (r.standard_normal(n) * 0.1).astype(ml_dtypes.bfloat16)
    p0 = r.standard_normal(n).astype(ml_dtypes.bfloat16)
    m0 = (r.standard_normal(n) * 0.01).astype(ml_dtypes.bfloat16)
    v0 = (r.random(n) * 1e-3).astype(ml_dtypes.bfloat16)
    norm = be.asarray(np.array([1.0], np.float32))
    lr, b1, b2, eps, wd, t = 1e-2, 0.9, 0.95, 1e-8, 0.1, 7
    seed = np.array([4242], np.uint32).view(np.float32)[0]
    hp = be.asarray(np.array([lr, b1, b2, eps, 1 / (1 - b1 ** t), 1 / (1 - b2 ** t), 0.0, seed], np.float32))

    def step(moments, shift, offset=96):
        """one update; shift 1: every array is a view one element into its buffer (unaligned: no vector loads)"""
        dt = np.float32 if moments == "fp32" else bf
        bufs = [be.xp.zeros(n + shift, dtype=d) for d in (bf, bf, dt, dt)]
        for b, a in zip(bufs, (p0, g0, m0, v0)):
            b[shift:] = be.asarray(np.asarray(a, np.float32).astype(b.dtype))
        p, g, m, v = (b[shift:] for b in bufs)
        be.adamw(p, None, g, m, v, hp, norm, wd, offset)
        return [np.asarray(be.to_numpy(x)).astype(np.float32) for x in (p, m, v)]

    p32, m32, v32 = step("fp32", 0)
    p16, m16, v16 = step("bf16", 0)
    assert np.array_equal(p16, p32), "the weights must not depend on how the moments are stored"
    for got, exact in ((m16, m32), (v16, v32)):
        lo = exact.astype(ml_dtypes.bfloat16).astype(np.float32)  # nearest; the other neighbour is one ulp away
        ulp = np.abs(exact) * 2.0 ** -7 + 1e-30
        assert np.all(np.abs(got - exact) <= ulp), "a bf16 moment must be a neighbour of its fp32 value"
        assert np.mean(got != lo) > 0.05, "stochastic rounding must sometimes round away from the nearest"
        assert abs(np.mean(got - exact)) < 1e-3 * np.mean(np.abs(exact)), "stochastic rounding must be unbiased"
    assert np.all(v16 >= 0)
    for moments in ("fp32", "bf16"):
        a, b = step(moments, 0), step(moments, 1)
        assert all(np.array_equal(x, y) for x, y in zip(a, b)), f"{moments}: vector and element paths differ"
    assert not np.array_equal(step("bf16", 0, offset=0)[1], m16), "the rounding must depend on the global index"


def test_loss_accumulate_and_gelu(be):
    r = rng()
    losses = r.random(5000).astype(np.float32)
    acc = be.asarray(np.array([1.5], np.float32))
    be.loss_accumulate(acc, be.asarray(losses), 0.25)
    assert host(be, acc)[0] == pytest.approx(1.5 + 0.25 * losses.astype(np.float64).sum(), rel=1e-6)
    for n in (10_000, 10_003, 5):  # 16-byte packs, and a tail of single elements
        x = rounded(be, r.standard_normal(n) * 3)
        out = poison(be, x.shape)
        be.gelu_forward(out, dev(be, x))
        ref = np.empty_like(x)
        Lr.gelu_forward(ref, x)
        check(be, out, ref)
        assert math.isfinite(float(host(be, out).sum()))


def test_side_stream_returns_to_the_backend_stream(be):
    """Work done `on` the side stream must leave the backend's own stream current afterwards (CuPy's `with
    stream:` rewinds to the null stream instead), so later ops stay ordered before the reads on be.stream."""
    cp = be.xp
    side = be.side_stream()
    assert cp.cuda.get_current_stream() == be.stream, "an earlier op left another stream current"
    with be.on(side):
        assert cp.cuda.get_current_stream() == side
        with be.on(side):  # nested use still returns to the backend stream
            pass
    assert cp.cuda.get_current_stream() == be.stream
    # reading a strided view back must not change the current stream either (CuPy's get() uses `with`)
    m = be.asarray(np.arange(12, dtype=np.float32).reshape(3, 4))
    assert np.array_equal(be.to_numpy(m[:, 1]), [1, 5, 9])
    assert cp.cuda.get_current_stream() == be.stream
    # ordering: a big op then a small readback on be.stream; the readback must see the op's result
    x = be.zeros(1 << 24, np.float32)
    ev = be.event()
    with be.on(side):
        be.fill_zero(x)
        ev.record(side)
    be.stream.wait_event(ev)
    x += 1.0  # CuPy op on the current stream, which must be be.stream
    got = be.async_read(x[-1:]).result()[0]
    assert got[0] == 1.0


# ---- the MatMul-free LM: BitLinear, MLGRU, lower bounds --------------------------------------------------------

def _ties_cleared(be, r, x, gamma, eps, keep=()):
    """x (M, K) with entries re-drawn (at their row's scale) wherever the float64 reference puts y s_x within 1e-3 of
    a rounding boundary k + 1/2, so the device's fp32 arithmetic cannot flip a q_x: its q_x must then equal the
    reference's exactly. Rows in keep are left alone."""
    x = x.copy()
    for _ in range(100):
        y = x * (1 / np.sqrt((x * x).mean(-1) + eps))[:, None] * gamma
        v = y * 127 / np.maximum(np.abs(y).max(-1, keepdims=True), 1e-5)
        near = np.abs(np.abs(v) % 1 - 0.5) < 1e-3
        near[list(keep)] = False
        if not near.any():
            return x
        scale = np.broadcast_to(np.sqrt((x * x).mean(-1, keepdims=True)), x.shape)[near]
        x[near] = rounded(be, r.standard_normal(int(near.sum())) * scale)
    raise AssertionError("could not draw activations clear of rounding ties")


def _weight_ties_cleared(be, r, w):
    """w re-drawn wherever |w s_w| lies within 1e-3 of 1/2, the one rounding boundary inside the clamp to [-1, 1]."""
    w = w.copy()
    for _ in range(100):
        near = np.abs(np.abs(w) / max(np.abs(w).mean(), 1e-5) - 0.5) < 1e-3
        if not near.any():
            return w
        w[near] = rounded(be, r.standard_normal(int(near.sum())) * np.abs(w).mean())
    raise AssertionError("could not draw weights clear of rounding ties")


def _bitlinear_quant_ref(x, w, gamma, eps, w_rows=None):
    """The reference's (q_x, s_x (M,), q_w, s_w) of layers/bitlinear.py."""
    rstd = 1 / np.sqrt((x * x).mean(-1) + eps)
    qx, sx = Lr.quantize_activations(x * rstd[:, None] * gamma)
    qw, sw = Lr.quantize_weight(w, w_rows)
    return qx, sx[:, 0], qw, sw


def _check_quantized(be, M, N, K, x, w, gamma, eps, w_rows=None):
    qx, sx, qw, sw = be.mmfree.quantized(M, N, K)
    rqx, rsx, rqw, rsw = _bitlinear_quant_ref(x, w, gamma, eps, w_rows)
    qx, qw = host(be, qx), host(be, qw)
    assert np.array_equal(qx, rqx), f"q_x differs at {np.argwhere(qx != rqx)[:5].tolist()}"
    assert np.array_equal(qw, rqw), f"q_w differs at {np.argwhere(qw != rqw)[:5].tolist()}"
    check(be, sx, rsx, 1e-6)
    check(be, sw, [rsw], 1e-6)


@pytest.mark.parametrize("accumulate", [False, True], ids=["plain", "accumulate"])
def test_tuned_gemm(be, accumulate):
    """--tune-gemm: timing the candidates on the real operands leaves the product what it would be (an accumulating
    product's output is restored before the chosen algorithm runs once); a second Gemm given the first's pins
    replays its algorithm bitwise; pins from another cuBLASLt or GPU are refused."""
    from llmpy.backends.cuda.gemm import Gemm
    M, N, K = 512, 768, 1024
    r = rng()
    x, y, o = r.standard_normal((M, K)), r.standard_normal((N, K)), r.standard_normal((M, N))
    ref = dev(be, o)  # the heuristic's first algorithm on the same operands
    be.gemm.mm(ref, dev(be, x), dev(be, y), M, N, K, transy=True, accumulate=accumulate)
    ref = host(be, ref)
    tuned, replay = Gemm(be.xp, be.dtype_name), Gemm(be.xp, be.dtype_name)
    tuned.tune = True
    outs = []
    for g in (tuned, replay):
        if g is replay:
            g.load_pins(tuned.export_pins())
        out = dev(be, o)
        g.mm(out, dev(be, x), dev(be, y), M, N, K, transy=True, accumulate=accumulate)
        outs.append(host(be, out))
    assert len(tuned.tuned) == 1 and tuned.tuned[0][1] > 1, "the heuristic offered one algorithm: nothing was timed"
    assert np.abs(outs[0] - ref).max() < TOL[be.dtype_name] * np.abs(ref).max(), np.abs(outs[0] - ref).max()
    assert np.array_equal(outs[0], outs[1]), "replayed pins must run the same kernel"
    with pytest.raises(UserError, match="other kernels"):
        Gemm(be.xp, be.dtype_name).load_pins({**tuned.export_pins(), "cublaslt": 1})


@pytest.mark.parametrize("M,N,K", [(300, 192, 256), (1, 64, 2056), (5, 2816, 1024)])
def test_int8_gemm_is_exact(be, M, N, K):
    """BitLinear's forward product: cuBLASLt int8 x int8 -> int32 (out = x y^T) equals the integer product, over
    the whole int8 range (sums past 2^24: int32, not fp32, accumulation)."""
    r = rng()
    x, y = (r.integers(-128, 128, s, dtype=np.int8) for s in ((M, K), (N, K)))
    out = be.xp.full((M, N), -1, dtype=np.int32)
    be.gemm.mm_int8(out, be.xp.asarray(x), be.xp.asarray(y), M, N, K)
    ref = x.astype(np.int64) @ y.astype(np.int64).T
    got = be.to_numpy(out)
    assert np.array_equal(got, ref), f"differs at {np.argwhere(got != ref)[:5].tolist()}"


def test_bitlinear(be):
    """Forward and backward against layers/bitlinear.py. Row 0 is zeros, row 1 so small that max|y| < 1e-5 (the
    activation scale's floor); the rest are drawn clear of rounding ties, so the device's q_x and q_w must equal the
    reference's exactly and the forward is exact up to its one rescale."""
    r = rng()
    M, K, N, eps = 300, 256, 192, 1e-6  # 300 rows: two chunks of dgamma's partial sums, the last one short
    gamma = rounded(be, 1 + 0.3 * r.standard_normal(K))
    x = rounded(be, r.standard_normal((M, K)))
    x[0] = 0
    x[1] = rounded(be, 1e-9 * r.standard_normal(K))
    x = _ties_cleared(be, r, x, gamma, eps)
    w = _weight_ties_cleared(be, r, rounded(be, 0.05 * r.standard_normal((N, K))))
    out, rstd = poison(be, (M, N)), poison(be, M, np.float32)
    xd, wd, gd = dev(be, x), dev(be, w), dev(be, gamma)
    be.bitlinear_forward(out, rstd, xd, wd, gd, eps)
    ref, rr = np.empty((M, N)), np.empty(M)
    Lr.bitlinear_forward(ref, rr, x, w, gamma, eps)
    assert np.abs(x[1] * rr[1] * gamma).max() < 1e-5, "row 1 must sit on the 1e-5 floor"
    _check_quantized(be, M, N, K, x, w, gamma, eps)
    check(be, rstd, rr, 1e-5)
    got = host(be, out)
    assert np.all(got[0] == 0), "a row of zeros must give zeros"
    check(be, out[1:2], ref[1:2])  # on the floor: its outputs are ~1e-6, compared on their own
    check(be, out[2:], ref[2:])
    # backward: dinp, dw, dgamma accumulate (small starting values: the gradients dominate); the device's rstd
    dout = rounded(be, r.standard_normal((M, N)))
    d0, dw0, dg0 = (rounded(be, 0.1 * r.standard_normal(s)) for s in ((M, K), (N, K), K))
    dinp, dw, dg = dev(be, d0), dev(be, dw0), dev(be, dg0)
    be.bitlinear_backward(dinp, dw, dg, dev(be, dout), xd, wd, gd, rstd)
    rd, rdw, rdg = d0.copy(), dw0.copy(), dg0.copy()
    Lr.bitlinear_backward(rd, rdw, rdg, dout, x, w, gamma, host(be, rstd))
    check(be, dinp[:2], rd[:2])  # rstd = 1/sqrt(eps) in rows 0 and 1: gradients 1000x the others', checked apart
    check(be, dinp[2:], rd[2:])
    check(be, dw, rdw)
    check(be, dg, rdg)
    with pytest.raises(ValueError, match="131072"):  # the fp32 sums would no longer be exact
        Kb = 1 << 17
        be.bitlinear_forward(poison(be, (1, 8)), poison(be, 1, np.float32), dev(be, np.ones((1, Kb))),
                             dev(be, np.ones((8, Kb))), dev(be, np.ones(Kb)), eps)


def _tie_row(r, K):
    """x (K,) = n 2^12 with integers |n| <= 254 (exact in bf16), n = 254 once, odd n (ties) at a quarter of the
    places, sum n^2 = 4^11: with gamma = 1/2, mean x^2 = 2^38 swallows eps in fp32 and float64 alike, so rstd = 2^-19,
    y = n 2^-8, s_x = 127 / (254 2^-8) = 2^7 and y s_x = n / 2 are exact on both sides."""
    n = np.zeros(K)
    n[0] = 254
    odd = r.integers(-127, 127, K // 4) * 2 + 1
    odd[:4] = (1, -1, 5, -5)  # 0.5 -> 1, -0.5 -> -1, 2.5 -> 3, -2.5 -> -3 (half to even: 0, 0, 2, -2)
    n[1:1 + K // 4] = odd
    rest, i = 4 ** 11 - int((n ** 2).sum()), 1 + K // 4
    while rest > 0:  # fill up to the power of four with the largest squares that fit
        v = min(254, math.isqrt(rest))
        n[i] = v * r.choice((-1, 1))
        rest, i = rest - v * v, i + 1
    return r.permutation(n) * 2.0 ** 12


def _tie_weights(r, N, K):
    """|w| = 2^-5 and 3 2^-5, half each, random signs: mean|w| = 2^-4 exactly, so s_w = 16 and w s_w = +-1/2 (to even:
    0) or +-3/2 (to 2, clamped to 1)."""
    mag = np.where(r.permutation(N * K) % 2 == 0, 1.0, 3.0) * 2.0 ** -5
    return (mag * r.choice((-1.0, 1.0), N * K)).reshape(N, K)


@pytest.mark.parametrize("case", ["ties", "weight_floor", "padded_rows"])
def test_bitlinear_rounding_edges(be, case):
    """Exact ties of both roundings (activations half away from zero, weights half to even), with every step exact in
    fp32 and float64; the weight scale's floor (mean|W| < 1e-5); an LM head's zero padding rows left out of the
    weight scale's mean (w_rows). Rows: 4 of ties, zeros, one on the activation floor, 2 random."""
    r = rng()
    M, K, N, eps = 8, 256, 128, 1e-6
    gamma = np.full(K, 0.5)
    x = np.stack([_tie_row(r, K) for _ in range(4)] + [np.zeros(K), 1e-9 * r.standard_normal(K)]
                 + [r.standard_normal(K) for _ in range(2)])
    x = _ties_cleared(be, r, rounded(be, x), gamma, eps, keep=range(5))
    w_rows = None
    if case == "ties":
        w = _tie_weights(r, N, K)
    elif case == "weight_floor":
        w = _weight_ties_cleared(be, r, rounded(be, 8e-6 * r.standard_normal((N, K))))
        assert np.abs(w).mean() < 1e-5
    else:
        w_rows = N - 32
        w = np.zeros((N, K))
        w[:w_rows] = _tie_weights(r, w_rows, K)
    assert np.array_equal(rounded(be, w), w) and np.array_equal(rounded(be, x[:5]), x[:5])
    out, rstd = poison(be, (M, N)), poison(be, M, np.float32)
    be.bitlinear_forward(out, rstd, dev(be, x), dev(be, w), dev(be, gamma), eps, w_rows)
    ref, rr = np.empty((M, N)), np.empty(M)
    Lr.bitlinear_forward(ref, rr, x, w, gamma, eps, w_rows)
    _check_quantized(be, M, N, K, x, w, gamma, eps, w_rows)
    qw = host(be, be.mmfree.quantized(M, N, K)[2])
    if case != "weight_floor":
        assert host(be, be.mmfree.quantized(M, N, K)[3])[0] == 16.0
        assert np.array_equal(qw[np.abs(w) == 2.0 ** -5], np.zeros(int((np.abs(w) == 2.0 ** -5).sum())))
    assert np.all(host(be, rstd)[:4] == 2.0 ** -19)
    got = host(be, out)
    assert np.all(got[4] == 0)
    for rows in (slice(0, 4), slice(5, 6), slice(6, 8)):
        check(be, out[rows], ref[rows], 1e-6 if be.dtype_name == "fp32" else None)


@pytest.mark.parametrize("packing", ["base3", "2bit"])
@pytest.mark.parametrize("K", [56, 2048, 5632])
def test_bitlinear_packed_decode(be, packing, K, monkeypatch):
    """The one-launch decode kernel (up to 8 rows) against two other paths: the same rows inside a 16-row call
    (bitlinear_quantize, the codes unpacked, the GEMM, the rescale), bit for bit in out, rstd and s_x; and
    layers/bitlinear.py's packed forward (activations clear of rounding ties: the same q_x). K: the 1.3B model's d
    and I (8 rows of it stage 45 KB of int8 q_x, near the 48 KB limit), neither a multiple of 5 (base 3's last code
    byte is part padding); 56: fewer 16-byte packs to stage than the block has threads. N = 136: 17 blocks of 8
    outputs. Row 1 is zeros (s_x on its 1e-5 floor)."""
    from llmpy.backends.cuda import mmfree as cuda_mmfree
    from llmpy.formats.ternary import pack
    monkeypatch.setattr(cuda_mmfree, "_DECODE_ROWS", 8)  # the kernel's own limit, whatever rows the models route to it
    r = rng()
    Mb, N, eps = 16, 136, 1e-6
    gamma = rounded(be, 1 + 0.3 * r.standard_normal(K))
    x = rounded(be, r.standard_normal((Mb, K)) * 10.0 ** r.integers(-2, 3, (Mb, 1)))  # rows at several scales
    x[1] = 0
    x = _ties_cleared(be, r, x, gamma, eps)
    q = r.integers(-1, 2, (N, K)).astype(np.int8)
    codes, scale = pack(q, packing), np.float32(1 / 0.037)
    assert np.array_equal(Lr.unpack_codes(codes, K, packing), q)
    cd, xd, gd = be.asarray(codes), dev(be, x), dev(be, gamma)
    scratch = be.mmfree.scratch

    def poisoned_scratch(name, n, dtype):
        a = scratch.get(name, n, dtype)
        be.xp.cuda.runtime.memset(a.data.ptr, 0xFF, a.nbytes)
        be.xp.cuda.Device().synchronize()
        return a

    big, big_r = poison(be, (Mb, N)), poison(be, Mb, np.float32)
    big_sx = poisoned_scratch("bl_sx", Mb, np.float32)
    big_qw = poisoned_scratch("bl_qw", N * K, be.act_dtype).view(np.int8)[:N * K]
    be.bitlinear_packed_forward(big, big_r, xd, cd, scale, K, packing, gd, eps)  # 16 rows: unpack + GEMM
    assert np.array_equal(be.to_numpy(big_qw).reshape(N, K), q), "bitlinear_unpack's int8 weights differ"
    big, big_r, big_sx = host(be, big), host(be, big_r), host(be, big_sx)
    assert not np.isnan(big).any() and not np.isnan(big_sx).any()
    ref, rr = np.empty((Mb, N)), np.empty(Mb)
    Lr.bitlinear_packed_forward(ref, rr, x, codes, scale, K, packing, gamma, eps)
    y = x * rr[:, None] * gamma
    rsx = 127 / np.maximum(np.abs(y).max(-1), 1e-5)
    for M in (1, 3, 8):
        qx = poisoned_scratch("bl_x", M * K, be.act_dtype)
        sx = poisoned_scratch("bl_sx", M, np.float32)
        out, rstd = poison(be, (M, N)), poison(be, M, np.float32)
        be.bitlinear_packed_forward(out, rstd, xd[:M], cd, scale, K, packing, gd, eps)
        assert np.isnan(host(be, qx)).all(), f"{M} rows: q_x went through the scratch (the two-kernel path ran)"
        got = host(be, out)
        assert np.array_equal(got, big[:M]), f"{M} rows: out differs at {np.argwhere(got != big[:M])[:5].tolist()}"
        assert np.array_equal(host(be, rstd), big_r[:M]), f"{M} rows: rstd differs"
        assert np.array_equal(host(be, sx), big_sx[:M]), f"{M} rows: s_x differs"
        assert np.all(got[1:2] == 0)
        check(be, out, ref[:M])
        check(be, rstd, rr[:M], 1e-5)
        check(be, sx, rsx[:M], 1e-6)
    # three weights of one input in one launch (the MLGRU's i, f, g): each output, rstd and s_x as its own call's
    q2 = [r.integers(-1, 2, (N, K)).astype(np.int8) for _ in range(2)]
    codes3 = [cd] + [be.asarray(pack(w, packing)) for w in q2]
    scales, gammas = [scale, np.float32(1 / 0.05), np.float32(1 / 0.021)], [gd, dev(be, gamma[::-1]), dev(be, gamma ** 2)]
    for M in (1, 3, 8):
        singles = []
        for c, sc, g in zip(codes3, scales, gammas):
            o, rs = poison(be, (M, N)), poison(be, M, np.float32)
            be.bitlinear_packed_forward(o, rs, xd[:M], c, sc, K, packing, g, eps)
            singles.append((host(be, o), host(be, rs), host(be, scratch.get("bl_sx", M, np.float32))))
        outs, rstd = [poison(be, (M, N)) for _ in range(3)], poison(be, M, np.float32)
        qx = poisoned_scratch("bl_x", M * K, be.act_dtype)
        sx3 = poisoned_scratch("bl_sx", 3 * M, np.float32)
        be.bitlinear_packed_forward3(outs, rstd, xd[:M], codes3, scales, K, packing, gammas, eps)
        assert np.isnan(host(be, qx)).all(), f"{M} rows: three-weight call went through the scratch"
        for i, (o, rs, sxi) in enumerate(singles):
            assert np.array_equal(host(be, outs[i]), o), f"{M} rows, weight {i}: out differs"
            assert np.array_equal(host(be, sx3)[i * M:(i + 1) * M], sxi), f"{M} rows, weight {i}: s_x differs"
            assert np.array_equal(host(be, rstd), rs)
    # a GLU's gate/up projection straight to its SwiGLU (2F = 272 rows): the product then swiglu_forward, bit for bit
    cs = be.asarray(pack(r.integers(-1, 2, (272, K)).astype(np.int8), packing))
    xb = dev(be, x)  # 16 rows: the last M = 16 takes the product-then-SwiGLU path
    for M in (1, 3, 8, 16):
        fc, fr = poison(be, (M, 272)), poison(be, M, np.float32)
        be.bitlinear_packed_forward(fc, fr, xb[:M], cs, scale, K, packing, gd, eps)
        want = be.zeros(M * 136, be.act_dtype).reshape(M, 136)
        be.swiglu_forward(want, fc)
        scratch_fc = poisoned_scratch("bl_fc", M * 272, be.act_dtype)
        got, gr = poison(be, (M, 136)), poison(be, M, np.float32)
        be.bitlinear_packed_swiglu_forward(got, gr, xb[:M], cs, scale, K, packing, gd, eps)
        assert np.isnan(host(be, scratch_fc)).all() == (M <= 8), f"{M} rows: the wrong path ran"
        assert np.array_equal(host(be, got), host(be, want)), f"{M} rows: the SwiGLU of the product differs"
        assert np.array_equal(host(be, gr), host(be, fr))


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("T", [1, 37, 1000])
def test_mlgru(be, with_state, T):
    """Forward (from zeros, or from a decoder's fp32 state h0) and backward (training: from zeros). T = 1 is one
    chunk of the scan (decoding), 37 four chunks with a short last one, 1000 thirty-two chunks."""
    r = rng()
    B, d, eps = 2, 264, 1e-6  # d: 8 full warps of channels and a part one
    ai, af, ag = (rounded(be, 1.5 * r.standard_normal((B, T, d))) for _ in range(3))
    lam = (0.9 * r.random(d)).astype(np.float32)
    gamma = rounded(be, 1 + 0.1 * r.standard_normal(d))
    h0 = r.standard_normal((B, d)).astype(np.float32) if with_state else None
    o, h, rstd = poison(be, (B, T, d)), poison(be, (B, T, d), np.float32), poison(be, (B, T), np.float32)
    aid, afd, agd, lamd, gd = dev(be, ai), dev(be, af), dev(be, ag), be.asarray(lam), dev(be, gamma)
    be.mlgru_forward(o, h, rstd, aid, afd, agd, lamd, gd, None if h0 is None else be.asarray(h0), eps)
    ro, rh, rr = np.empty((B, T, d)), np.empty((B, T, d)), np.empty((B, T))
    Lr.mlgru_forward(ro, rh, rr, ai, af, ag, lam.astype(np.float64), gamma,
                     h0=None if h0 is None else h0.astype(np.float64), eps=eps)
    check(be, h, rh, 1e-5)
    check(be, rstd, rr, 1e-5)
    check(be, o, ro)
    check(be, h[:, :1], rh[:, :1], 1e-5)  # the first step alone: h0 used (or zeros)
    if T > 1:  # one step (decoding: the scan kernel sums the gate's rstd itself) = the first step of T, bit for bit
        o1, h1, r1 = poison(be, (B, 1, d)), poison(be, (B, 1, d), np.float32), poison(be, (B, 1), np.float32)
        first = [be.xp.ascontiguousarray(a[:, :1]) for a in (aid, afd, agd)]
        be.mlgru_forward(o1, h1, r1, *first, lamd, gd, None if h0 is None else be.asarray(h0), eps)
        for a, b, what in ((o1, o[:, :1], "o"), (h1, h[:, :1], "h"), (r1, rstd[:, :1], "rstd")):
            assert np.array_equal(host(be, a), host(be, b)), f"one step: {what} differs from the first of {T}"
    if with_state:
        return
    do = rounded(be, r.standard_normal((B, T, d)))
    dai, daf, dag = (poison(be, (B, T, d)) for _ in range(3))
    dlam0 = (0.1 * r.standard_normal(d)).astype(np.float32)
    dg0 = rounded(be, 0.1 * r.standard_normal(d))
    dlam, dg = be.asarray(dlam0), dev(be, dg0)
    be.mlgru_backward(dai, daf, dag, dlam, dg, dev(be, do), aid, afd, agd, lamd, gd, h, rstd)
    rai, raf, rag = (np.empty((B, T, d)) for _ in range(3))
    rlam, rg = dlam0.astype(np.float64), dg0.copy()
    Lr.mlgru_backward(rai, raf, rag, rlam, rg, do, ai, af, ag, lam.astype(np.float64), gamma, host(be, h),
                      host(be, rstd))
    check(be, dai, rai)
    check(be, daf, raf)
    check(be, dag, rag)
    check(be, dlam, rlam, 1e-5)  # fp32 in both modes
    check(be, dg, rg)


def test_lower_bounds(be):
    r = rng()
    L, d = 6, 256
    P = rounded(be, r.standard_normal((L, d)))
    Pd = dev(be, P)
    lam = poison(be, (L, d), np.float32)
    be.lower_bounds_forward(lam, Pd)
    ref = np.empty((L, d))
    Lr.lower_bounds_forward(ref, P)
    assert np.all(host(be, lam)[0] == 0)
    check(be, lam[1:], ref[1:], 1e-5)  # fp32 in both modes
    dlam = r.standard_normal((L, d)).astype(np.float32)
    dP0 = rounded(be, 0.1 * r.standard_normal((L, d)))
    dP = dev(be, dP0)
    be.lower_bounds_backward(dP, be.asarray(dlam), Pd)
    rdP = dP0.copy()
    Lr.lower_bounds_backward(rdP, dlam.astype(np.float64), P)
    check(be, dP, rdP)


def test_mmfree_ops_replay_in_a_cuda_graph(be):
    """The trainer runs its first step eagerly, then replays a captured graph: these ops must allocate nothing while
    capturing (the eager run sized their scratch), replay to bit-identical results (fixed-order reductions, exact
    products), and refuse a shape larger than any seen instead of allocating."""
    r = rng()
    M, K, N, B, T, d = 64, 128, 96, 2, 8, 128
    x, w, gamma, dout = (rounded(be, r.standard_normal(s)) for s in ((M, K), (N, K), K, (M, N)))
    xd, wd, gd, doutd = dev(be, x), dev(be, w), dev(be, gamma), dev(be, dout)
    ai, af, ag, do = (dev(be, r.standard_normal((B, T, d))) for _ in range(4))
    lam, gm = be.asarray((0.5 * r.random(d)).astype(np.float32)), dev(be, 1 + 0.1 * r.standard_normal(d))
    outs = [poison(be, (M, N)), poison(be, M, np.float32), poison(be, (M, K)), poison(be, (N, K)), poison(be, K),
            poison(be, (B, T, d)), poison(be, (B, T, d), np.float32), poison(be, (B, T), np.float32),
            poison(be, (B, T, d)), poison(be, (B, T, d)), poison(be, (B, T, d)), poison(be, d, np.float32),
            poison(be, d)]
    out, rstd, dinp, dw, dg, o, h, hr, dai, daf, dag, dlam, dgm = outs

    def step():
        for a in (dinp, dw, dg, dlam, dgm):
            be.fill_zero(a)
        be.bitlinear_forward(out, rstd, xd, wd, gd, 1e-6)
        be.bitlinear_backward(dinp, dw, dg, doutd, xd, wd, gd, rstd)
        be.mlgru_forward(o, h, hr, ai, af, ag, lam, gm, None, 1e-6)
        be.mlgru_backward(dai, daf, dag, dlam, dgm, do, ai, af, ag, lam, gm, h, hr)

    step()
    eager = [host(be, a) for a in outs]
    for a in outs:
        be.xp.cuda.runtime.memset(a.data.ptr, 0xFF, a.nbytes)
    be.xp.cuda.Device().synchronize()
    replay = be.capture(step)
    replay()
    for e, a in zip(eager, outs):
        assert not np.isnan(e).any()
        assert np.array_equal(host(be, a), e), "the replay differs from the eager run"
    Mb = 4096  # more rows than any test before has run: the scratch would have to grow
    big = poison(be, (Mb, N)), poison(be, Mb, np.float32), dev(be, np.ones((Mb, K)))
    with pytest.raises(RuntimeError, match="inside a CUDA graph capture"):
        be.capture(lambda: be.bitlinear_forward(*big, wd, gd, 1e-6))
