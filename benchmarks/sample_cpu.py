"""CPU sampling: `generate` (what `llmpy sample` runs) on small models of each family, within the model's context and
past it (where the window slides), from random weights (the time does not depend on what the weights say).

    python benchmarks/sample_cpu.py [--models gpt2:l4h4c128t128,mmfree:l4d128i352t128:packed] [--samples 3]
                                    [--tokens 300] [--threads 2] [--json out.json]

A model is a config name (`llmpy train --init`'s; the default GPT-2 is `llmpy train`'s Shakespeare model), with
`:packed` for a MatMul-free model packed to ternary codes (`llmpy convert --to ternary`) and read back. For each it
draws `--samples` samples of `--tokens` new tokens one after another from one decoder of one sequence (temperature 1,
top-k 40, seed 0, a one-token prompt; `llmpy sample --num-samples` now decodes its samples as one batch), and, for
comparison, one sample that stays inside the context. Prints a Markdown table: seconds per sample and tokens/s."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = "gpt2:l4h4c128t128,llama3:l4d128h4k2f384t128-tied,mmfree:l4d128i352t128:packed"


def load(name: str, tmp: Path):
    """(cfg, params) of random weights for `name` (a config name, `:packed` for packed ternary codes)."""
    from llmpy.config import config_from_name, family_of
    from llmpy.formats.ternary import read_ternary, write_ternary
    from llmpy.models.params import init_params
    packed = name.endswith(":packed")
    cfg = config_from_name(name.removesuffix(":packed"))
    params = init_params(family_of(cfg).spec(cfg), 0)
    if packed:
        write_ternary(tmp / "t.safetensors", cfg, params)
        cfg, params = read_ternary(tmp / "t.safetensors")
    return cfg, params


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=DEFAULT)
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=300, help="new tokens per sample (default %(default)s)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[v] = str(args.threads)  # before NumPy loads its BLAS
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from llmpy.backends import get_backend
    from llmpy.models.decode import decoder, generate

    res = {"date": time.strftime("%Y-%m-%d"), "threads": args.threads, "numpy": np.__version__, "models": {}}
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as d:
            cfg, params = load(name, Path(d))
        model = decoder(cfg, params, get_backend("cpu"))
        prompt, maxT = [0], cfg.max_seq_len
        inside = maxT - 8  # new tokens that stay inside the context
        t0 = time.perf_counter()
        generate(model, prompt, inside, rng=np.random.default_rng(0), top_k=40)
        t_in = time.perf_counter() - t0
        rng, times = np.random.default_rng(0), []
        for _ in range(args.samples):
            t0 = time.perf_counter()
            out = generate(model, prompt, args.tokens, rng=rng, top_k=40)
            times.append(time.perf_counter() - t0)
        r = {"context": maxT, "inside_tokens": inside, "inside_s": t_in, "tokens": len(out), "sample_s": times,
             "total_s": sum(times), "tok_s": args.samples * args.tokens / sum(times)}
        res["models"][name] = r
        print(f"{name}: {inside} tokens inside the context {t_in:.2f} s; {args.samples} x {args.tokens} tokens "
              f"{sum(times):.2f} s ({r['tok_s']:.1f} tok/s)", file=sys.stderr, flush=True)
    print(f"\n{res['date']}, {args.threads} threads, numpy {np.__version__}: {args.samples} samples of "
          f"{args.tokens} new tokens each (temperature 1, top-k 40)")
    print("| model | context | inside the context: tokens, s | past it: s per sample | total s | tok/s |")
    print("|---|---|---|---|---|---|")
    for name, r in res["models"].items():
        print(f"| {name} | {r['context']} | {r['inside_tokens']}, {r['inside_s']:.2f} | "
              f"{', '.join(f'{t:.2f}' for t in r['sample_s'])} | {r['total_s']:.2f} | {r['tok_s']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
