"""Our fused BitLinear against an unfused one, same GPU: time of a forward + backward and the bytes each keeps
alive between its forward and its backward (the paper's claim for its fused kernel: -61% training memory,
+25.6% speed).

    python dev/bitlinear_fused.py [--rows 16384] [--shapes 1024x1024,5632x1024,1024x2816] [--json out.json]
    python dev/bitlinear_fused.py --reps 100 --warmup 20 --no-torch

Fused (ours, llmpy/backends/cuda/mmfree.py + kernels/bitlinear.cu, through the CUDA backend): one kernel does the
inner RMSNorm and the int8 quantization of the activations, an exact integer GEMM and one rescale; the forward keeps
only rstd (one fp32 per row) and the backward recomputes q_x from the input. Its quantized operands live in scratch
buffers that every BitLinear of a model shares (reported as workspace, not as kept memory).

Unfused (defined here, as the paper's baseline and the reference's plain `BitLinear` are built): the RMSNorm is its
own op and keeps its normalized output x_hat = x rstd (bf16 M x K; its backward reads it for dgamma and dx) and rstd;
the per-token fake quantization q(y) of y = x_hat gamma is kept for dW (bf16 M x K); the fake-quantized weights
W_q = q_w / s_w are kept (bf16 N x K); a bf16 GEMM (ours: cuBLASLt, backends/cuda/gemm.py) makes the output; the
backward is two GEMMs (dy = dout W_q, dW += dout^T q(y)) and the RMSNorm backward. Its elementwise and row ops are
small NVRTC kernels below, written with the same 16-byte loads and fp32 math as ours, so the comparison measures
the fusion and the stored tensors rather than kernel quality. Kept tensors are allocated in the forward from CuPy's
pool (as a framework's autograd would), transients freed when each op is done.

Both take the same bf16 input x (M, K), fp32 master weights (N, K) (as the trainer passes them), bf16 gamma and dout;
the gradients accumulate (dinp, dW, dgamma +=) as in the model. The input x is not counted for either (the model
keeps it for other reasons; the MLGRU's three projections share one). Checks: the outputs and gradients of the two
agree up to bf16 rounding and a few activation rounding flips (printed: a sanity check, not a test).

Memory: counted from the arrays each keeps, and measured as the change of CuPy's pool in-use bytes across a forward
(kept) and its peak during the forward (a cupy.cuda.MemoryHook sees every pool malloc). Optional (--torch auto: when
torch, triton and the reference's mmfreelm are importable, build/ref/mmfreelm or $LLMPY_MMFREE_REF, as
benchmarks/torch_mmfree.py imports it): the reference's own `BitLinear` vs `FusedBitLinear` (mmfreelm/ops/
fusedbitnet.py) under bf16 autocast over fp32 weights, timed with torch CUDA events, memory from
torch.cuda.memory_allocated / max_memory_allocated.

Measured 2026-11-29 on one H200 (M = 16384): a 370M layer's six BitLinears 3.32 ms fused vs 3.00 unfused (0.90x
speed), 0.4 vs 520.9 MiB kept for the backward; the fused form is the shipped one (docs/performance.md).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHAPES_370M = {(1024, 1024): 4, (5632, 1024): 1, (1024, 2816): 1}  # (N, K): count per layer (i f g o, gate, down)
_WBLOCKS = 264
_CHUNK = 256

# The unfused BitLinear's ops, one kernel each (the shared helpers of kernels/common.cuh are inlined).
UNFUSED_SRC = r"""
// RMSNorm forward, its own op: xh = x rstd (kept for the backward), y = xh gamma (the op's output), rstd kept.
// One warp per row.
template <class T>
__global__ void unf_rmsnorm_forward(T* y, T* xh, float* rstd, const T* x, const T* gamma, float eps, int rows, int K) {
    constexpr int N = Pack<T>::N;
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    const long long off = (long long)row * K;
    float s = 0.0f;
    for (int c = lane * N; c < K; c += 32 * N) {
        Pack<T> p = load16(x + off + c);
#pragma unroll
        for (int k = 0; k < N; k++) { const float v = to_f(p.v[k]); s += v * v; }
    }
    const float r = 1.0f / sqrtf(warp_sum(s) / K + eps);
    if (lane == 0) rstd[row] = r;
    for (int c = lane * N; c < K; c += 32 * N) {
        Pack<T> p = load16(x + off + c), g = load16(gamma + c), h, o;
#pragma unroll
        for (int k = 0; k < N; k++) {
            h.v[k] = from_f<T>(to_f(p.v[k]) * r);
            o.v[k] = from_f<T>(to_f(h.v[k]) * to_f(g.v[k]));
        }
        store16(xh + off + c, h);
        store16(y + off + c, o);
    }
}

