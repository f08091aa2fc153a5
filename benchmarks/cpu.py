"""CPU training throughput: llmpy's NumPy reference vs PyTorch eager, same model, batch and optimizer.

    python benchmarks/cpu.py [--configs l4h4c256t256,d6] [--batch 8] [--seq 256] [--steps 4] [--rounds 2]
                             [--threads 2]

Each side runs a full training step (forward, backward, global-norm clip 1.0, AdamW with weight decay) on the same
random tokens, in a process of its own (the idle thread pools of OpenBLAS and of PyTorch's OpenMP spin and would
slow each other); two warm-up steps are dropped and the median step time of a process is its measurement. The
sides alternate for --rounds rounds (llmpy first in even rounds, PyTorch first in odd ones) and each side keeps
its best measurement: on a shared (virtual) machine the speed drifts by tens of percent over minutes, and the best
of a few alternating runs compares the two sides at the same, least disturbed, machine speed. Prints a Markdown
table with the ratio llmpy / PyTorch (> 1: llmpy is faster).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="l2h2c128t256,l4h4c256t256,d6,d12")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per process (after 2 warm-up steps)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating runs per side; each side keeps its best")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--side", choices=["llmpy", "torch"], help=argparse.SUPPRESS)  # internal: one measurement
    ap.add_argument("--config", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.side:
        print(json.dumps(measure(args)))
        return
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads))
    rows = []
    for name in args.configs.split(","):
        runs = {"llmpy": [], "torch": []}
        for r in range(args.rounds):
            for side in ("llmpy", "torch") if r % 2 == 0 else ("torch", "llmpy"):
                cmd = [sys.executable, __file__, "--side", side, "--config", name, "--batch", str(args.batch),
                       "--seq", str(args.seq), "--steps", str(args.steps), "--threads", str(args.threads)]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if out.returncode:
                    sys.exit(f"{side} {name} failed:\n{out.stderr[-2000:]}")
                res = json.loads(out.stdout.strip().splitlines()[-1])
                runs[side].append(res["step_s"])
        tok = args.batch * args.seq
        a, b = min(runs["llmpy"]), min(runs["torch"])
        rows.append((name, res["params_m"], tok / a, tok / b, b / a))
        ms = {k: " ".join(f"{t * 1e3:.0f}" for t in v) for k, v in runs.items()}
        print(f"{name}: llmpy {a * 1e3:.0f} ms/step (runs: {ms['llmpy']}), PyTorch {b * 1e3:.0f} ms/step "
              f"(runs: {ms['torch']}), ratio {b / a:.2f}x", flush=True)
    import numpy
    import torch
    print(f"\n{time.strftime('%Y-%m-%d')}, {cpu_name()}, {args.threads} threads, numpy {numpy.__version__}, "
          f"torch {torch.__version__}, B={args.batch} T={args.seq}, fp32, AdamW + clip, best of {args.rounds} "
          f"alternating runs of the median of {args.steps} steps")
    print("| config | params (M) | llmpy tok/s | PyTorch eager tok/s | llmpy / PyTorch |")
    print("|---|---|---|---|---|")
    for name, n, a, b, r in rows:
        print(f"| {name} | {n:.1f} | {a:,.0f} | {b:,.0f} | {r:.2f}x |")


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def measure(args) -> dict:
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from llmpy.config import config_from_name
    cfg = config_from_name(args.config)
    B, T = args.batch, args.seq
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, cfg.vocab_size, (B, T + 1)).astype(np.int32) for _ in range(4)]
    if args.side == "llmpy":
        from llmpy.backends import get_backend
        from llmpy.models.gpt2 import GPT2
        from llmpy.optim import AdamW
        model = GPT2(cfg, get_backend("cpu"), B, T)
        model.init_weights(0)
        opt = AdamW(model, weight_decay=0.1)

        def step(i):
            b = batches[i % 4]
            model.zero_grad()
            model.forward(b[:, :-1], b[:, 1:], grad_scale=1.0 / (B * T))
            model.backward()
            opt.step(1e-4, grad_clip=1.0)
    else:
        import torch

        from benchmarks.torch_gpt2 import TorchGPT2
        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        ref = TorchGPT2(cfg)
        topt = ref.optimizer(1e-4, (0.9, 0.95), 1e-8, 0.1)
        tb = [torch.tensor(b, dtype=torch.long) for b in batches]

        def step(i):
            b = tb[i % 4]
            topt.zero_grad(set_to_none=True)
            _, loss = ref(b[:, :-1], b[:, 1:])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
            topt.step()
    for i in range(2):
        step(i)
    ts = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        step(i)
        ts.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(ts), "params_m": cfg.num_params() / 1e6}


if __name__ == "__main__":
    main()
