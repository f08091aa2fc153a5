"""Decoding the MatMul-free LM at the hardware's pace: tokens/s and memory-bandwidth utilization (MBU) of decoding
steps at batch 1, 8, 32 and 128, and the prefill of one prompt, for three models of one size on our own path, side
by side in one run:

- packed: the ternary model as `llmpy convert --to ternary` writes it (5 codes a byte). Decoding runs batch 1 as
  one persistent kernel (MMFree.persistent_decode; --one-kernel off: the per-op kernels), our decode kernel for up
  to 4 rows (codes x int8 activations), unpack + an int8 tensor-core GEMM for more rows and for the prefill
  (--decode-rows N moves the limit to N, 1..8);
- latent: the same shape's bf16 latent weights (every BitLinear quantizes its weights, then an int8 GEMM);
- llama: a bf16 Llama 3 of about the same size (llama_like: the same layers, width, vocabulary and context; head
  size 64, 4 query heads a KV head; the FFN width that gives the same parameter count), with its KV cache.

    python benchmarks/mmfree_decode.py --model mmfree:370m,mmfree:1.3b,mmfree:2.7b [--one-kernel off] [--decode-rows 8]
        [--json out.json]
    python benchmarks/mmfree_decode.py --model mmfree:l2d64v256t32 --device cpu     # a quick check on the CPU

A decoding step (Model.decode_step, what `llmpy sample` runs) feeds B tokens at position --context (the KV caches
hold that many positions; a recurrent state is the same size at any position) and reads the logits (B, V) back to
the host; "fwd ms" is its forward alone (one CUDA graph for the MatMul-free LM). The prefill feeds a --prompt-token
prompt in one forward. Each figure is the median of the steps of a time box (--seconds, at least 3 steps, after
warm-up). Bytes a step reads: the resident weights it reads (the embedding's B rows, not its table) + the KV cache
up to the position or the recurrent states; MBU = those bytes / the step time / the GPU's peak bandwidth (H100 SXM
3.35 TB/s, H200 4.8 TB/s, from the GPU's name; --peak-gbs otherwise). "bound" compares the step with its floors:
bandwidth (bytes / peak bandwidth) and compute (2 flops a parameter a token, + attention's, at the dense int8 peak
for the ternary products and the bf16 peak for Llama's): a step within twice its larger floor is bound by it; one
further off ("neither") by what neither counts: kernel launches, host work (compare "fwd ms"), kernels far from
both peaks. Random weights (decode speed does not depend on the values). Also prints the packed tensors' size (the
packed file's, less its header) and each model's resident weights. Absolute times only mean anything on the GPU,
with its date."""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCHES = (1, 8, 32, 128)
SIDES = ("packed", "latent", "llama")
# dense peaks by GPU name (NVIDIA's datasheets): HBM bytes/s, bf16 and int8 tensor-core ops/s
PEAKS = (("H200", 4.8e12, 989e12, 1979e12), ("H100 NVL", 3.9e12, 835e12, 1671e12),
         ("H100 PCIe", 2.0e12, 756e12, 1513e12), ("H100", 3.35e12, 989e12, 1979e12))