// Per-token fake quantization: yq = clamp(round(y s), -128, 127) / s, s = 127 / max(max|y|, 1e-5). Warp per row.
template <class T>
__global__ void unf_act_quant(T* yq, const T* y, int rows, int K) {
    constexpr int N = Pack<T>::N;
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    const long long off = (long long)row * K;
    float m = 0.0f;
    for (int c = lane * N; c < K; c += 32 * N) {
        Pack<T> p = load16(y + off + c);
#pragma unroll
        for (int k = 0; k < N; k++) m = fmaxf(m, fabsf(to_f(p.v[k])));
    }
    const float s = 127.0f / fmaxf(warp_max(m), 1e-5f);
    for (int c = lane * N; c < K; c += 32 * N) {
        Pack<T> p = load16(y + off + c), o;
#pragma unroll
        for (int k = 0; k < N; k++) o.v[k] = from_f<T>(fminf(fmaxf(roundf(to_f(p.v[k]) * s), -128.0f), 127.0f) / s);
        store16(yq + off + c, o);
    }
}

// Weight fake quantization, two ops: partial sums of |w| over a fixed grid, then wq = clamp(rint(w s_w), -1, 1) / s_w
// with s_w = 1 / max(mean|w|, 1e-5) (each block adds the partials itself). W: the weights' type (fp32 masters or T).
template <class W>
__global__ void unf_absmean_partial(float* part, const W* w, long long n) {
    __shared__ float buf[32];
    float s = 0.0f;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        s += fabsf(to_f(w[i]));
    s = block_sum(s, buf);
    if (threadIdx.x == 0) part[blockIdx.x] = s;
}

template <class T, class W>
__global__ void unf_weight_quant(T* wq, const W* w, const float* part, int nparts, long long n) {
    __shared__ float buf[32];
    float t = 0.0f;
    for (int i = threadIdx.x; i < nparts; i += blockDim.x) t += part[i];
    t = block_sum(t, buf);
    const float s = 1.0f / fmaxf((float)((double)t / (double)n), 1e-5f);
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        wq[i] = from_f<T>(fminf(fmaxf(rintf(to_f(w[i]) * s), -1.0f), 1.0f) / s);
}

// RMSNorm backward from the kept xh and rstd: dinp += rstd (g dy - xh mean(xh g dy)). Warp per row.
template <class T>
__global__ void unf_rmsnorm_backward_dinp(T* dinp, const T* dy, const T* xh, const T* gamma, const float* rstd,
                                          int rows, int K) {
    constexpr int N = Pack<T>::N;
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    const long long off = (long long)row * K;
    const float r = rstd[row];
    float a = 0.0f;
    for (int c = lane * N; c < K; c += 32 * N) {
        Pack<T> d = load16(dy + off + c), h = load16(xh + off + c), g = load16(gamma + c);
#pragma unroll
        for (int k = 0; k < N; k++) a += to_f(h.v[k]) * to_f(g.v[k]) * to_f(d.v[k]);
    }
    a = warp_sum(a) / K;
    for (int c = lane * N; c < K; c += 32 * N) {
        Pack<T> d = load16(dy + off + c), h = load16(xh + off + c), g = load16(gamma + c), o = load16(dinp + off + c);
#pragma unroll
        for (int k = 0; k < N; k++)
            o.v[k] = from_f<T>(to_f(o.v[k]) + r * (to_f(g.v[k]) * to_f(d.v[k]) - to_f(h.v[k]) * a));
        store16(dinp + off + c, o);
    }
}

