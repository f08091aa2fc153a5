"""Would the LM head gain from FP8? Its three products (logits, dX, dW) timed in bf16 (the layouts the bf16 path
uses) against FP8 on Hopper's tensor cores (e4m3 activations and weights, e5m2 gradients, both operands
K-contiguous: the "TN" form cuBLASLt's FP8 products take), one chunk of the classifier's rows at a time as the
models run it (8192 rows), for the heads of Llama 3.2 1B and GPT-2 d48 / d12; a block product of each beside them
for reference.

    python dev/fp8_products.py [--shapes llama1b,d48,d12] [--reps 7] [--json out.json]

Each product: two warm-up launches, then the median of --reps launches (CUDA events). The operands are random bytes
of finite values (no NaN or inf: the top exponent bit cleared); a product's time does not depend on the values. The
FP8 side's extra passes (the quantized, transposed copies of dlogits and of the head's input) are not in these
times: the table gives the products' ceiling on what the head can gain, and bytes of those passes beside it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROWS = 8192  # the classifier's chunk of rows (models/base.py)
# name: (C channels, V vocabulary (padded), a block product (M, N, K) for reference)
SHAPES = {"llama1b": (2048, 128256, ("gate/up", 16384, 16384, 2048)),
          "d48": (1600, 50304, ("fc", 8192, 6400, 1600)),
          "d12": (768, 50304, ("fc", 65536, 3072, 768))}


def products(C: int, V: int):
    """(name, M, N, K, bf16 layout (transx, transy), fp8 operand kinds (x e5m2, y e5m2)) of a head chunk:
    logits (R, V) = X W^T; dX (R, C) = dlogits W; dW (V, C) += dlogits^T X."""
    return [("logits", ROWS, V, C, (False, True), (False, False)),
            ("dX", ROWS, C, V, (False, False), (True, False)),
            ("dW", V, C, ROWS, (True, False), (True, False))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="llama1b,d48,d12")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    names = args.shapes.split(",")
    for n in names:
        if n not in SHAPES:
            raise SystemExit(f"unknown shape {n!r}: one of {', '.join(SHAPES)}")
    import cupy as cp

    from llmpy.backends.cuda.gemm import Gemm
    g = Gemm(cp, "bf16")
    s = cp.cuda.get_current_stream()
    e0, e1 = cp.cuda.Event(), cp.cuda.Event()
    one = cp.ones(1, cp.float32)
    dev = cp.cuda.runtime.getDeviceProperties(0)["name"]
    res = {"device": dev.decode() if isinstance(dev, bytes) else dev, "rows": ROWS, "shapes": []}
    print(f"{res['device']}: bf16 vs FP8 products, median of {args.reps} (CUDA events)")

    def rand(n: int, bits: int):  # finite random values: the exponent's top bit cleared, sign and the rest random
        if bits == 8:
            return cp.random.randint(0, 256, n, dtype=cp.uint8) & np.uint8(0xBF)
        return cp.random.randint(0, 1 << 16, n, dtype=cp.int32).astype(cp.uint16) & np.uint16(0xBFFF)

    def timed(fn) -> float:
        fn()
        fn()
        ts = []
        for _ in range(args.reps):
            e0.record(s)
            fn()
            e1.record(s)
            e1.synchronize()
            ts.append(cp.cuda.get_elapsed_time(e0, e1))
        return float(np.median(ts))

    print("| shape | product | M x N x K | bf16 ms | fp8 ms | bf16 TFLOP/s | fp8 TFLOP/s | fp8 speed |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        C, V, block = SHAPES[name]
        rows = [(f"{block[0]} (block)", block[1], block[2], block[3], (False, True), (False, False))]
        total = {"bf16": 0.0, "fp8": 0.0}
        for pname, M, N, K, (tx, ty), (xe, ye) in rows + products(C, V):
            xb, yb, ob = rand(M * K, 16), rand(N * K, 16), cp.empty(M * N, cp.uint16)
            tb = timed(lambda: g.mm(ob, xb, yb, M, N, K, transx=tx, transy=ty))
            del xb, yb
            x8, y8 = rand(M * K, 8), rand(N * K, 8)
            t8 = timed(lambda: g.mm_fp8(ob, x8, y8, M, N, K, one, one, x_e5m2=xe, y_e5m2=ye))
            del x8, y8, ob
            cp.get_default_memory_pool().free_all_blocks()
            fl = 2.0 * M * N * K
            if pname in ("logits", "dX", "dW"):
                total["bf16"] += tb
                total["fp8"] += t8
            r = {"shape": name, "product": pname, "M": M, "N": N, "K": K, "bf16_ms": tb, "fp8_ms": t8,
                 "bf16_tflops": fl / tb / 1e9, "fp8_tflops": fl / t8 / 1e9}
            res["shapes"].append(r)
            print(f"| {name} | {pname} | {M} x {N} x {K} | {tb:.3f} | {t8:.3f} | {r['bf16_tflops']:.0f} | "
                  f"{r['fp8_tflops']:.0f} | {tb / t8:.2f}x |", flush=True)
        # the FP8 side's extra traffic per chunk: dlogits (R, V) read once and written in both layouts (1 byte each;
        # its bf16 read is there already: the classifier's backward writes it), the head's input in both layouts
        extra = ROWS * V * 2 + ROWS * C * 2
        print(f"| {name} | head chunk | | {total['bf16']:.3f} | {total['fp8']:.3f} | | | {total['bf16'] / total['fp8']:.2f}x"
              f" (+ {extra / 1e9:.2f} GB of FP8 copies) |", flush=True)
        res["shapes"].append({"shape": name, "product": "head chunk", "bf16_ms": total["bf16"],
                              "fp8_ms": total["fp8"], "extra_bytes": extra})
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
