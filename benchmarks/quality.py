"""Training quality on the GPU: llmpy (CUDA, bf16) vs a PyTorch reference run of the same model and settings.

    python benchmarks/quality.py [--model d12] [--steps 300] [--batch 8] [--seq 1024]
    python benchmarks/quality.py --variants master,lean,master:7,lean:7 [--no-torch]

Both start from the same llm.c checkpoint (GPT-2 init, seed 1337), read the same Shakespeare shards in llm.c's
sequential order, and use the same schedule (cosine, warmup, clip 1.0, AdamW with weight decay 0.1 on the
matrices). PyTorch keeps fp32 weights and runs bf16 autocast with SDPA. Reports both final val losses (the first
batches of the val split) and their relative difference; exits 1 if it exceeds --tolerance (2%).

--variants runs llmpy once per optimizer variant: `master` (fp32 master weights and fp32 moments, the default),
`nomaster` (bf16 weights with stochastic rounding, fp32 moments), `lean` (that, and bf16 moments with stochastic
rounding), `fp8` (--dtype fp8: the blocks' products on FP8 operands, the default optimizer); `:SEED` sets the run's
seed, which only changes the random rounding bits: the spread between seeds of one variant is the noise against
which the variants are compared. The tolerance applies to the first variant.

    python benchmarks/quality.py --model d12 --init-per-seed --val-every 50 --no-torch \
        --variants master:1,master:2,master:3,fp8:1,fp8:2,fp8:3

--init-per-seed draws each run's initial weights from its seed (any family's model name, e.g. a Llama config),
so the seeds' spread includes the initialization; --val-every N logs the val loss every N steps, and the report
says at each evaluation whether every run of a variant lies within the first variant's seeds' [min, max], and the
mean paired difference (each run minus the first variant's run of the same seed: same initial weights, same data).
--device cpu runs the variants on the CPU in fp32, `fp8` emulated over it (a small model). --plot OUT.png R.json ...
draws the val curves of earlier --json results and runs nothing.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def settings(args) -> dict:
    return dict(batch_size=args.batch, seq_len=args.seq, steps=args.steps, lr=args.lr, lr_schedule="cosine",
                warmup_steps=args.warmup, final_lr_frac=0.1, weight_decay=0.1, grad_clip=1.0, beta1=0.9,
                beta2=0.95, eps=1e-8, shuffle=False, val_batches=args.val_batches)


VARIANTS = {"master": dict(master_weights=True, moments="fp32"), "nomaster": dict(master_weights=False, moments="fp32"),
            "lean": dict(master_weights=False, moments="bf16"), "fp8": dict(master_weights=True, moments="fp32",
                                                                             dtype="fp8")}


def run_llmpy(args, init, train_glob, val_glob, out, variant="master") -> tuple[float, float, str, list]:
    """(final val loss, seconds, a digest of the final compute weights: runs that differ must differ there, the val
    curve [(step, loss)])"""
    import hashlib

    from llmpy.formats.checkpoint import load_checkpoint
    from llmpy.train import TrainConfig, run
    name, _, seed = variant.partition(":")
    kw = dict(VARIANTS[name])
    dtype = kw.pop("dtype", "bf16" if args.device == "cuda" else "fp32")  # (the CPU emulates fp8 over fp32)
    t0 = time.perf_counter()
    res = run(TrainConfig(init=args.model if args.init_per_seed else str(init), train_data=train_glob,
                          val_data=val_glob, val_every=args.val_every, sample_tokens=0, progress=False,
                          device=args.device, dtype=dtype, out=str(out), checkpoint_every=0, seed=int(seed or 1337),
                          **kw, **settings(args)))
    seconds = time.perf_counter() - t0
    ck = load_checkpoint(Path(out) / "checkpoint.safetensors")
    h = hashlib.sha256()
    weights = ck.params if ck.compute_bf16 is None else ck.compute_bf16  # fp32 runs keep no bf16 copy
    for k in sorted(weights):
        h.update(weights[k].tobytes())
    del ck
    shutil.rmtree(out)  # a d48 run's checkpoint is ~22 GB: one at a time on the device's disk
    return res.val_losses[-1][1], seconds, h.hexdigest()[:16], [(int(a), float(b)) for a, b in res.val_losses]


def run_torch(args, init, train_glob, val_glob) -> tuple[float, float]:
    import torch

    from benchmarks.torch_gpt2 import TorchGPT2
    from llmpy.data.loader import DataLoader
    from llmpy.formats.llmc import read_llmc_model
    from llmpy.train.optim import lr_at
    s = settings(args)
    cfg, params = read_llmc_model(init)
    model = TorchGPT2(cfg, params).cuda()
    opt = model.optimizer(s["lr"], (s["beta1"], s["beta2"]), s["eps"], s["weight_decay"], fused=True)
    B, T = s["batch_size"], s["seq_len"]
    train = DataLoader(train_glob, B, T, vocab_size=cfg.vocab_size)
    t0 = time.perf_counter()
    for step in range(s["steps"]):
        lr = lr_at(step, lr=s["lr"], schedule="cosine", steps=s["steps"], warmup=s["warmup_steps"],
                   final_frac=s["final_lr_frac"])
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = (torch.tensor(a, dtype=torch.long, device="cuda") for a in train.next_batch())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
    val = DataLoader(val_glob, B, T, vocab_size=cfg.vocab_size)
    n = min(s["val_batches"], val.num_batches_per_epoch)
    total = 0.0
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(n):
            x, y = (torch.tensor(a, dtype=torch.long, device="cuda") for a in val.next_batch())
            total += model(x, y)[1].item()
    return total / n, time.perf_counter() - t0


def compare(args) -> dict:
    sys.path.insert(0, str(ROOT))
    from llmpy.backends import get_backend
    from llmpy.config import config_from_name
    from llmpy.data.prepare import prepare_shakespeare
    from llmpy.formats.llmc import write_llmc_model
    from llmpy.models.gpt2 import GPT2
    train_glob, val_glob = prepare_shakespeare()
    with tempfile.TemporaryDirectory() as d:
        init = Path(d) / "init.bin"
        if not args.init_per_seed:  # one llm.c init for every run and for PyTorch
            m = GPT2(config_from_name(args.model), get_backend("cpu"), 1, 1, training=False)
            m.init_weights(1337)
            write_llmc_model(init, m.cfg, m.params_numpy())
            del m
        runs = {}
        for i, variant in enumerate(args.variants.split(",")):
            runs[variant] = run_llmpy(args, init, train_glob, val_glob, Path(d) / f"run{i}", variant)
            print(f"llmpy {variant}: val loss {runs[variant][0]:.6f} ({runs[variant][1]:.1f} s), weights "
                  f"{runs[variant][2]}", flush=True)
        ref, t_ref = run_torch(args, init, train_glob, val_glob) if not args.no_torch else (None, 0.0)
    first = next(iter(runs))
    ours, t_ours, _, _ = runs[first]
    rel = (ours - ref) / ref if ref is not None else 0.0
    return {"llmpy_val_loss": ours, "torch_val_loss": ref, "relative_difference": rel, "llmpy_s": t_ours,
            "torch_s": t_ref, "settings": settings(args), "model": args.model, "device": args.device,
            "variants": {k: {"val_loss": v, "s": t, "weights_sha256": w, "curve": c}
                         for k, (v, t, w, c) in runs.items()}}


def spread_report(variants: dict) -> list[str]:
    """Per evaluation: the first variant's seeds' [min, max], whether each other variant's runs lie inside, and the
    mean paired difference (a run minus the first variant's run of the same seed, where both exist)."""
    by, seeds = {}, {}
    for k, v in variants.items():
        name, _, seed = k.partition(":")
        by.setdefault(name, []).append(dict(v["curve"]))
        seeds.setdefault(name, {})[seed] = dict(v["curve"])
    base, *others = list(by)
    lines = []
    for step in sorted(by[base][0]):
        lo, hi = min(c[step] for c in by[base]), max(c[step] for c in by[base])
        parts = [f"step {step}: {base} [{lo:.4f}, {hi:.4f}]"]
        for o in others:
            vals = [c[step] for c in by[o] if step in c]
            inside = all(lo <= x <= hi for x in vals)
            diffs = [c[step] - seeds[base][sd][step] for sd, c in seeds[o].items()
                     if sd in seeds[base] and step in c]
            paired = f", paired {sum(diffs) / len(diffs):+.4f}" if diffs else ""
            parts.append(f"{o} " + ", ".join(f"{x:.4f}" for x in vals) + (" inside" if inside else " OUTSIDE")
                         + paired)
        lines.append("; ".join(parts))
    return lines


def plot(results: list[dict], out: str) -> None:
    """One panel per result (a --json file): every run's val curve, one colour per variant, the seeds as lines of
    that colour; written atomically to out (a .png)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llmpy.formats.atomic import atomic_write
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    for ax, r in zip(axes[0], results):
        colours = {}
        # the default optimizer's runs are bf16 on the GPU, fp32 on the CPU (where fp8 is emulated over fp32)
        names = {"master": "fp32" if r.get("device") == "cpu" else "bf16", "fp8": "fp8"}
        for k, v in r["variants"].items():
            name = names.get(k.partition(":")[0], k.partition(":")[0])
            c = colours.setdefault(name, f"C{len(colours)}")
            steps, losses = zip(*v["curve"])
            ax.plot(steps, losses, color=c, lw=1, label=name if name not in ax.get_legend_handles_labels()[1] else None)
        s = r["settings"]
        ax.set_title(f"{r['model']} ({r.get('device', 'cuda')}), {s['batch_size']}x{s['seq_len']} tokens a step, "
                     f"{len(r['variants'])} runs", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("val loss")
        ax.legend()
        lo = min(x for v in r["variants"].values() for _, x in v["curve"][1:] or v["curve"])
        hi = max(x for v in r["variants"].values() for _, x in v["curve"][len(v["curve"]) // 4:])
        ax.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9))
    fig.tight_layout()
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="d12")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--val-batches", type=int, default=9)
    ap.add_argument("--tolerance", type=float, default=0.02)
    ap.add_argument("--variants", default="master", help="llmpy variants: master, nomaster, lean, fp8[:SEED]")
    ap.add_argument("--init-per-seed", action="store_true", help="initial weights from each run's seed (--model "
                    "any family's name; no PyTorch run)")
    ap.add_argument("--val-every", type=int, default=0, help="val loss every N steps (the curves; 0: at the end)")
    ap.add_argument("--no-torch", action="store_true", help="llmpy variants only")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: llmpy variants only, fp32 (fp8 emulated over it; a small --model)")
    ap.add_argument("--json", help="write the result here too")
    ap.add_argument("--plot", nargs="+", metavar=("OUT.png", "RESULT.json"),
                    help="no runs: draw the val curves of these --json results into OUT.png")
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.plot:
        if len(args.plot) < 2:
            raise SystemExit("--plot needs OUT.png and at least one RESULT.json")
        plot([json.loads(Path(f).read_text()) for f in args.plot[1:]], args.plot[0])
        return 0
    if args.init_per_seed or args.device == "cpu":
        args.no_torch = True
    r = compare(args)
    if args.val_every:
        print("\n".join(spread_report(r["variants"])))
    for k, v in r["variants"].items():
        print(f"{args.model}, {args.steps} steps of {args.batch}x{args.seq}: val loss llmpy {k} "
              f"{v['val_loss']:.4f} ({v['s']:.1f} s)")
    if r["torch_val_loss"] is not None:
        print(f"PyTorch {r['torch_val_loss']:.4f} ({r['torch_s']:.1f} s); first variant's difference "
              f"{r['relative_difference'] * 100:+.2f}%")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    return 0 if abs(r["relative_difference"]) <= args.tolerance else 1


if __name__ == "__main__":
    raise SystemExit(main())
