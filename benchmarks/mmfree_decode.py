"""Batch-1 decoding of the MatMul-free LM: the packed ternary model (formats/ternary.py; our decode kernel: codes x
int8 activations, integer adds and subtracts, one rescale per output) against the latent weights (our bf16 path:
every BitLinear quantizes its weights and runs a GEMM), same GPU, same random weights, side by side in one run.

    python benchmarks/mmfree_decode.py --model mmfree:1.3b [--tokens 64] [--json out.json]

Reports tokens/s of each (median over the timed tokens, after warm-up), the resident weight bytes of each model and
of the fp32 weights, and the packed file's size. Absolute times only mean anything on the GPU, with its date."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mmfree:1.3b")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from llmpy.backends import get_backend
    from llmpy.config import config_from_name, family_of
    from llmpy.formats.ternary import read_ternary, write_ternary
    from llmpy.models.decode import decoder
    from llmpy.models.params import init_params

    cfg = config_from_name(args.model)
    t0 = time.perf_counter()
    params = init_params(family_of(cfg).spec(cfg), 0)
    with tempfile.TemporaryDirectory() as d:
        size = write_ternary(Path(d) / "t.safetensors", cfg, params)
        file_bytes = (Path(d) / "t.safetensors").stat().st_size
        _, packed = read_ternary(Path(d) / "t.safetensors")
    print(f"weights made and packed in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    be = get_backend(args.device, "bf16" if args.device == "cuda" else "fp32")
    res = {"model": args.model, "date": time.strftime("%Y-%m-%d"), "fp32_weight_bytes": size["fp32_bytes"],
           "packed_file_bytes": file_bytes}
    toks = np.random.default_rng(0).integers(0, cfg.vocab_size, args.warmup + args.tokens)
    latent = f"latent {be.dtype_name}"
    for name, w in ((latent, dict(params, wte=packed["wte"])), ("packed", packed)):
        m = decoder(cfg, w, be)
        plan = m.memory_plan()
        st = m.new_decode_state(cfg.max_seq_len)
        times = []
        for i, t in enumerate(toks):
            a = time.perf_counter()
            m.decode_step(np.array([[t]]), st)  # reads the logits back: the step is complete
            times.append(time.perf_counter() - a)
        step = statistics.median(times[args.warmup:])
        weights = plan["parameters"] + plan.get("packed ternary weights", 0)
        res[name] = {"tok_s": 1 / step, "ms_per_token": step * 1e3, "resident_weight_bytes": weights}
        print(f"{name}: {1 / step:,.1f} tok/s ({step * 1e3:.2f} ms/token), resident weights "
              f"{weights / 2**20:,.1f} MiB", file=sys.stderr)
        del m
    res["speedup"] = res["packed"]["tok_s"] / res[latent]["tok_s"]
    print(f"\n{res['date']}  {args.model} batch-1 decode on {args.device}")
    print("| | tok/s | ms/token | resident weights MiB | vs fp32 weights |")
    print("|---|---|---|---|---|")
    for name in (latent, "packed"):
        r = res[name]
        print(f"| {name} | {r['tok_s']:,.1f} | {r['ms_per_token']:.2f} | {r['resident_weight_bytes'] / 2**20:,.1f} | "
              f"1/{res['fp32_weight_bytes'] / r['resident_weight_bytes']:.1f} |")
    print(f"packed: {res['speedup']:.2f}x the tokens/s; file {file_bytes / 2**20:,.1f} MiB = 1/"
          f"{res['fp32_weight_bytes'] / file_bytes:.1f} of the fp32 weights ({res['fp32_weight_bytes'] / 2**20:,.1f} MiB)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