def llama_like(cfg):
    """A Llama 3 config of cfg's (a MatMul-free LM's) size: its layers L, width d, vocabulary and context; head size
    64 (H = d / 64 heads, K = H / 4 of them KV heads); FFN width F = I + 2 d (H - K) / 3H (I + d/2): attention's
    (2 + 2K/H) d^2 and the GLU's 3 d F a layer against the MatMul-free layer's 4 d^2 + 3 d I, the same parameters
    but for the norms."""
    from llmpy.models.llama3 import LlamaConfig
    d = cfg.channels
    H = max(1, d // 64)
    K = max(1, H // 4)
    while H % K:
        K -= 1
    return LlamaConfig(max_seq_len=cfg.max_seq_len, vocab_size=cfg.vocab_size, padded_vocab_size=cfg.padded_vocab_size,
                       num_layers=cfg.num_layers, channels=d, num_heads=H, num_kv_heads=K,
                       ffn_hidden=cfg.ffn_hidden + round(2 * d * (H - K) / (3 * H)))


def llama_name(c) -> str:
    """The config name `llmpy train --init` takes for llama_like's config."""
    return (f"llama3:l{c.num_layers}d{c.channels}h{c.num_heads}k{c.num_kv_heads}f{c.ffn_hidden}v{c.vocab_size}"
            f"t{c.max_seq_len}")


def random_weights(cfg, packed: bool, seed: int = 0) -> dict:
    """Host weights of cfg's shapes at their init's scale, fast (a random pool repeated: 2.7B weights in seconds);
    with packed, the ternary ones as random valid codes (formats/ternary.py's PackedTernary, base3)."""
    import numpy as np

    from llmpy.config import family_of
    from llmpy.formats.ternary import PER_BYTE, PackedTernary
    fam, rng = family_of(cfg), np.random.default_rng(seed)
    pool = rng.standard_normal((1 << 20) + 7, dtype=np.float32)  # an odd length: rows do not repeat in step
    ternary = getattr(fam.model, "TERNARY", ()) if packed else ()
    out = {}
    for s in fam.spec(cfg):
        if s.name in ternary:
            nb = -(-s.shape[-1] // PER_BYTE["base3"])
            codes = rng.integers(0, 243, (*s.shape[:-1], nb), dtype=np.uint8)
            scale = np.full(s.shape[0] if s.per_layer else (), 30.0, np.float32)
            out[s.name] = PackedTernary(codes, scale, s.shape[-1], "base3")
        elif s.init in ("ones", "zeros"):
            out[s.name] = np.full(s.shape, 1.0 if s.init == "ones" else 0.0, np.float32)
        else:
            out[s.name] = np.resize(pool, s.shape) * np.float32(s.std or 0.02)
            if s.vocab_rows is not None:
                out[s.name][s.vocab_rows:] = 0.0
    return out


def peaks(be, peak_gbs: float | None):
    """(the device's name, peak bytes/s, bf16 and int8 ops/s): from the GPU's name; --peak-gbs sets the bandwidth
    (the only figure for an unknown GPU or the CPU)."""
    name, bw, bf16, int8 = "cpu", None, None, None
    cp = getattr(be, "cp", None)
    if cp is not None:
        name = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"]
        name = name.decode() if isinstance(name, bytes) else name
        for key, *p in PEAKS:
            if key in name:
                bw, bf16, int8 = p
                break
    return name, (peak_gbs * 1e9 if peak_gbs else bw), bf16, int8


def timed(fn, seconds: float, warmup: int, most: int) -> tuple[float, int]:
    """(median seconds of fn(), calls timed): `warmup` calls, then calls until `seconds` have passed (at least 3,
    at most `most`). fn returns when its work is done (it reads a result back or synchronizes)."""
    for _ in range(warmup):
        fn()
    times, t0 = [], time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - t0 < seconds and len(times) < most):
        a = time.perf_counter()
        fn()
        times.append(time.perf_counter() - a)
    return statistics.median(times), len(times)


def embedding(m):
    """The token embedding table a model holds (bf16 beside a packed model's codes)."""
    return m.bf16["wte"] if "wte" in m.bf16 else m.params["wte"]


def nonembedding_params(cfg) -> int:
    """Parameters a token's products use: all but the embedding table (the head is counted)."""
    from llmpy.config import family_of
    return sum(math.prod(s.shape) for s in family_of(cfg).spec(cfg) if s.name != "wte")


def bound(t: float, bw: float | None, comp: float | None) -> str:
    """What bounds a step of t seconds whose floors are bw (its bytes at peak bandwidth) and comp (its flops at peak
    compute), None where the peak is unknown: the larger floor when t is within twice it, else "neither"."""
    known = [(f, what) for f, what in ((bw, "bandwidth"), (comp, "compute")) if f]
    if not known:
        return "-"
    f, what = max(known)
    return what if t <= 2 * f else f"neither: {t / f:.1f}x the {what} floor"


class Side:
    """One model of a shape on the device (`one`, decoding one sequence) and what a step of it reads and computes."""

    def __init__(self, side, cfg, be, args):
        from llmpy.models.decode import decoder
        self.name, self.be, self.args = side, be, args
        self.cfg = llama_like(cfg) if side == "llama" else cfg
        t0 = time.perf_counter()
        self.one = decoder(self.cfg, random_weights(self.cfg, side == "packed"), be)
        plan = self.one.memory_plan()
        self.resident = plan["parameters"] + plan.get("packed ternary weights", 0)
        emb = embedding(self.one)
        self.table_bytes, self.row_bytes = emb.nbytes, emb.nbytes // emb.shape[0]
        self.n = nonembedding_params(self.cfg)
        self.attn = self.cfg.num_layers * self.cfg.channels if side == "llama" else 0  # attention flops / 2 a position
        self.peak_ops = args.peak_bf16 if side == "llama" else args.peak_int8
        print(f"{side}: {self.cfg.describe()}, {self.n + emb.shape[0] * emb.shape[1]:,} parameters, resident "
              f"weights {self.resident / 2**20:,.1f} MiB (made and loaded in {time.perf_counter() - t0:.0f} s)",
              file=sys.stderr)

    def figures(self, t: float, nbytes: int, flops: int) -> dict:
        bw = nbytes / self.args.peak_bw if self.args.peak_bw else None
        comp = flops / self.peak_ops if self.peak_ops else None
        return {"bytes": nbytes, "mbu": bw / t if bw else None, "bound": bound(t, bw, comp)}

    def prefill(self, rng) -> dict:
        """One prompt of --prompt-tokens (at most the context) fed in one forward into a fresh state."""
        one, P = self.one, min(self.args.prompt_tokens, self.cfg.max_seq_len)
        prompt = rng.integers(0, self.cfg.vocab_size, (1, P))
        t, k = timed(lambda: one.decode_step(prompt, one.new_decode_state(P)), self.args.seconds, 1, 50)
        flops = 2 * self.n * P + 2 * self.attn * P * P  # causal attention: q k^T and p v over half the P x P
        r = {"tokens": P, "s": t, "tok_s": P / t, "tflops": flops / t / 1e12, "timed": k,
             **self.figures(t, self.resident - self.table_bytes + P * self.row_bytes, flops)}
        print(f"  prefill {P}: {P / t:,.0f} tok/s ({t * 1e3:.2f} ms, {r['tflops']:.1f} TFLOP/s)", file=sys.stderr)
        one.prefill_model(1)  # the prompt's plan goes (a 1-token plan is small)
        return r

    def decode(self, B: int, rng) -> dict:
        """Decoding steps of B rows at position --context (at most the context - 1), and their forward alone."""
        import numpy as np

        from llmpy.models.decode import KVCache, decoder
        args, be = self.args, self.be
        ctx = min(args.context, self.cfg.max_seq_len - 1)
        m = self.one if B == 1 else decoder(self.cfg, {}, be, B, weights_of=self.one)
        st = m.new_decode_state(ctx + 1)
        toks = rng.integers(0, self.cfg.vocab_size, (B, 1)).astype(np.int32)

        def step():
            st.pos = ctx  # every step at the same position: the caches hold ctx positions before it
            m.decode_step(toks, st)

        def forward():  # decode_step's forward without the logits' read-back
            st.pos = ctx
            if m.GRAPH_DECODE:
                m._decode_replay(toks, st)
            else:
                m.forward(toks, state=st)
            be.synchronize()

        t, k = timed(step, args.seconds, 3, args.steps)
        tf, _ = timed(forward, args.seconds / 2, 2, args.steps)
        # positions 0..ctx: all of a cache; a recurrent state
        state = st.k.nbytes + st.v.nbytes if isinstance(st, KVCache) else st.h.nbytes
        flops = B * (2 * self.n + 4 * self.attn * (ctx + 1))
        r = {"batch": B, "tok_s": B / t, "ms_step": t * 1e3, "ms_forward": tf * 1e3, "state_bytes": int(state),
             "timed": k, **self.figures(t, self.resident - self.table_bytes + B * self.row_bytes + state, flops)}
        mbu = f", MBU {r['mbu']:.1%}" if r["mbu"] is not None else ""
        print(f"  batch {B}: {B / t:,.1f} tok/s ({t * 1e3:.2f} ms a step, forward {tf * 1e3:.2f} ms{mbu}; "
              f"{r['bound']})", file=sys.stderr)
        return r


def measure_side(side, cfg, be, args) -> dict:
    """One side's prefill and decoding at each batch; its model is gone when this returns."""
    import numpy as np
    s, rng = Side(side, cfg, be, args), np.random.default_rng(0)
    return {"side": side, "config": llama_name(s.cfg) if side == "llama" else args.shape,
            "resident_weight_bytes": s.resident, "nonembedding_params": s.n, "prefill": s.prefill(rng),
            "decode": [s.decode(B, rng) for B in args.batches]}


def table(results) -> str:
    """The Markdown tables of one shape's results."""
    lines = ["| model | batch | tok/s | ms a step | fwd ms | MB read a step | MBU | bound |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for d in r["decode"]:
            mbu = f"{d['mbu']:.1%}" if d["mbu"] is not None else "-"
            lines.append(f"| {r['side']} | {d['batch']} | {d['tok_s']:,.1f} | {d['ms_step']:.2f} | "
                         f"{d['ms_forward']:.2f} | {d['bytes'] / 1e6:,.1f} | {mbu} | {d['bound']} |")
    lines += ["", "| model | prefill tokens | tok/s | ms | TFLOP/s | bound |", "|---|---|---|---|---|---|"]
    for r in results:
        p = r["prefill"]
        lines.append(f"| {r['side']} | {p['tokens']} | {p['tok_s']:,.0f} | {p['s'] * 1e3:.2f} | {p['tflops']:.1f} | "
                     f"{p['bound']} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mmfree:1.3b", help="MatMul-free shapes, comma-separated (default %(default)s)")
    ap.add_argument("--sides", default=",".join(SIDES), help="of packed, latent, llama (default %(default)s)")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)), help="(default %(default)s)")
    ap.add_argument("--prompt-tokens", type=int, default=2048, help="the prefill's prompt, at most the context "
                    "(default %(default)s)")
    ap.add_argument("--context", type=int, default=512, help="the position decoding steps feed (default %(default)s)")
    ap.add_argument("--seconds", type=float, default=0.5, help="time box of each figure (default %(default)s)")
    ap.add_argument("--steps", type=int, default=200, help="most steps a figure times (default %(default)s)")
    ap.add_argument("--peak-gbs", type=float, help="peak memory bandwidth in GB/s (default: from the GPU's name)")
    ap.add_argument("--device", default="cuda", help="(default %(default)s)")
    ap.add_argument("--one-kernel", choices=("default", "on", "off"), default="default",
                    help="the packed model's batch-1 step as one persistent kernel (MMFree.persistent_decode) or "
                         "the per-op kernels (default: the library's default)")
    ap.add_argument("--decode-rows", type=int, choices=range(1, 9), metavar="{1..8}",
                    help="on the GPU, the most rows a packed step sends to the decode kernel; more go through "
                         "unpack + int8 GEMM (default: the library's, backends/cuda/mmfree.py _DECODE_ROWS)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if not sides or any(s not in SIDES for s in sides):
        ap.error(f"--sides: of {', '.join(SIDES)} (got {args.sides!r})")
    try:
        args.batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        ap.error(f"--batches: integers, comma-separated (got {args.batches!r})")
    if min(args.batches) < 1 or args.prompt_tokens < 1 or args.context < 0 or args.seconds < 0 or args.steps < 3:
        ap.error("--batches and --prompt-tokens must be >= 1, --context and --seconds >= 0, --steps >= 3")
    sys.path.insert(0, str(ROOT))
    from llmpy.backends import get_backend
    from llmpy.config import config_from_name
    from llmpy.formats.ternary import packed_size
    from llmpy.models.mmfree import MMFree, MMFreeConfig
    if args.one_kernel != "default":
        MMFree.persistent_decode = args.one_kernel == "on"
    one_kernel = "one kernel" if MMFree.persistent_decode else "per-op kernels"
    from llmpy.backends.cuda import mmfree as cuda_mmfree  # (no CuPy import: the GPU's routing constants)
    if args.decode_rows is not None:
        cuda_mmfree._DECODE_ROWS = args.decode_rows
    routing = f"decode kernel up to {cuda_mmfree._DECODE_ROWS} rows" if args.device == "cuda" else "CPU"
    shapes = [s.strip() for s in args.model.split(",") if s.strip()]
    cfgs = [config_from_name(s) for s in shapes]
    if any(not isinstance(c, MMFreeConfig) for c in cfgs):
        ap.error(f"--model: MatMul-free shapes (mmfree:...), got {args.model!r}")
    be = get_backend(args.device, "bf16" if args.device == "cuda" else "fp32")
    device, args.peak_bw, args.peak_bf16, args.peak_int8 = peaks(be, args.peak_gbs)
    date = time.strftime("%Y-%m-%d")
    report = {"date": date, "device": device, "dtype": be.dtype_name, "peak_bytes_s": args.peak_bw,
              "persistent_decode": MMFree.persistent_decode,
              "decode_rows": cuda_mmfree._DECODE_ROWS if args.device == "cuda" else None, "shapes": []}
    t0 = time.perf_counter()
    for shape, cfg in zip(shapes, cfgs):
        args.shape = shape
        size = packed_size(cfg)
        results = []
        print(f"{shape}: {cfg.describe()}", file=sys.stderr)
        for side in sides:
            results.append(measure_side(side, cfg, be, args))
            be.release_cache()  # its weights and states: the next side starts from an empty pool
        peak = f"{args.peak_bw / 1e12:.2f} TB/s peak" if args.peak_bw else "no peak bandwidth known: no MBU"
        text = "\n".join([
            f"{date}  {shape} decode on {device} ({be.dtype_name}; {peak}; packed batch 1: {one_kernel}; {routing}); "
            f"llama = {llama_name(llama_like(cfg))}",
            table(results),
            f"packed tensors {size['bytes'] / 2**20:,.1f} MiB = 1/{size['fp32_bytes'] / size['bytes']:.1f} of the fp32 "
            f"weights ({size['fp32_bytes'] / 2**20:,.1f} MiB); resident weights: " + ", ".join(
                f"{r['side']} {r['resident_weight_bytes'] / 2**20:,.1f} MiB" for r in results)])
        report["shapes"].append({"model": shape, "packed_file_bytes": size["bytes"], "fp32_weight_bytes":
                                 size["fp32_bytes"], "llama": llama_name(llama_like(cfg)), "results": results,
                                 "report": text})
        print("\n" + text)
    print(f"(all measured in {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
