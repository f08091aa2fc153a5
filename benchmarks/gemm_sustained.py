"""Does --tune-gemm choose by the wrong clock? A training step on an H200 runs at its 700 W power limit (2026-11-30:
~690 W, SM clock ~1650 MHz of 1980 during d48's steps), while the tuner times each candidate with a few separate
launches on an otherwise idle GPU, at full clock. Under a power limit the time of a product is set by the energy
it needs, not by its time at full clock; the two rankings may differ. For each product shape of a GPT-2 d48 step
(B=8, T=1024) this times the heuristic's candidates both ways:

- burst: as Gemm._time (one warm-up, then the median of up to 15 single launches, each synchronized);
- sustained: back-to-back launches for --window seconds after --settle seconds of the same kernel, with the GPU
  held at its power limit; two rounds over the candidates, the better round counted.

and reports, per shape, the burst choice, the sustained choice and what the step would gain (calls a step x the
sustained time difference). An exploration: nothing in llmpy changes unless it pays in the step.

Ran once (2026-11-30, docs/device/round8_2026-11-30/run2): the sustained choices sum 121.10 ms against 122.31 for
the burst choices (-1.2 ms a step; 6 of 15 shapes chose otherwise). Caveat of this version: the first candidate's
first window follows a second of idle and a burst, so it may run cooler than the rest (most sustained choices
were candidate 0). A tuner mode built on it (candidates timed back to back, rounds rotated, after 0.1 s of heat)
then measured in the step against the burst tuner, one run each: -1.6 ms (166.3 vs 167.9) and +0.5 ms (163.1
vs 162.6): no gain beyond the runs' noise, and ~45 s more tuning; not kept (NOTES.md, round 8).

    python benchmarks/gemm_sustained.py [--window 0.15] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

L, BT, C, V = 48, 8192, 1600, 50304
# (name, calls a step, M, N, K, transx, transy, epilogue, bias): out (M, N) = op(x) (M, K) @ op(y) (K, N), as Gemm.mm
SHAPES = [
    ("qkv fwd", L, BT, 3 * C, C, False, True, "default", True),
    ("attproj fwd", L, BT, C, C, False, True, "default", True),
    ("fc fwd +gelu", L, BT, 4 * C, C, False, True, "gelu", True),
    ("fcproj fwd", L, BT, C, 4 * C, False, True, "default", True),
    ("lm head fwd", 1, BT, V, C, False, True, "default", False),
    ("qkv dinp", L, BT, C, 3 * C, False, False, "default", False),
    ("attproj dinp", L, BT, C, C, False, False, "default", False),
    ("fc dinp", L, BT, C, 4 * C, False, False, "default", False),
    ("fcproj dinp", L, BT, 4 * C, C, False, False, "default", False),
    ("lm head dinp", 1, BT, C, V, False, False, "default", False),
    ("qkv dw", L, 3 * C, C, BT, True, False, "default", False),
    ("attproj dw", L, C, C, BT, True, False, "default", False),
    ("fc dw", L, 4 * C, C, BT, True, False, "default", False),
    ("fcproj dw", L, C, 4 * C, BT, True, False, "default", False),
    ("lm head dw", 1, V, C, BT, True, False, "default", False),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--window", type=float, default=0.15, help="seconds timed per candidate and round")
    ap.add_argument("--settle", type=float, default=0.05, help="seconds of the candidate before its window")
    ap.add_argument("--only", action="append", help="shape names to run (default all)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    import cupy as cp

    from benchmarks.gemm_search import planned_product
    from llmpy.backends.cuda.gemm import Gemm
    from llmpy.backends.cuda.runtime import bf16_dtype
    g = Gemm(cp, "bf16")
    g.loaded = True  # pinning: the heuristic's whole list (up to TUNE_CANDIDATES), as a tuned run asks for
    bf = bf16_dtype()
    e0, e1 = cp.cuda.Event(), cp.cuda.Event()
    rng = np.random.default_rng(0)
    rows, total = [], {"burst": 0.0, "sustained": 0.0}
    for name, calls, M, N, K, tx, ty, epi, has_bias in SHAPES:
        if args.only and name not in args.only:
            continue
        x, y, out, bias, aux, plan = planned_product(cp, g, rng, bf, M, N, K, tx, ty, epi, has_bias)
        cands = plan[4]
        keep = plan[6]

        def run(j):
            plan[6] = cands[j:j + 1].copy()
            g.mm(out, x, y, M, N, K, transx=tx, transy=ty, bias=bias, epilogue=epi, aux=aux)

        def burst(j):
            run(j)
            cp.cuda.Device().synchronize()
            ts = []
            for _ in range(15):
                e0.record()
                run(j)
                e1.record()
                e1.synchronize()
                ts.append(cp.cuda.get_elapsed_time(e0, e1))
            return float(np.median(ts))

        def sustained(j):
            t_end = time.perf_counter() + args.settle
            while time.perf_counter() < t_end:
                for _ in range(20):
                    run(j)
                cp.cuda.Device().synchronize()
            n = 0
            e0.record()
            t_end = time.perf_counter() + args.window
            while time.perf_counter() < t_end:
                for _ in range(20):
                    run(j)
                n += 20
                e1.record()
                e1.synchronize()  # keep the host at most 20 launches ahead
            return cp.cuda.get_elapsed_time(e0, e1) / n

        ok = []
        for j in range(len(cands)):
            try:
                if int(cands[j]["state"]) == 0:
                    run(j)
                    cp.cuda.Device().synchronize()
                    ok.append(j)
            except Exception:
                cp.cuda.Device().synchronize()
        time.sleep(1.0)  # cool down a little: the tuner times on a GPU that has just been idle
        b = {j: burst(j) for j in ok}
        sus = {j: [] for j in ok}
        for _ in range(2):
            for j in ok:
                sus[j].append(sustained(j))
        su = {j: min(v) for j, v in sus.items()}
        jb, js = min(b, key=b.get), min(su, key=su.get)
        gain = calls * (su[jb] - su[js])
        total["burst"] += calls * su[jb]
        total["sustained"] += calls * su[js]
        r = {"shape": name, "calls": calls, "M": M, "N": N, "K": K, "burst_ms": {str(j): round(b[j], 4) for j in ok},
             "sustained_ms": {str(j): round(su[j], 4) for j in ok}, "burst_choice": jb, "sustained_choice": js,
             "step_gain_ms": round(gain, 3)}
        rows.append(r)
        print(f"{name:14s} x{calls:2d}  burst choice {jb} ({b[jb]:.4f} ms burst, {su[jb]:.4f} sustained)  "
              f"sustained choice {js} ({b[js]:.4f} burst, {su[js]:.4f} sustained)  step gain {gain:.3f} ms", flush=True)
        print("    " + "  ".join(f"{j}: {b[j]:.4f}/{su[j]:.4f}" for j in ok), flush=True)
        plan[6] = keep
    print(f"step's products at the sustained clock: burst choices {total['burst']:.2f} ms, sustained choices "
          f"{total['sustained']:.2f} ms", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"window": args.window, "rows": rows, "total": total}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