// dgamma += sum over rows of dy xh: column partials per chunk of rows, then the chunks in order.
template <class T>
__global__ void unf_colsum_partial(float* part, const T* dy, const T* xh, int rows, int K, int per_chunk) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x, chunk = blockIdx.y;
    if (c >= K) return;
    const int lo = chunk * per_chunk, hi = min(rows, lo + per_chunk);
    float s = 0.0f;
    for (int n = lo; n < hi; n++) s += to_f(dy[(long long)n * K + c]) * to_f(xh[(long long)n * K + c]);
    part[(long long)chunk * K + c] = s;
}

template <class T>
__global__ void unf_colsum_finalize(T* dgamma, const float* part, int nchunks, int K) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= K) return;
    float s = 0.0f;
    for (int i = 0; i < nchunks; i++) s += part[(long long)i * K + c];
    dgamma[c] = from_f<T>(to_f(dgamma[c]) + s);
}
"""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Unfused:
    """The unfused BitLinear on a CUDABackend: forward returns the tensors it keeps, backward consumes them."""

    def __init__(self, be):
        from llmpy.backends.cuda.runtime import CTYPE, KERNELS
        cp = self.cp = be.cp
        self.be = be
        T = CTYPE[be.dtype_name]
        common = (KERNELS / "common.cuh").read_text().replace("#pragma once", "")
        names = {"rms_f": f"unf_rmsnorm_forward<{T}>", "act": f"unf_act_quant<{T}>",
                 "wsum_f32": "unf_absmean_partial<float>", "wsum_t": f"unf_absmean_partial<{T}>",
                 "wq_f32": f"unf_weight_quant<{T}, float>", "wq_t": f"unf_weight_quant<{T}, {T}>",
                 "rms_b": f"unf_rmsnorm_backward_dinp<{T}>", "col_p": f"unf_colsum_partial<{T}>",
                 "col_f": f"unf_colsum_finalize<{T}>"}
        cc = cp.cuda.Device().compute_capability
        mod = cp.RawModule(code=common + UNFUSED_SRC, options=("-std=c++17", f"-arch=sm_{cc}"),
                           name_expressions=sorted(set(names.values())))  # fp32: some coincide
        self.k = {key: mod.get_function(expr) for key, expr in names.items()}

    def forward(self, out, x, w, gamma, eps):
        """out (M, N) = q(rmsnorm(x)) W_q^T; returns the kept (xh, yq, wq, rstd)."""
        cp, T, k = self.cp, self.be.act_dtype, self.k
        M, K = x.shape
        N = w.shape[0]
        rstd = cp.empty(M, np.float32)
        xh, yq, wq = cp.empty((M, K), T), cp.empty((M, K), T), cp.empty((N, K), T)
        y = cp.empty((M, K), T)  # the RMSNorm's output: transient
        k["rms_f"]((cdiv(M, 8),), (256,), (y, xh, rstd, x, gamma, np.float32(eps), np.int32(M), np.int32(K)))
        k["act"]((cdiv(M, 8),), (256,), (yq, y, np.int32(M), np.int32(K)))
        del y
        part = cp.empty(_WBLOCKS, np.float32)
        f32 = w.dtype == np.float32 and T != np.float32
        k["wsum_f32" if f32 else "wsum_t"]((_WBLOCKS,), (512,), (part, w, np.int64(N * K)))
        k["wq_f32" if f32 else "wq_t"]((_WBLOCKS,), (512,), (wq, w, part, np.int32(_WBLOCKS), np.int64(N * K)))
        del part
        self.be.gemm.mm(out, yq, wq, M, N, K, transy=True)
        return xh, yq, wq, rstd

    def backward(self, dinp, dw, dgamma, dout, gamma, saved):
        cp, T, k = self.cp, self.be.act_dtype, self.k
        xh, yq, wq, rstd = saved
        M, K = xh.shape
        N = wq.shape[0]
        dy = cp.empty((M, K), T)
        self.be.gemm.mm(dy, dout, wq, M, K, N)                                # dy (M, K) = dout W_q (straight through)
        self.be.gemm.mm(dw, dout, yq, N, K, M, transx=True, accumulate=True)  # dW (N, K) += dout^T q(y)
        k["rms_b"]((cdiv(M, 8),), (256,), (dinp, dy, xh, gamma, rstd, np.int32(M), np.int32(K)))
        chunks = cdiv(M, _CHUNK)
        part = cp.empty((chunks, K), np.float32)
        k["col_p"]((cdiv(K, 128), chunks), (128,), (part, dy, xh, np.int32(M), np.int32(K), np.int32(_CHUNK)))
        k["col_f"]((cdiv(K, 128),), (128,), (dgamma, part, np.int32(chunks), np.int32(K)))


def _peak_hook(cp):
    """A MemoryHook recording the pool's largest in-use bytes seen at any malloc."""
    class Peak(cp.cuda.MemoryHook):
        name = "bitlinear_fused_peak"

        def __init__(self):
            self.pool, self.peak = cp.get_default_memory_pool(), 0

        def malloc_postprocess(self, **kw):
            self.peak = max(self.peak, self.pool.used_bytes())
    return Peak()


