"""Candidate versions of memory-bound kernels against the shipped ones, in isolation on one GPU, at the sizes
the GPT-2 / Llama benchmarks run them (a kernel is changed in llmpy only after it wins here and in the step).

    python dev/kernel_variants.py [--reps 30] [--only GROUP ...] [--json out.json]

1. Classifier (softmax + cross-entropy + dlogits in place; kernels/classifier.cu: two passes over each row, the
   second hoping for L2) at the d12 and Llama 3 LM head chunks (8192 rows of 50304 and of 128256 columns), with
   blocks of 1024, 512 and 256 threads (a row a block either way). Candidates: `cls_batched<P>` (P packs a thread
   loaded before any is used; the same bits as the shipped kernel at the same block size) and a probe with pass 2's
   exponentials in half precision (whether the special-function units bound it), and two floors: the shipped memory
   pattern with a max for all its arithmetic, and the same bytes read and written once by a flat grid (where the
   row structure does not count).
2. AdamW, bf16 weights and moments (shipped: kernels/adamw.cu). Not candidates but bounds: `adamw_traffic` moves
   the same bytes with almost no arithmetic (the HBM floor); `adamw_cheaphash` is the shipped kernel with its
   hash replaced by one multiply (how much of its time the instruction count costs); `adamw_lb6` is the
   shipped kernel held to 40 registers (75% occupancy instead of 50%).
3. Recompute fused into the backward (`--only gelu`, `--only swiglu`): GELU forward + gelu_backward_colsum against
   gelu_backward_colsum writing the GELU output itself (`gelu_redo`, d12 and d48 fc sizes); SwiGLU forward +
   backward against the backward with `redo` (Llama 1B).
4. The norms' row kernels (LayerNorm / RMSNorm backward dinp, the fused residual + norm forward), shipped plain (one
   pack a lane loaded at a time) and `_batched` (four), against --baseline DIR: layernorm.cu and rmsnorm.cu of another
   version (e.g. `git show REV:llmpy/backends/cuda/kernels/layernorm.cu`). Outputs must agree bit for bit.

    python dev/kernel_variants.py --only norms --baseline build/kernel_baseline

5. LayerNorm's backward in one pass (`--only norm_fused`: layernorm_backward_onepass and its finalize kernels)
   against the separate kernels (the dinp kernel, the parameter sums' partials and finalize, and the bias-gradient
   column sums of the updated dinp), through the backend's own calls, each sequence replayed from a CUDA graph
   (several launches a sequence: host time must not count), at d12's and d48's rows; outputs against the separate
   kernels' (other orders of sums: within bf16 rounding).

Times: CUDA events around `reps` back-to-back launches, after a warm-up, median of 5 such groups; GB/s counts the
bytes each must move at least (reads + writes).

Measured 2026-11-30 on one H200: the classifier candidates not adopted (d12: 0.6076 ms shipped vs 0.4605 for its
memory pattern alone); `gelu_redo`, `redo`, the `_batched` norms and the one-pass LayerNorm backward adopted
(docs/performance.md has each figure).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)

VARIANTS_SRC = r"""
#include <cuda_fp16.h>
// (MaxSum, combine and block_maxsum come from kernels/classifier.cu, compiled into the same module)
// the shipped pass-1 step for one pack (same arithmetic, so the same bits)
template <class T>
__device__ __forceinline__ void cls_step(MaxSum& acc, const Pack<T>& p, int i, int V) {
    constexpr int N = Pack<T>::N;
    float mx = -INFINITY;
    bool nan = false;
#pragma unroll
    for (int k = 0; k < N; k++)
        if (i + k < V) { const float v = to_f(p.v[k]); mx = fmaxf(mx, v); nan |= v != v; }
    const float m = fmaxf(acc.m, mx);
    if (m == -INFINITY) { if (nan) acc.s = __int_as_float(0x7fc00000); return; }
    float s = acc.s * __expf(acc.m - m);
#pragma unroll
    for (int k = 0; k < N; k++)
        if (i + k < V) s += __expf(to_f(p.v[k]) - m);
    acc = {m, s};
}
// the block's (max, sum), the row's loss written; the target read before any thread overwrites the row
template <class T>
__device__ __forceinline__ MaxSum cls_loss(MaxSum acc, const T* x, const int* targets, float* losses, int& tgt,
                                           float& inv) {
    acc = block_maxsum(acc);
    tgt = targets[blockIdx.x];
    const float xt = to_f(x[tgt]);
    __syncthreads();
    if (threadIdx.x == 0) losses[blockIdx.x] = acc.m + logf(acc.s) - xt;
    inv = 1.0f / acc.s;
    return acc;
}
template <class T>
__device__ __forceinline__ Pack<T> cls_grad(const Pack<T>& p, int i, int V, int tgt, float mx, float inv, float dloss) {
    constexpr int N = Pack<T>::N;
    Pack<T> o;
#pragma unroll
    for (int k = 0; k < N; k++) {
        int v = i + k;
        float g = v < V ? (__expf(to_f(p.v[k]) - mx) * inv - (v == tgt ? 1.0f : 0.0f)) * dloss : 0.0f;
        o.v[k] = from_f<T>(g);
    }
    return o;
}
// the shipped two passes with P packs a thread loaded before any is used (P loads in flight instead of one); each
// thread visits the shipped kernel's packs in the same order: the same bits at the same block size
template <class T, int P>
__global__ void __launch_bounds__(1024) cls_batched(T* logits, float* losses, const int* targets, float dloss, int V, int Vp) {
    constexpr int N = Pack<T>::N;
    T* x = logits + (long long)blockIdx.x * Vp;
    const int stride = blockDim.x * N;
    MaxSum acc = {-INFINITY, 0.0f};
    for (int i0 = threadIdx.x * N; i0 < V; i0 += P * stride) {
        Pack<T> q[P];
#pragma unroll
        for (int j = 0; j < P; j++) if (i0 + j * stride < V) q[j] = load16(x + i0 + j * stride);
#pragma unroll
        for (int j = 0; j < P; j++) if (i0 + j * stride < V) cls_step(acc, q[j], i0 + j * stride, V);
    }
    int tgt;
    float inv;
    acc = cls_loss(acc, x, targets, losses, tgt, inv);
    for (int i0 = threadIdx.x * N; i0 < Vp; i0 += P * stride) {
        Pack<T> q[P];
#pragma unroll
        for (int j = 0; j < P; j++) if (i0 + j * stride < Vp) q[j] = load16(x + i0 + j * stride);
#pragma unroll
        for (int j = 0; j < P; j++)
            if (i0 + j * stride < Vp) store16(x + i0 + j * stride, cls_grad(q[j], i0 + j * stride, V, tgt, acc.m, inv, dloss));
    }
}
// a probe, not a candidate: the shipped kernel with pass 2's exponentials two at a time in half precision
// (ex2.approx.f16x2: half the special-function work of that pass, less exact); if it is no faster, the
// special-function units do not bound the kernel
template <class T>
__global__ void __launch_bounds__(1024, 2) cls_probe_f16exp(T* logits, float* losses, const int* targets, float dloss, int V, int Vp) {
    constexpr int N = Pack<T>::N;
    T* x = logits + (long long)blockIdx.x * Vp;
    MaxSum acc = {-INFINITY, 0.0f};
    for (int i = threadIdx.x * N; i < V; i += blockDim.x * N) cls_step(acc, load16(x + i), i, V);
    int tgt;
    float inv;
    acc = cls_loss(acc, x, targets, losses, tgt, inv);
    for (int i = threadIdx.x * N; i < Vp; i += blockDim.x * N) {
        Pack<T> p = load16(x + i), o;
#pragma unroll
        for (int k = 0; k < N; k += 2) {
            __half2 h = __floats2half2_rn((to_f(p.v[k]) - acc.m) * 1.4426950f, (to_f(p.v[k + 1]) - acc.m) * 1.4426950f);
            unsigned u = *reinterpret_cast<unsigned*>(&h), e;
            asm("ex2.approx.f16x2 %0, %1;" : "=r"(e) : "r"(u));
            const float2 f = __half22float2(*reinterpret_cast<__half2*>(&e));
            const float ek[2] = {f.x, f.y};
#pragma unroll
            for (int h2 = 0; h2 < 2; h2++) {
                const int v = i + k + h2;
                o.v[k + h2] = from_f<T>(v < V ? (ek[h2] * inv - (v == tgt ? 1.0f : 0.0f)) * dloss : 0.0f);
            }
        }
        store16(x + i, o);
    }
}
// probes, not candidates, for the classifier's floor: (a) the shipped kernel's memory pattern (a row a block: pass 1
// reads the row, a block reduction, pass 2 reads it again and writes it) with a max for all its arithmetic;
// (b) the same bytes with no row structure: every 16-byte pack read once and written back once, a flat grid
template <class T>
__global__ void __launch_bounds__(1024, 2) cls_probe_bytes(T* logits, float* losses, const int* targets, float dloss, int V, int Vp) {
    constexpr int N = Pack<T>::N;
    T* x = logits + (long long)blockIdx.x * Vp;
    MaxSum acc = {-INFINITY, 1.0f};
    for (int i = threadIdx.x * N; i < V; i += blockDim.x * N) {
        Pack<T> p = load16(x + i);
#pragma unroll
        for (int k = 0; k < N; k++) acc.m = fmaxf(acc.m, to_f(p.v[k]));
    }
    acc = block_maxsum(acc);
    if (threadIdx.x == 0) losses[blockIdx.x] = acc.m + (float)targets[blockIdx.x];
    for (int i = threadIdx.x * N; i < Vp; i += blockDim.x * N) {
        Pack<T> p = load16(x + i);
#pragma unroll
        for (int k = 0; k < N; k++) p.v[k] = from_f<T>((to_f(p.v[k]) - acc.m) * dloss);
        store16(x + i, p);
    }
}
template <class T>
__global__ void inplace_stream(T* x, long long packs, float a) {
    constexpr int N = Pack<T>::N;
    for (long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x; j < packs; j += (long long)gridDim.x * blockDim.x) {
        Pack<T> p = load16(x + j * N);
#pragma unroll
        for (int k = 0; k < N; k++) p.v[k] = from_f<T>(to_f(p.v[k]) * a);
        store16(x + j * N, p);
    }
}
// AdamW's bytes (bf16 p, g, m, v read; p, m, v written) with next to no arithmetic: the HBM floor
__global__ void adamw_traffic(__nv_bfloat16* p, const __nv_bfloat16* g, __nv_bfloat16* m, __nv_bfloat16* v, long long n) {
    typedef __nv_bfloat16 T;
    const long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (i + 8 > n) return;
    Pack<T> a = load16_cs(p + i), b = load16_cs(g + i), c = load16_cs(m + i), d = load16_cs(v + i);
#pragma unroll
    for (int k = 0; k < 8; k++) {
        const float gk = to_f(b.v[k]);
        a.v[k] = from_f<T>(to_f(a.v[k]) - 1e-3f * gk);
        c.v[k] = from_f<T>(to_f(c.v[k]) + gk);
        d.v[k] = from_f<T>(to_f(d.v[k]) + gk * gk);
    }
    store16(p + i, a); store16(m + i, c); store16(v + i, d);
}
"""


def timed(cp, launch, reps):
    launch()
    cp.cuda.Device().synchronize()
    a, b = cp.cuda.Event(), cp.cuda.Event()
    out = []
    for _ in range(5):
        a.record()
        for _ in range(reps):
            launch()
        b.record()
        b.synchronize()
        out.append(cp.cuda.get_elapsed_time(a, b) / reps)
    return statistics.median(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", choices=("classifier", "adamw", "gelu", "swiglu", "norms", "norm_fused"),
                    action="append",
                    help="run only these groups (repeatable; default all, norms only with --baseline)")
    ap.add_argument("--baseline", help="a folder with layernorm.cu and rmsnorm.cu of another version (group 4)")
    args = ap.parse_args(argv)
    groups = set(args.only or ("classifier", "adamw", "gelu", "swiglu", "norms", "norm_fused"))
    from llmpy.backends.cuda.backend import CUDABackend
    from llmpy.backends.cuda.runtime import KERNELS, module
    import cupy as cp
    be = CUDABackend("bf16")
    T = be.act_dtype
    common = (KERNELS / "common.cuh").read_text().replace("#pragma once", "")
    adamw_src = (KERNELS / "adamw.cu").read_text().replace('#include "common.cuh"', "")
    cheap = adamw_src.replace("hash_u32(", "cheap_u32(").replace("adamw_bf16_moments", "adamw_cheaphash") \
        .replace("__global__ void adamw(", "__global__ void adamw_cheap_f32(")
    cheap = cheap[:cheap.index("// The global gradient norm")]
    cheap = "__device__ __forceinline__ unsigned int cheap_u32(unsigned int x) { return x * 0x9e3779b1u; }\n" + cheap
    classifier_src = (KERNELS / "classifier.cu").read_text().replace('#include "common.cuh"', "")
    bf = "__nv_bfloat16"
    exprs = [f"cls_batched<{bf}, 2>", f"cls_batched<{bf}, 4>", f"cls_probe_f16exp<{bf}>", f"cls_probe_bytes<{bf}>",
             f"inplace_stream<{bf}>", "adamw_traffic", f"adamw_cheaphash<{bf}>"]
    cc = cp.cuda.Device().compute_capability
    mod = cp.RawModule(code=common + classifier_src + VARIANTS_SRC + cheap, options=("-std=c++17", f"-arch=sm_{cc}"),
                       name_expressions=exprs)
    fn = {e: mod.get_function(e) for e in exprs}
    # the shipped AdamW held to 40 registers (6 blocks of 256 threads an SM instead of 4): its own module
    lb = adamw_src[:adamw_src.index("// The global gradient norm")].replace(
        "__global__ void adamw_bf16_moments(", "__global__ void __launch_bounds__(256, 6) adamw_lb6(")
    fn["adamw_lb6"] = cp.RawModule(code=common + lb, options=("-std=c++17", f"-arch=sm_{cc}"),
                                   name_expressions=[f"adamw_lb6<{bf}>"]).get_function(f"adamw_lb6<{bf}>")
    res = {"device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), "reps": args.reps, "rows": []}
    rng = np.random.default_rng(0)

    def row(group, name, ms, nbytes, **kw):
        r = {"group": group, "kernel": name, "ms": round(ms, 4), "GB/s": round(nbytes / ms / 1e6, 1), **kw}
        res["rows"].append(r)
        print(f"{group:10s} {name:34s} {ms:8.4f} ms {r['GB/s']:8.1f} GB/s {kw if kw else ''}", flush=True)

    # 1. classifier: one chunk of the d12 LM head (8192 rows of the padded GPT-2 vocabulary) and of Llama 3's
    k_cls = module("classifier", "bf16")
    for rows, V, Vp in ((8192, 50257, 50304), (8192, 128256, 128256)) if "classifier" in groups else ():
        src = cp.asarray(rng.standard_normal((rows, Vp), dtype=np.float32) * 3).astype(T)
        tg = cp.asarray(rng.integers(0, V, rows).astype(np.int32))
        buf, losses = cp.empty_like(src), cp.empty(rows, np.float32)
        dl = np.float32(1.0 / rows)
        args_k = lambda: (buf, losses, tg, dl, np.int32(V), np.int32(Vp))  # noqa: E731
        nbytes = 2 * rows * Vp * 2
        for threads in (1024, 512, 256):
            def shipped(threads=threads):
                k_cls.fused_classifier((rows,), (threads,), args_k() + (np.int32(1), np.uint64(0)))
            buf[...] = src
            shipped()
            want = cp.asnumpy(buf).view(np.uint16), cp.asnumpy(losses)
            # the dlogits overwrite the logits: every timed launch reads what the last one wrote (same bytes moved)
            row("classifier", f"shipped fused_classifier, {threads} threads", timed(cp, shipped, args.reps), nbytes,
                rows=rows, Vp=Vp)
            cands = [(f"cls_batched<{P}>, {threads} threads",
                      lambda P=P, threads=threads: fn[f"cls_batched<{bf}, {P}>"]((rows,), (threads,), args_k()))
                     for P in (2, 4)]
            if threads == 1024:
                cands.append(("probe: pass 2's exps in f16x2", lambda: fn[f"cls_probe_f16exp<{bf}>"](
                    (rows,), (1024,), args_k())))
                cands.append(("probe: the same bytes, a max only", lambda: fn[f"cls_probe_bytes<{bf}>"](
                    (rows,), (1024,), args_k())))
                packs, sms = rows * Vp // 8, cp.cuda.Device().attributes["MultiProcessorCount"]
                for blocks in (sms * 8, sms * 64, cdiv(packs, 256)):  # resident grids and one thread a pack
                    cands.append((f"probe: flat read + write, {blocks} x 256", lambda blocks=blocks, packs=packs: fn[
                        f"inplace_stream<{bf}>"]((blocks,), (256,), (buf, np.int64(packs), np.float32(1.0)))))
            for name, launch in cands:
                buf[...] = src
                launch()
                same = bool(np.array_equal(cp.asnumpy(buf).view(np.uint16), want[0])
                            and np.array_equal(cp.asnumpy(losses), want[1]))
                row("classifier", name, timed(cp, launch, args.reps), nbytes, rows=rows, Vp=Vp, bitwise_same=same)

    # 2. AdamW: a d48 layer's weights (12 * 1600^2 elements), bf16 weights and moments, no master copy
    k_adam = module("adamw", "bf16")
    n = 12 * 1600 * 1600 if "adamw" in groups else 8
    p, g, m, v = (cp.asarray(rng.standard_normal(n, dtype=np.float32) * s).astype(T) for s in (0.02, 1e-3, 1e-4, 1e-7))
    v = cp.abs(v)
    hp = cp.asarray(np.array([1e-4, 0.9, 0.95, 1e-8, 10.0, 20.0, 1.0, np.uint32(1234).view(np.float32)],
                             np.float32))
    norm = cp.asarray(np.array([0.5], np.float32))
    grid = (cdiv(n // 8, 256),)
    aargs = (p, np.uint64(0), g, m, v, np.int64(n), hp, norm, np.float32(0.1), np.int64(0), np.int32(1))
    nbytes = n * 2 * 7
    if "adamw" in groups:
        adamw_rows(row, timed, cp, k_adam, fn, grid, aargs, args, nbytes, n, (p, g, m, v), bf)

    # 3. GELU backward + bias sums: d12 (65536 x 3072) and d48 (8192 x 6400) fc activations
    k_gelu, k_mm = module("gelu", "bf16"), module("matmul", "bf16")
    for M, C in ((65536, 3072), (8192, 6400)) if "gelu" in groups else ():
        d = cp.asarray(rng.standard_normal((M, C), dtype=np.float32)).astype(T)
        x = cp.asarray(rng.standard_normal((M, C), dtype=np.float32)).astype(T)
        chunks = cdiv(M, 256)
        part, db = cp.zeros(chunks * C, np.float32), cp.zeros(C, T)
        cgrid = (cdiv(C // 8, 32), chunks)
        gelu_rows(row, timed, cp, k_gelu, k_mm, d, x, part, db, cgrid, chunks, M, C, args)

    if "swiglu" in groups:
        swiglu_rows(row, timed, cp, rng, T, args)

    # 4. the norms' row kernels against a baseline version of them
    if "norms" in groups and args.baseline:
        norm_rows(row, timed, cp, rng, T, common, cc, Path(args.baseline), args)
    if "norm_fused" in groups:
        norm_fused_rows(row, cp, be, rng, args)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


def graph_timed(cp, be, launch, reps):
    """timed(), but the reps launches replayed from one CUDA graph (captured on the backend's stream)."""
    replay = be.capture(lambda: [launch() for _ in range(reps)])
    replay()
    cp.cuda.Device().synchronize()
    a, b = cp.cuda.Event(), cp.cuda.Event()
    out = []
    for _ in range(5):
        a.record(be.stream)
        replay()
        b.record(be.stream)
        b.synchronize()
        out.append(cp.cuda.get_elapsed_time(a, b) / reps)
    return statistics.median(out)


def norm_fused_rows(row, cp, be, rng, args):
    from llmpy.backends.ops import OpShapes
    T = be.act_dtype
    plan = be._ln_onepass
    for rows, C in ((65536, 768), (8192, 1600)):
        be.plan_workspace(OpShapes(B=rows // 1024, T=1024, channels=C, heads=0, kv_heads=0, head_size=0, vocab=8,
                                   logits=128, linears=((C, C),), bias_widths=(3 * C, C, 4 * C)))

        def arr(*shape, scale=1.0):
            return cp.asarray(rng.standard_normal(shape, dtype=np.float32) * scale).astype(T)
        x, dout, d0, w, lin = arr(rows, C), arr(rows, C), arr(rows, C), arr(C), arr(C, C, scale=0.02)
        mean = cp.asarray(rng.standard_normal(rows, dtype=np.float32) * 0.1)
        rstd = cp.asarray(rng.random(rows, dtype=np.float32) + 0.5)
        dinp, dw, db, bias = cp.empty_like(d0), arr(C), arr(C), arr(C)

        def separate():
            be._ln_onepass = lambda *a: None
            try:
                be.layernorm_backward(dinp, dw, db, dout, x, w, mean, rstd)
                be._colsum_add(bias, dinp, rows, C)
            finally:
                del be._ln_onepass

        def onepass():
            sums = be.layernorm_backward(dinp, dw, db, dout, x, w, mean, rstd, dinp_sums=True)
            be.matmul_backward(None, None, bias, dinp, None, lin, db_sums=sums)
        cands = (("separate kernels", separate), ("one pass", onepass))
        outs = []
        for name, fn in cands:
            dinp[...], dw[...], db[...], bias[...] = d0, 0, 0, 0
            fn()
            cp.cuda.Device().synchronize()
            outs.append([cp.asnumpy(a).astype(np.float32) for a in (dinp, dw, db, bias)])
        nb = 4 * rows * C * 2  # x, dout, dinp read, dinp written: what one pass must move
        for (name, fn), o in zip(cands, outs):
            err = max(float(np.linalg.norm(u - v) / np.linalg.norm(u)) for u, v in zip(outs[0], o)
                      if np.linalg.norm(u) > 0)
            row("norm_fused", f"layernorm {name}", graph_timed(cp, be, fn, args.reps), nb, rows=rows, C=C,
                rel_err_vs_separate=round(err, 6), plan=plan(rows, C, 2))


def adamw_rows(row, timed, cp, k_adam, fn, grid, aargs, args, nbytes, n, pgmv, bf):
    p, g, m, v = pgmv
    row("adamw", "shipped adamw_bf16_moments", timed(cp, lambda: k_adam.adamw_bf16_moments(grid, (256,), aargs),
                                                     args.reps), nbytes, n=n)
    row("adamw", "adamw_cheaphash (bound)", timed(cp, lambda: fn[f"adamw_cheaphash<{bf}>"](grid, (256,), aargs),
                                                 args.reps), nbytes, n=n)
    row("adamw", "adamw_lb6 (shipped, 40 registers)", timed(cp, lambda: fn["adamw_lb6"](grid, (256,), aargs),
                                                          args.reps), nbytes, n=n)
    row("adamw", "adamw_traffic (HBM floor)", timed(cp, lambda: fn["adamw_traffic"](grid, (256,), (p, g, m, v, np.int64(n))),
                                                   args.reps), nbytes, n=n)



def gelu_rows(row, timed, cp, k_gelu, k_mm, d, x, part, db, cgrid, chunks, M, C, args):
    """Recompute 1's GELU: the forward kernel then the backward (with its bias sums), as shipped until
    2026-11-30, against the backward writing the recomputed output itself (one read of x fewer)."""
    g = cp.empty_like(x)

    def fin():
        k_mm.colsum_finalize((cdiv(C, 128),), (128,), (db, part, np.int32(chunks), np.int32(C), np.int32(C),
                                                       np.int32(1)))

    def two():
        k_gelu.gelu_forward((cdiv(M * C // 8, 256),), (256,), (g, x, np.int64(M * C)))
        k_gelu.gelu_backward_colsum(cgrid, (256,), (part, d, x, np.uint64(0), np.int32(M), np.int32(C),
                                                    np.int32(256)))
        fin()

    def fused():
        k_gelu.gelu_backward_colsum(cgrid, (256,), (part, d, x, g, np.int32(M), np.int32(C), np.int32(256)))
        fin()
    for name, f, nb in (("gelu_forward + backward_colsum", two, 5 * M * C * 2),
                        ("backward_colsum redo", fused, 4 * M * C * 2)):
        row("gelu_redo", name, timed(cp, f, args.reps), nb, M=M, C=C)


def swiglu_rows(row, timed, cp, rng, T, args):
    """Recompute 1's SwiGLU on Llama 3.2 1B's MLP (B*T = 16384 rows, F = 8192): forward then backward against the
    backward writing the recomputed output itself."""
    from llmpy.backends.cuda.runtime import module
    k = module("swiglu", "bf16")
    N, F = 16384, 8192
    x = cp.asarray(rng.standard_normal((N, 2 * F), dtype=np.float32)).astype(T)
    dy = cp.asarray(rng.standard_normal((N, F), dtype=np.float32)).astype(T)
    dx, out = cp.empty_like(x), cp.empty_like(dy)
    n, grid = np.int64(N * F), (cdiv(N * F // 8, 256),)

    def two():
        k.swiglu_forward(grid, (256,), (out, x, n, np.int32(F)))
        k.swiglu_backward(grid, (256,), (dx, x, dy, np.uint64(0), n, np.int32(F)))

    def fused():
        k.swiglu_backward(grid, (256,), (dx, x, dy, out, n, np.int32(F)))
    for name, f, nb in (("swiglu forward + backward", two, 9 * N * F * 2), ("backward redo", fused, 6 * N * F * 2)):
        row("swiglu_redo", name, timed(cp, f, args.reps), nb, N=N, F=F)


def norm_rows(row, timed, cp, rng, T, common, cc, base, args):
    """The shipped norm row kernels, plain (one pack a lane at a time) and `_batched` (four), against --baseline's:
    LayerNorm at d12's and d48's rows, RMSNorm at Llama 1B's."""
    from llmpy.backends.cuda.runtime import module
    bf = "__nv_bfloat16"
    names = {"layernorm": ["layernorm_backward_dinp", "fused_residual_layernorm_forward"],
             "rmsnorm": ["rmsnorm_backward_dinp", "fused_residual_rmsnorm_forward"]}

    def baseline(path):
        src = path.read_text().replace('#include "common.cuh"', common)
        exprs = [f"{k}<{bf}>" for k in names[path.stem]]
        mod = cp.RawModule(code=src, options=("-std=c++17", f"-arch=sm_{cc}"), name_expressions=exprs)
        return {e.split("<")[0]: mod.get_function(e) for e in exprs}
    for fam, shapes in (("layernorm", ((65536, 768), (8192, 1600))), ("rmsnorm", ((16384, 2048),))):
        shipped = module(fam, "bf16")
        bwd, fwd = names[fam]
        mods = {"baseline": baseline(base / f"{fam}.cu"),
                "plain": {bwd: getattr(shipped, bwd), fwd: getattr(shipped, fwd)},
                "batched": {bwd: getattr(shipped, bwd + "_batched"),
                            fwd: getattr(shipped, fwd + ("_batched" if fam == "layernorm" else ""))}}
        for rows, C in shapes:
            def arr():
                return cp.asarray(rng.standard_normal((rows, C), dtype=np.float32)).astype(T)
            x, dy, di0, x2 = arr(), arr(), arr(), arr()
            w, b = cp.asarray(rng.standard_normal(C, dtype=np.float32)).astype(T), cp.zeros(C, T)
            mean0 = cp.asarray(rng.standard_normal(rows, dtype=np.float32) * 0.1)
            rstd0 = cp.asarray(rng.random(rows, dtype=np.float32) + 0.5)
            mean, rstd = mean0.copy(), rstd0.copy()
            di, res, out = cp.empty_like(di0), cp.empty_like(x), cp.empty_like(x)
            grid, blk = (cdiv(rows, 8),), (256,)
            if fam == "layernorm":
                bargs = (di, dy, x, w, mean, rstd, np.int32(rows), np.int32(C))
                fargs = (res, out, mean, rstd, x, x2, w, b, np.int32(rows), np.int32(C))
            else:
                bargs = (di, dy, x, w, rstd, np.int32(rows), np.int32(C))
                fargs = (res, out, rstd, x, x2, w, np.float32(1e-5), np.int32(rows), np.int32(C))
            want = None
            for label, k in mods.items():
                di[...], mean[...], rstd[...] = di0, mean0, rstd0  # the forward overwrites the statistics
                k[bwd](grid, blk, bargs)
                k[fwd](grid, blk, fargs)
                got = [cp.asnumpy(a).view(np.uint16) for a in (di, res, out)] + [cp.asnumpy(mean), cp.asnumpy(rstd)]
                same = want is None or all(np.array_equal(a, b) for a, b in zip(got, want))
                want = want if want is not None else got
                nb = 4 * rows * C * 2  # three reads and a write of (rows, C) either way
                row(fam, f"{bwd} {label}", timed(cp, lambda: k[bwd](grid, blk, bargs), args.reps), nb, rows=rows,
                    C=C, bitwise_same=bool(same))
                row(fam, f"{fwd} {label}", timed(cp, lambda: k[fwd](grid, blk, fargs), args.reps), nb, rows=rows,
                    C=C)


if __name__ == "__main__":
    sys.exit(main())
