"""Data-parallel scaling on one host: tokens/s of `llmpy launch --nproc-per-node N -- train` against one GPU, and
the per-rank memory plan for each ZeRO stage, in one run.

    python benchmarks/gpu_scaling.py --model d12 --batch 64 --seq 1024 --gpus 2 [--steps 30] [--zero 0,1,2]

Random tokens (a temporary shard); tokens/s is the median over the steps after the first 10 from metrics.jsonl
(global tokens per step / step time, as the trainer logs it).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(n, args, data, out, zero):
    cmd = [sys.executable, "-m", "llmpy"]
    if n > 1:
        cmd += ["launch", "--nproc-per-node", str(n), "--"]
    cmd += ["train", "--init", args.model, "--train-data", str(data), "--batch-size", str(args.batch), "--seq-len",
            str(args.seq), "--steps", str(args.steps), "--val-every", "0", "--sample-tokens", "0", "--no-progress",
            "--out", str(out), "--device", "cuda", "--checkpoint-every", "0", "--zero", str(zero)]
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    ev = [json.loads(x) for x in open(out / "metrics.jsonl")]
    tps = statistics.median(e["tokens_per_s"] for e in ev if "tokens_per_s" in e and e["step"] > 10)  # steps done
    plan = re.search(r"memory plan: (.*)", p.stdout).group(1)
    peak = re.search(r"peak GPU memory held: ([\d.]+) GiB", p.stdout)
    return tps, plan, float(peak.group(1)) if peak else float("nan")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="d12")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--zero", default="0,1,2")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from llmpy.data.shards import write_shard
    rows = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        n_tok = args.batch * args.seq * args.gpus * (args.steps + 2) + 1
        write_shard(d / "rand_000.bin", np.random.default_rng(0).integers(0, 50257, n_tok).astype(np.uint16))
        one, plan1, peak1 = run(1, args, d / "rand_000.bin", d / "one", 0)
        rows.append(("1 GPU", 0, one, 1.0, plan1, peak1))
        for z in (int(x) for x in args.zero.split(",")):
            tps, plan, peak = run(args.gpus, args, d / "rand_000.bin", d / f"z{z}", z)
            rows.append((f"{args.gpus} GPUs", z, tps, tps / one, plan, peak))
    print(f"\n{time.strftime('%Y-%m-%d')}  GPT-2 {args.model}, B={args.batch} per GPU, T={args.seq}, bf16")
    print("| run | ZeRO | tok/s | vs 1 GPU | peak GiB per GPU | per-rank memory plan |")
    print("|---|---|---|---|---|---|")
    for name, z, tps, r, plan, peak in rows:
        print(f"| {name} | {z} | {tps:,.0f} | {r:.2f}x | {peak:.2f} | {plan} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
