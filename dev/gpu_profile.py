"""Where a GPU training step spends its time: every backend op of one eager step timed with CUDA events.

    python dev/gpu_profile.py --model d12 --batch 64 --seq 1024 [--recompute 0]
    python dev/gpu_profile.py --model llama3.2:1b --batch 8 --seq 2048 --recompute 1

The step runs eagerly (no graph) after two warm-up steps; each op call is bracketed by events on the stream, so
the table shows device time per op family (launch gaps between ops are not counted; the last line compares the
sum with the step's wall time under graph replay).
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# every op of the declared set that runs on the device during a step (the model's and the optimizer's)
OPS = ["encoder_forward", "encoder_backward", "layernorm_forward", "fused_residual_layernorm_forward",
       "layernorm_backward", "rmsnorm_forward", "fused_residual_rmsnorm_forward", "rmsnorm_backward",
       "rope_forward", "rope_backward", "swiglu_forward", "swiglu_backward", "matmul_forward", "matmul_backward",
       "gelu_forward", "attention_forward", "attention_backward", "fused_classifier", "loss_accumulate",
       "grad_sumsq", "norm_from_sumsq", "adamw", "fill_zero", "copy_"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="d12")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--recompute", type=int, default=0)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import cupy
    import numpy as np

    from llmpy.backends import get_backend
    from llmpy.config import config_from_name, family_of
    from llmpy.train.optim import AdamW
    from llmpy.train.step import TrainStep
    cfg = config_from_name(args.model)
    B, T = args.batch, args.seq
    be = get_backend("cuda", "bf16")
    model = family_of(cfg).model(cfg, be, B, T, recompute=args.recompute)
    model.init_weights(0)
    opt = AdamW(model, weight_decay=0.1)
    st = TrainStep(model, opt, 1, grad_clip=1.0, graph=False)
    w = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T + 1)).astype(np.int32)
    batch = [(w[:, :-1], w[:, 1:])]
    for _ in range(2):
        st.run(batch, 1e-4)
    records = []

    def wrap(name, fn):
        def timed(*a, **k):
            e0, e1 = cupy.cuda.Event(), cupy.cuda.Event()
            e0.record(be.stream)
            r = fn(*a, **k)
            e1.record(be.stream)
            key = name
            if name.startswith("matmul"):
                w_ = a[2] if name == "matmul_forward" else a[5]
                key = f"{name} {tuple(w_.shape)}" + (" +gelu" if k.get("gelu_pre") is not None else "")
            records.append((key, e0, e1))
            return r
        return timed

    originals = {n: getattr(be, n) for n in OPS}
    for n, f in originals.items():
        setattr(be, n, wrap(n, f))
    be.synchronize()
    t0 = time.perf_counter()
    st.run(batch, 1e-4)
    be.synchronize()
    eager = time.perf_counter() - t0
    for n, f in originals.items():
        setattr(be, n, f)
    per = defaultdict(lambda: [0.0, 0])
    for key, e0, e1 in records:
        per[key][0] += cupy.cuda.get_elapsed_time(e0, e1)
        per[key][1] += 1
    total = sum(v[0] for v in per.values())
    graph_st = TrainStep(model, opt, 1, grad_clip=1.0, graph=True)
    for _ in range(3):
        graph_st.run(batch, 1e-4)
    ts = []
    for _ in range(10):
        t0 = time.perf_counter()
        graph_st.run(batch, 1e-4)
        ts.append(time.perf_counter() - t0)
    step = sorted(ts)[len(ts) // 2]
    print(f"{args.model} B={B} T={T} bf16 recompute={args.recompute}: one eager step, device time per op")
    print("| op | calls | ms | % of op time |")
    print("|---|---|---|---|")
    for key, (ms, n) in sorted(per.items(), key=lambda kv: -kv[1][0]):
        print(f"| {key} | {n} | {ms:.2f} | {100 * ms / total:.1f}% |")
    print(f"sum of op times {total:.1f} ms; eager step wall {eager * 1e3:.1f} ms; graph-replayed step wall "
          f"{step * 1e3:.1f} ms (median of 10)")


if __name__ == "__main__":
    main()
