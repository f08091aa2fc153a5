"""Every plan cuDNN offers for the attention backward at the benchmark shapes, deterministic and not: time,
workspace, whether two runs give the same bits, and how far each plan's gradients are from the default plan's.

    python dev/attention_plans.py [--shapes d12,d48,llama1b] [--reps 10] [--json out.json]

The model uses the first plan that builds (heuristic modes A then FALLBACK; llmpy/backends/cuda/attention.py); this
lists the modes A, B and FALLBACK together, to see whether a faster deterministic plan exists. Times: CUDA events
around `reps` back-to-back executions after one warm-up, median of 3 such groups.

Measured 2026-11-30 on one H200 (cuDNN 9.19): the model's plan is the fastest deterministic one, and the fastest
non-deterministic plan is only 7-16% faster (d12 1.031 vs 1.104 ms a layer); details in docs/performance.md.
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

SHAPES = {"d12": (64, 1024, 12, 12, 64), "d48": (8, 1024, 25, 25, 64), "llama1b": (8, 2048, 32, 8, 64)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="d12,d48,llama1b")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import cupy as cp
    import cudnn
    from llmpy.backends.cuda.attention import CudnnAttention
    from llmpy.backends.cuda.runtime import bf16_dtype
    bf = bf16_dtype()
    rng = np.random.default_rng(0)
    res = {"device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), "cudnn": int(cudnn.backend_version()),
           "rows": []}
    for name in args.shapes.split(","):
        B, T, NH, K, hs = SHAPES[name]
        att = CudnnAttention(cp, B, T, NH, K, hs)
        W, C = (NH + 2 * K) * hs, NH * hs
        qkv = cp.asarray(rng.standard_normal((B, T, W), dtype=np.float32)).astype(bf)
        out, stats = cp.empty((B, T, C), bf), cp.empty((B, NH, T), np.float32)
        dout = cp.asarray(rng.standard_normal((B, T, C), dtype=np.float32) * 0.1).astype(bf)
        att.forward(out, stats, qkv)
        ref = None
        for det in (True, False):
            g, (q, k, v, o, do, st, dq, dk, dv) = att.backward_graph(det, [cudnn.heur_mode.A, cudnn.heur_mode.B,
                                                                         cudnn.heur_mode.FALLBACK])
            ko, vo = att._offsets(2)
            for i in range(g.get_execution_plan_count()):
                row = {"shape": name, "deterministic": det, "index": i}
                try:
                    g.build_plan_at_index(i)
                    row["plan"] = g.get_plan_name_at_index(i)
                    ws = cp.empty(max(int(g.get_workspace_size_plan_at_index(i)), 1), cp.uint8)
                except Exception as e:  # a plan the backend declines for this graph
                    row["declined"] = str(e).splitlines()[0][:160]
                    res["rows"].append(row)
                    print(f"{name} det={det} plan {i}: declined ({row['declined']})", flush=True)
                    continue
                dqkv = cp.zeros((B, T, W), bf)
                p, dp = qkv.data.ptr, dqkv.data.ptr
                pack = {q: p, k: p + ko, v: p + vo, o: out.data.ptr, do: dout.data.ptr, st: stats.data.ptr,
                        dq: dp, dk: dp + ko, dv: dp + vo}
                att._bind()

                def run():
                    g.execute_plan_at_index(pack, ws.data.ptr, i, handle=att.handle)
                run()
                first = dqkv.copy()
                a, b, ts = cp.cuda.Event(), cp.cuda.Event(), []
                for _ in range(3):
                    a.record()
                    for _ in range(args.reps):
                        run()
                    b.record()
                    b.synchronize()
                    ts.append(cp.cuda.get_elapsed_time(a, b) / args.reps)
                got = cp.asnumpy(dqkv).view(np.uint16)
                row.update(ms=round(statistics.median(ts), 4), workspace_mb=round(ws.nbytes / 2**20, 1),
                           repeatable=bool(np.array_equal(got, cp.asnumpy(first).view(np.uint16))))
                g32 = cp.asnumpy(dqkv.astype(np.float32))
                if ref is None:
                    ref = g32
                row["rel_diff_vs_first"] = float(np.linalg.norm(g32 - ref) / np.linalg.norm(ref))
                res["rows"].append(row)
                print(f"{name} det={det} plan {i} {row['plan']}: {row['ms']:.3f} ms, ws {row['workspace_mb']} MB, "
                      f"repeatable {row['repeatable']}, rel diff {row['rel_diff_vs_first']:.1e}", flush=True)
        cp.get_default_memory_pool().free_all_blocks()
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
