"""Per-shape time of the packed BitLinear decode kernel (batch 1), each shape's calls recorded back to back in one
CUDA graph, so a call's time includes the graph's gap between kernels as a decode token's graph does. Shapes: those
of one MatMul-free layer (i, f, g, o: d x d; the GLU's gate/up: 2I x d; down: d x I) and the LM head (V x d), and
i/f/g as one launch (bitlinear_packed_forward3) next to three single calls. Prints a table and the per-token sum
(24 layers' worth) that it predicts for the BitLinears. --rows 2-8 times each call through unpack + int8 GEMM as
well (the path for more rows than backends/cuda/mmfree.py's _DECODE_ROWS); --prefill N times that path at N rows,
and the unpacking alone against the earlier byte-a-thread unpack kernel (OLD_UNPACK, checked to write the same bytes
first).

    python dev/mmfree_decode_kernels.py [--model mmfree:1.3b] [--packing base3] [--calls 48] [--rows 1,8] [--prefill 2048]

Absolute times only mean anything on the GPU, with its date. Measured 2026-11-29 on one H200 (1.3B, base3): the grid
capped at the resident blocks 18.26 us a gate/up call vs 23.74 uncapped, i, f, g in one launch 12.08 us vs 19.69 for
three calls: both adopted (docs/performance.md). 2026-12-07, one H100, --rows 1,2,4,8 --prefill 2048: unpack + GEMM
faster than the kernel at 8 rows, slower at 2 and 4 (_DECODE_ROWS set to 4); the 8-columns-a-thread unpacking no
faster than the byte-a-thread one."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# The unpack kernel before its 8-columns-a-thread form (one thread per code byte, byte stores), timed beside the
# shipped one on the same codes after checking both write the same bytes.
OLD_UNPACK = r"""
extern "C" __global__ void unpack_bytewise(signed char* qw, const unsigned char* codes, int N, int K, int nb, int per) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)N * nb) return;
    const long long n = i / nb;
    const int b = (int)(i % nb);
    unsigned int c = codes[i];
    for (int j = 0, k = b * per; j < per && k < K; j++, k++) {
        int t;
        if (per == 5) { t = (int)(c % 3u) - 1; c /= 3u; }
        else { t = (int)(c & 3u); t = t == 3 ? -1 : t; c >>= 2; }
        qw[n * K + k] = (signed char)t;
    }
}
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mmfree:1.3b")
    ap.add_argument("--packing", default="base3", choices=["base3", "2bit"])
    ap.add_argument("--calls", type=int, default=48, help="calls per graph")
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--rows", default="1", help="comma-separated row counts (tokens a call); above 1 the table "
                    "also times each shape through unpack + int8 GEMM (the path for more rows than _DECODE_ROWS)")
    ap.add_argument("--prefill", type=int, default=0, help="also time the unpack + GEMM path at this many rows "
                    "(a prompt's prefill), and the unpacking alone")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import cupy as cp
    import numpy as np

    from llmpy.backends import get_backend
    from llmpy.config import config_from_name

    cfg = config_from_name(args.model)
    d, I, V, L = cfg.channels, cfg.ffn_hidden, cfg.vocab_size, cfg.num_layers
    be = get_backend("cuda", "bf16")
    per = {"base3": 5, "2bit": 4}[args.packing]
    rng = np.random.default_rng(0)
    T = be.act_dtype

    def bl(N, K, M=1):
        nb = -(-K // per)
        codes = be.asarray(rng.integers(0, 243 if per == 5 else 256, (N, nb)).astype(np.uint8))
        x = be.asarray(rng.standard_normal((M, K)).astype(np.float32).astype(T))
        g = be.asarray((1 + 0.1 * rng.standard_normal(K)).astype(np.float32).astype(T))
        out, rstd = be.zeros(M * N, T).reshape(M, N), be.zeros(M, np.float32)
        return dict(out=out, rstd=rstd, x=x, codes=codes, g=g, K=K)

    def one(b):
        return lambda: be.bitlinear_packed_forward(b["out"], b["rstd"], b["x"], b["codes"], 0.5, b["K"], args.packing,
                                                   b["g"], cfg.norm_eps)

    def timed(fn):
        fn()  # sizes scratch, compiles
        graph = be.capture(lambda: [fn() for _ in range(args.calls)])
        graph()
        cp.cuda.runtime.deviceSynchronize()
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record(be.stream)
        for _ in range(args.replays):
            graph()
        b.record(be.stream)
        b.synchronize()
        return cp.cuda.get_elapsed_time(a, b) * 1e3 / (args.replays * args.calls)  # us per call

    shapes = [("i/f/g/o", d, d, 4 * L), ("gate/up", 2 * I, d, L), ("down", d, I, L), ("head", V, d, 1)]
    print(f"{args.model} {args.packing}, {time.strftime('%Y-%m-%d')}, {cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}")
    from llmpy.backends.cuda import mmfree as M
    M._DECODE_ROWS = 8  # the kernel's own limit: timed at every row count, whatever the models route to it
    capped = M._DECODE_BLOCKS_PER_SM
    mm = be.mmfree
    for rows in (int(r) for r in args.rows.split(",")):
        print(f"\n{rows} row(s) a call")
        print(f"{'BitLinear':<10} {'N':>6} {'K':>6} {'us/call':>8} {'calls/token':>11} {'us/step':>9}")
        total = total_gemm = 0.0
        for name, N, K, n in shapes:
            b = bl(N, K, rows)
            M._DECODE_BLOCKS_PER_SM = 10 ** 6  # one warp an output, N / 8 blocks (the grid as before the cap)
            flat = timed(one(b))
            M._DECODE_BLOCKS_PER_SM = capped
            us = timed(one(b))
            total += us * n
            extra = f"(grid uncapped: {flat:.2f} us"
            if rows > 1:  # the same call through unpack + GEMM
                mm._decode = lambda *a, **k: False
                gemm = timed(one(b))
                del mm._decode
                total_gemm += gemm * n
                extra += f"; unpack + GEMM: {gemm:.2f} us"
            print(f"{name:<10} {N:>6} {K:>6} {us:>8.2f} {n:>11} {us * n:>9.1f}   {extra})")
        print(f"BitLinears a step of {rows} row(s): {total / 1e3:.3f} ms" +
              (f"; through unpack + GEMM {total_gemm / 1e3:.3f} ms" if rows > 1 else ""))
    if args.prefill:
        print(f"\nprefill, {args.prefill} rows: unpack + GEMM a call, and the unpacking alone (shipped; the earlier "
              f"byte-a-thread kernel)")
        kb, total = be.mmfree.kb, 0.0
        old_unpack = cp.RawModule(code=OLD_UNPACK).get_function("unpack_bytewise")
        for name, N, K, n in shapes[:3]:
            b = bl(N, K, args.prefill)
            nb = b["codes"].shape[1]
            qw, qw_old = be.zeros(N * K, np.int8), be.zeros(N * K, np.int8)
            us = timed(one(b))
            sw = be.zeros(1, np.float32)
            new = lambda: kb.bitlinear_unpack((M.cdiv(N * K // 8, 256),), (256,), (  # noqa: E731
                qw, sw, b["codes"], np.float32(0.5), np.int32(N), np.int32(K), np.int32(nb), np.int32(per)))
            old = lambda: old_unpack((M.cdiv(N * nb, 256),), (256,), (  # noqa: E731
                qw_old, b["codes"], np.int32(N), np.int32(K), np.int32(nb), np.int32(per)))  # on be.stream (current)
            new(), old()
            if not bool(cp.array_equal(qw, qw_old)):
                raise SystemExit(f"{name}: the shipped unpack and the earlier one disagree")
            unpack, unpack_old = timed(new), timed(old)
            total += us * n
            print(f"{name:<10} {N:>6} {K:>6} {us:>8.1f} us   unpack {unpack:.1f} us ({N * K / unpack / 1e3:.0f} GB/s "
                  f"written), earlier kernel {unpack_old:.1f} us ({unpack_old / unpack:.2f}x)")
        print(f"the layers' BitLinears, {args.prefill} rows: {total / 1e3:.3f} ms")
    if hasattr(be, "bitlinear_packed_forward3"):
        bs = [bl(d, d) for _ in range(3)]
        three = timed(lambda: [one(b)() for b in bs])  # us per three calls
        fused = timed(lambda: be.bitlinear_packed_forward3(
            [b["out"] for b in bs], bs[0]["rstd"], bs[0]["x"], [b["codes"] for b in bs], [0.5, 0.6, 0.7], d,
            args.packing, [b["g"] for b in bs], cfg.norm_eps))
        print(f"i, f, g: three calls {three:.2f} us, one launch {fused:.2f} us ({three / fused:.2f}x); per token "
              f"-{(three - fused) * L / 1e3:.3f} ms")


if __name__ == "__main__":
    main()