def rel(a, b) -> tuple[float, float]:
    """(||a - b|| / ||b||, max|a - b| / max|b|) in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = np.abs(a - b)
    return float(np.linalg.norm(d) / max(np.linalg.norm(b), 1e-30)), float(d.max() / max(np.abs(b).max(), 1e-30))


def measure_ours(be, shapes, M, args) -> list[dict]:
    unf = Unfused(be)
    res = []
    for N, K in shapes:
        row = _measure_shape(be, unf, N, K, M, args)
        res.append(row)
        print(f"  {N}x{K}: fused {row['fused']['fwd_bwd_ms']:.3f} ms, unfused {row['unfused']['fwd_bwd_ms']:.3f} ms; "
              f"out rel diff {row['check_unfused_vs_fused']['out']['rel_l2']:.2e}", file=sys.stderr)
        be.cp.get_default_memory_pool().free_all_blocks()
    return res


def _measure_shape(be, unf, N, K, M, args) -> dict:
    """Numerics, memory and time of both versions at one shape (its arrays are freed on return)."""
    cp = be.cp
    T, nbT = be.act_dtype, be.act_dtype.itemsize
    pool = cp.get_default_memory_pool()
    scratch = getattr(getattr(be, "mmfree", None), "scratch", None)  # the fused ops' shared scratch (mmfree.py)
    bufs = getattr(scratch, "bufs", None)
    if not isinstance(bufs, dict) or getattr(scratch, "captured", True):
        bufs = None  # unknown layout, or a graph holds it: the workspace is computed instead
    else:
        bufs.clear()  # sized afresh for this shape, so its size is this shape's
    r = np.random.default_rng(0)
    x = be.asarray(r.standard_normal((M, K)).astype(np.float32), T)
    w = be.asarray((0.02 * r.standard_normal((N, K))).astype(np.float32), np.float32)
    gamma = be.asarray((1 + 0.1 * r.standard_normal(K)).astype(np.float32), T)
    dout = be.asarray((r.standard_normal((M, N)) / np.sqrt(N)).astype(np.float32), T)
    out = {v: be.zeros(M * N, T).reshape(M, N) for v in ("fused", "unfused")}
    grads = {v: (be.zeros(M * K, T).reshape(M, K), be.zeros(N * K, T).reshape(N, K), be.zeros(K, T))
             for v in ("fused", "unfused")}

    def fwd(v):
        """The forward; returns what it keeps for the backward."""
        if v == "fused":
            rstd = cp.empty(M, np.float32)
            be.bitlinear_forward(out[v], rstd, x, w, gamma, args.eps)
            return rstd
        return unf.forward(out[v], x, w, gamma, args.eps)

    def bwd(v, saved):
        dinp, dw, dg = grads[v]
        if v == "fused":
            be.bitlinear_backward(dinp, dw, dg, dout, x, w, gamma, saved)
        else:
            unf.backward(dinp, dw, dg, dout, gamma, saved)

    def zero_grads():
        for g in (*grads["fused"], *grads["unfused"]):
            be.fill_zero(g)

    # numerics: one forward + backward each from zeroed gradients (this also sizes the fused scratch)
    zero_grads()
    for v in ("fused", "unfused"):
        bwd(v, fwd(v))
    be.synchronize()
    check = {}
    for name, i in (("out", None), ("dinp", 0), ("dw", 1), ("dgamma", 2)):
        a, b = ((out[v] if i is None else grads[v][i]) for v in ("unfused", "fused"))
        check[name] = rel(be.to_numpy(a).astype(np.float32), be.to_numpy(b).astype(np.float32))
    # memory: kept = the pool's in-use bytes after the forward minus before; peak over the forward (hook)
    mem = {}
    for v in ("fused", "unfused"):
        be.synchronize()
        hook = _peak_hook(cp)
        base = pool.used_bytes()
        with hook:
            saved = fwd(v)
        kept_pool = pool.used_bytes() - base
        mem[v] = {"kept_pool": kept_pool, "fwd_peak_pool": max(hook.peak - base, kept_pool)}
        bwd(v, saved)
        del saved
    be.synchronize()
    counted = {"fused": {"rstd": M * 4},
               "unfused": {"rstd": M * 4, "x_hat": M * K * nbT, "q(y)": M * K * nbT, "W_q": N * K * nbT}}
    chunks = cdiv(M, _CHUNK)
    workspace = {  # fused: mmfree.py's scratch as allocated (q_x, s_x, GEMM output, q_w, partials); unfused: transients
        "fused": (sum(b.nbytes for b in bufs.values()) if bufs is not None else
                  M * K * nbT + M * 4 + max(M * N, M * K) * 4 + N * K * nbT + _WBLOCKS * 4 + chunks * K * 4),
        "unfused": max(M * K * nbT + _WBLOCKS * 4, M * K * nbT + chunks * K * 4)}
    # time: forward and backward, CUDA events on the backend's stream, median over reps after warm-up
    times = {}
    for v in ("fused", "unfused"):
        rec = []
        for i in range(args.warmup + args.reps):
            zero_grads()  # outside the events
            e0, e1, e2 = cp.cuda.Event(), cp.cuda.Event(), cp.cuda.Event()
            e0.record(be.stream)
            saved = fwd(v)
            e1.record(be.stream)
            bwd(v, saved)
            e2.record(be.stream)
            del saved
            if i >= args.warmup:
                rec.append((e0, e1, e2))
        be.synchronize()
        f = statistics.median(cp.cuda.get_elapsed_time(a, b) for a, b, _ in rec)
        t = statistics.median(cp.cuda.get_elapsed_time(a, c) for a, _, c in rec)
        times[v] = {"fwd_ms": f, "fwd_bwd_ms": t, "bwd_ms": t - f}
    row = {"N": N, "K": K, "M": M,
           "check_unfused_vs_fused": {k: {"rel_l2": a, "max_rel": b} for k, (a, b) in check.items()}}
    for v in ("fused", "unfused"):
        row[v] = {**times[v], "kept_bytes": sum(counted[v].values()), "kept_by_tensor": counted[v], **mem[v],
                  "workspace_bytes": workspace[v]}
    row["speedup"] = row["unfused"]["fwd_bwd_ms"] / row["fused"]["fwd_bwd_ms"]
    row["kept_ratio"] = row["fused"]["kept_bytes"] / row["unfused"]["kept_bytes"]
    return row


def measure_torch(shapes, M, args) -> dict:
    """The reference's BitLinear and FusedBitLinear, bf16 autocast over fp32 weights; {"skipped": why} if it can't."""
    try:
        import torch
        if not torch.cuda.is_available():
            return {"skipped": "torch has no CUDA device"}
        sys.path.insert(0, str(ROOT))
        from benchmarks.torch_mmfree import import_reference
        import_reference()
        from mmfreelm.ops import fusedbitnet
    except (SystemExit, Exception) as e:  # noqa: BLE001  optional: any failure (SystemExit: reference not found) skips
        return {"skipped": f"{type(e).__name__}: {e}"}
    res = {"rows": []}
    for N, K in shapes:
        row = {"N": N, "K": K}
        for name in ("BitLinear", "FusedBitLinear"):
            row[name] = _torch_layer(torch, getattr(fusedbitnet, name), N, K, M, args)
            print(f"  torch {name} {N}x{K}: {row[name]['fwd_bwd_ms']:.3f} ms, kept "
                  f"{row[name]['kept_bytes'] / 2**20:.1f} MiB", file=sys.stderr)
            torch.cuda.empty_cache()
        res["rows"].append(row)
    return res


def _torch_layer(torch, cls, N, K, M, args) -> dict:
    dev = "cuda"
    torch.manual_seed(0)
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn(M, N, device=dev, dtype=torch.bfloat16) / N ** 0.5
    layer = cls(K, N).to(dev)
    with torch.no_grad():
        layer.weight.normal_(0, 0.02)
        layer.norm.weight.copy_(1 + 0.1 * torch.randn(K, device=dev))

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x)
        y.backward(dout)

    for _ in range(max(args.warmup, 1)):  # Triton autotunes here; the gradients get allocated
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    m0 = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - m0 - y.nelement() * y.element_size()
    peak = torch.cuda.max_memory_allocated() - m0
    y.backward(dout)
    del y
    ev = []
    for _ in range(args.reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        step()
        e1.record()
        ev.append((e0, e1))
    torch.cuda.synchronize()
    return {"fwd_bwd_ms": statistics.median(a.elapsed_time(b) for a, b in ev), "kept_bytes": kept,
            "fwd_peak_bytes": peak}


def report(args, res):
    mib = 2 ** 20
    print(f"\n{res['date']}  {res.get('device', '')}: BitLinear fused (ours) vs unfused, M = {res['M']} rows, "
          f"{res['dtype']}, fp32 master weights; median of {args.reps} after {args.warmup} warm-up")
    print("| N x K | fused fwd+bwd ms | unfused fwd+bwd ms | speed-up | fused fwd / bwd ms | unfused fwd / bwd ms | "
          "kept fused MiB | kept unfused MiB | kept ratio | pool kept f / u MiB | pool fwd peak f / u MiB | "
          "out rel diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in res["ours"]:
        f, u, c = r["fused"], r["unfused"], r["check_unfused_vs_fused"]
        print(f"| {r['N']}x{r['K']} | {f['fwd_bwd_ms']:.3f} | {u['fwd_bwd_ms']:.3f} | {r['speedup']:.2f}x | "
              f"{f['fwd_ms']:.3f} / {f['bwd_ms']:.3f} | {u['fwd_ms']:.3f} / {u['bwd_ms']:.3f} | "
              f"{f['kept_bytes'] / mib:.2f} | {u['kept_bytes'] / mib:.2f} | {r['kept_ratio']:.3f} | "
              f"{f['kept_pool'] / mib:.2f} / {u['kept_pool'] / mib:.2f} | "
              f"{f['fwd_peak_pool'] / mib:.2f} / {u['fwd_peak_pool'] / mib:.2f} | {c['out']['rel_l2']:.1e} |")
    print("\nunfused vs fused, relative difference ||u - f|| / ||f|| (max |u - f| / max |f|): " + "; ".join(
        f"{r['N']}x{r['K']}: " + ", ".join(f"{k} {v['rel_l2']:.1e} ({v['max_rel']:.1e})"
                                           for k, v in r["check_unfused_vs_fused"].items()) for r in res["ours"]))
    r0 = res["ours"][0]
    print(f"unfused keeps, per tensor (first shape): {', '.join(f'{k} {v / mib:.2f} MiB' for k, v in r0['unfused']['kept_by_tensor'].items())}"
          f"; without x_hat (torch autograd's plain BitLinear keeps rstd, q(y), W_q) the kept ratio is "
          f"{r0['fused']['kept_bytes'] / (r0['unfused']['kept_bytes'] - r0['unfused']['kept_by_tensor']['x_hat']):.3f}")
    print("workspace (not kept: fused = scratch shared by every BitLinear of a model; unfused = transients): "
          + ", ".join(f"{r['N']}x{r['K']} {r['fused']['workspace_bytes'] / mib:.1f} / {r['unfused']['workspace_bytes'] / mib:.1f} MiB"
                      for r in res["ours"]))
    if "per_layer_370m" in res:
        p = res["per_layer_370m"]
        print(f"one 370M layer (i f g o, gate, down): kept {p['fused_kept'] / mib:.1f} vs {p['unfused_kept'] / mib:.1f} "
              f"MiB ({100 * (p['fused_kept'] / p['unfused_kept'] - 1):+.1f}%), fwd+bwd {p['fused_ms']:.2f} vs "
              f"{p['unfused_ms']:.2f} ms ({100 * (p['unfused_ms'] / p['fused_ms'] - 1):+.1f}% speed); x 24 layers: "
              f"{24 * (p['unfused_kept'] - p['fused_kept']) / 2**30:.2f} GiB less kept")
    t = res.get("torch", {})
    if t.get("rows"):
        print("\nreference (mmfreelm, torch, bf16 autocast): BitLinear vs FusedBitLinear")
        print("| N x K | BitLinear ms | FusedBitLinear ms | speed-up | kept MiB B / F | fwd peak MiB B / F |")
        print("|---|---|---|---|---|---|")
        for r in t["rows"]:
            a, b = r["BitLinear"], r["FusedBitLinear"]
            print(f"| {r['N']}x{r['K']} | {a['fwd_bwd_ms']:.3f} | {b['fwd_bwd_ms']:.3f} | "
                  f"{a['fwd_bwd_ms'] / b['fwd_bwd_ms']:.2f}x | {a['kept_bytes'] / mib:.2f} / {b['kept_bytes'] / mib:.2f} | "
                  f"{a['fwd_peak_bytes'] / mib:.2f} / {b['fwd_peak_bytes'] / mib:.2f} |")
    elif t:
        print(f"\nreference skipped: {t.get('skipped')}")


def parse_shapes(s: str) -> list[tuple[int, int]]:
    try:
        out = [tuple(int(v) for v in p.lower().split("x")) for p in s.split(",") if p.strip()]
    except ValueError:
        raise SystemExit(f"--shapes: expected NxK[,NxK...], got {s!r}") from None
    if not out or any(len(p) != 2 or p[0] % 8 or p[1] % 8 for p in out):
        raise SystemExit(f"--shapes: expected NxK pairs divisible by 8, got {s!r}")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8 * 2048, help="M, tokens per call (default 8 x 2048)")
    ap.add_argument("--shapes", default="1024x1024,5632x1024,1024x2816", help="NxK (out x in), comma-separated")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--eps", type=float, default=1e-6)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--torch", default="auto", choices=("auto", "no"), help="also time the reference's layers")
    ap.add_argument("--no-torch", dest="torch", action="store_const", const="no")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    shapes, M = parse_shapes(args.shapes), args.rows
    if M < 1 or args.reps < 1 or args.warmup < 0:
        raise SystemExit("--rows and --reps must be positive, --warmup >= 0")
    sys.path.insert(0, str(ROOT))
    from llmpy.backends import get_backend
    be = get_backend("cuda", args.dtype)
    res = {"date": time.strftime("%Y-%m-%d"), "M": M, "dtype": args.dtype, "args": vars(args)}
    props = be.cp.cuda.runtime.getDeviceProperties(be.cp.cuda.Device().id)
    res["device"] = props["name"].decode() if isinstance(props.get("name"), bytes) else str(props.get("name"))
    res["ours"] = measure_ours(be, shapes, M, args)
    by = {(r["N"], r["K"]): r for r in res["ours"]}
    if all(s in by for s in SHAPES_370M):
        res["per_layer_370m"] = {
            f"{v}_{q}": sum(n * by[s][v][key] for s, n in SHAPES_370M.items())
            for v in ("fused", "unfused") for q, key in (("kept", "kept_bytes"), ("ms", "fwd_bwd_ms"))}
    if args.torch != "no":
        be.synchronize()
        res["torch"] = measure_torch(shapes, M, args)
    report(args, res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
