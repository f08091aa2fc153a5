"""CPU training throughput: llmpy's NumPy reference vs PyTorch eager, same model, batch and optimizer.

    python benchmarks/cpu.py [--configs l4h4c256t256,d6] [--batch 8] [--seq 256] [--steps 6] [--threads 2]

Each side runs a full training step (forward, backward, global-norm clip 1.0, AdamW with weight decay) on the same
random tokens, in a process of its own, after two warm-up steps. The two processes are kept alive side by side and
take turns, one step at a time (llmpy first in even pairs, PyTorch first in odd ones), with a pause before each
step so that the other side's idle BLAS/OpenMP threads have stopped spinning: on a shared (virtual) machine the
speed drifts by tens of percent within minutes, and interleaved steps see the same machine. Each side's median
step time gives its tokens/s; the ratio is the median of the paired ratios (> 1: llmpy is faster). Prints a
Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUIET_S = 0.3  # OpenBLAS's idle worker spins ~0.13 s after a GEMM; libgomp's threads spin less


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="l2h2c128t256,l4h4c256t256,d6,d12")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per side (after 2 warm-up steps)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--profile", metavar="CONFIG", help="per-op time of llmpy's step (GEMM time split out)")
    ap.add_argument("--side", choices=["llmpy", "torch"], help=argparse.SUPPRESS)  # internal: one side, served
    ap.add_argument("--config", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.side:
        serve(args)
        return
    if args.profile:
        profile(args)
        return
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads))
    rows = []
    for name in args.configs.split(","):
        times, ratios, params_m = compare(name, args, env)
        a, b = statistics.median(times["llmpy"]), statistics.median(times["torch"])
        r = statistics.median(ratios)
        tok = args.batch * args.seq
        rows.append((name, params_m, tok / a, tok / b, r))
        print(f"{name}: llmpy {a * 1e3:.0f} ms/step, PyTorch {b * 1e3:.0f} ms/step, ratio {r:.2f}x "
              f"(pairs {min(ratios):.2f}..{max(ratios):.2f})", flush=True)
    import numpy
    import torch
    print(f"\n{time.strftime('%Y-%m-%d')}, {cpu_name()}, {args.threads} threads, numpy {numpy.__version__}, "
          f"torch {torch.__version__}, B={args.batch} T={args.seq}, fp32, AdamW + clip, {args.steps} interleaved "
          f"steps per side (medians)")
    print("| config | params (M) | llmpy tok/s | PyTorch eager tok/s | llmpy / PyTorch |")
    print("|---|---|---|---|---|")
    for name, n, a, b, r in rows:
        print(f"| {name} | {n:.1f} | {a:,.0f} | {b:,.0f} | {r:.2f}x |")


def compare(name, args, env):
    """Both sides of one config as served processes, stepped in turn. Returns their step times, the paired
    ratios torch/llmpy and the parameter count (millions)."""
    procs, errs = {}, {}
    try:
        for side in ("llmpy", "torch"):  # built and warmed up one after the other
            cmd = [sys.executable, __file__, "--side", side, "--config", name, "--batch", str(args.batch),
                   "--seq", str(args.seq), "--threads", str(args.threads)]
            errs[side] = tempfile.TemporaryFile("w+")
            procs[side] = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                           stderr=errs[side], text=True)
            params_m = _reply(procs[side], errs[side], f"{side} {name}")["params_m"]
        times = {"llmpy": [], "torch": []}
        for i in range(args.steps):
            for side in ("llmpy", "torch") if i % 2 == 0 else ("torch", "llmpy"):
                time.sleep(QUIET_S)
                procs[side].stdin.write("step\n")
                procs[side].stdin.flush()
                times[side].append(_reply(procs[side], errs[side], f"{side} {name}")["step_s"])
        ratios = [t / l for l, t in zip(times["llmpy"], times["torch"])]
        return times, ratios, params_m
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.stdin.close()
                p.wait()


def _reply(proc, err, what) -> dict:
    line = proc.stdout.readline()
    if not line:
        err.seek(0)
        sys.exit(f"{what} failed:\n{err.read()[-2000:]}")
    return json.loads(line)


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def profile(args) -> None:
    """Runs llmpy's step with every backend method and np.matmul timed: prints ms per step for each op's GEMMs
    ('op@gemm') and the rest ('op'), largest first (an op called inside another is counted in the outer one)."""
    sys.path.insert(0, str(ROOT))
    from collections import defaultdict

    import numpy as np

    from llmpy.backends import get_backend
    from llmpy.config import config_from_name
    from llmpy.models.gpt2 import GPT2
    from llmpy.train.optim import AdamW
    cfg, B, T = config_from_name(args.profile), args.batch, args.seq
    be = get_backend("cpu")
    tot, stack, matmul = defaultdict(float), [], np.matmul

    def timed_matmul(*a, **k):
        t = time.perf_counter()
        r = matmul(*a, **k)
        dt = time.perf_counter() - t
        if stack:
            stack[-1][1] += dt
            tot[stack[-1][0] + "@gemm"] += dt
        return r

    def wrap(name, f):
        def w(*a, **k):
            ws = [x for x in a if hasattr(x, "shape") and x.ndim == 2]  # label matmuls by their weight
            key = f"{name}[{'x'.join(map(str, ws[-1].shape))}]" if name.startswith("matmul") and ws else name
            outer = not stack
            stack.append([key, 0.0])
            t = time.perf_counter()
            r = f(*a, **k)
            dt = time.perf_counter() - t
            _, gemm = stack.pop()
            if outer:
                tot[key] += dt - gemm
            return r
        return w
    for name in ("encoder_forward", "encoder_backward", "layernorm_forward", "fused_residual_layernorm_forward",
                 "layernorm_backward", "matmul_forward", "matmul_backward", "attention_forward",
                 "attention_backward", "fused_classifier", "gelu_forward", "grad_sumsq", "adamw", "fill_zero",
                 "fresh_grads", "settle_grads"):
        setattr(be, name, wrap(name, getattr(be, name)))
    np.matmul = timed_matmul
    model = GPT2(cfg, be, B, T)
    model.init_weights(0)
    opt = AdamW(model, weight_decay=0.1)
    x = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T + 1)).astype(np.int32)
    steps, total = args.steps, 0.0
    for i in range(steps + 1):
        if i == 1:
            tot.clear()
            total = 0.0
        t0 = time.perf_counter()
        be.fresh_grads(model.grads.flat)  # the gradients count as zero, as in the trainer's step (train/step.py)
        model.forward(x[:, :-1], x[:, 1:], grad_scale=1.0 / (B * T))
        model.backward()
        be.settle_grads()
        opt.step(1e-4, grad_clip=1.0)
        total += time.perf_counter() - t0
    np.matmul = matmul
    gemm = sum(v for k, v in tot.items() if k.endswith("@gemm"))
    print(f"{args.profile} B={B} T={T}, ms per step (mean of {steps}): total {total / steps * 1e3:.0f}, "
          f"GEMM {gemm / steps * 1e3:.0f}, other ops {(sum(tot.values()) - gemm) / steps * 1e3:.0f}")
    for k, v in sorted(tot.items(), key=lambda kv: -kv[1]):
        print(f"  {k:48s} {v / steps * 1e3:8.1f}")


def serve(args) -> None:
    """One side: builds the model, runs two warm-up steps, then one timed step per 'step' line on stdin."""
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
        from llmpy.train.optim import AdamW
        model = GPT2(cfg, get_backend("cpu"), B, T)
        model.init_weights(0)
        opt = AdamW(model, weight_decay=0.1)

        def step(i):
            b = batches[i % 4]
            model.be.fresh_grads(model.grads.flat)  # the gradients count as zero, as in the trainer's step
            model.forward(b[:, :-1], b[:, 1:], grad_scale=1.0 / (B * T))
            model.backward()
            model.be.settle_grads()
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
    print(json.dumps({"params_m": cfg.num_params() / 1e6}), flush=True)
    i = 2
    while sys.stdin.readline().strip() == "step":
        t0 = time.perf_counter()
        step(i)
        i += 1
        print(json.dumps({"step_s": time.perf_counter() - t0}), flush=True)


if __name__ == "__main__":
    main()
