"""The comparison users ask for: GPT-2, Llama 3 and the MatMul-free LM at about equal (non-embedding) parameter
count, trained on the same Shakespeare tokens (GPT-2's tokenizer), same batches, steps, schedule and seed; one
loss-vs-step plot and a table.

    python benchmarks/compare_families.py --preset cpu    # a few minutes on a laptop's CPU
    python benchmarks/compare_families.py --preset gpu    # minutes on one GPU

Writes compare_<preset>.png and .json into --out (default runs/compare/, which git ignores), and the three run
folders beside them (--runs). Nothing there is replaced unless --overwrite is given; the figures tracked in docs/ are
regenerated only when asked for explicitly (`--out docs --runs runs/compare --overwrite`). The MatMul-free head is
untied and ternary (as the reference's), so its total count is one embedding larger; the table gives both
counts."""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {  # models (non-embedding parameters within ~5% of each other) and the run
    "cpu": dict(models=["gpt2:l4h4c128t128", "llama3:l4d128h4k2f384t128-tied", "mmfree:l4d128i352t128"],
                batch_size=8, seq_len=128, steps=150, val_every=25, val_batches=4, device="cpu"),
    "gpu": dict(models=["gpt2:l8h8c512t512", "llama3:l8d512h8k4f1536t512-tied", "mmfree:l8d512i1392t512"],
                batch_size=32, seq_len=512, steps=1000, val_every=100, val_batches=20, device="cuda"),
}


OUT = ROOT / "runs" / "compare"


def targets(args) -> tuple[Path, dict[str, Path]]:
    """(the stem of the figure and JSON, {model: its run folder}); exits with one line, before anything runs, when
    an earlier comparison's files are there and --overwrite was not given."""
    out = Path(args.out) / f"compare_{args.preset}"
    runs = Path(args.runs or args.out)
    run_dirs = {name: runs / f"{args.preset}-{name.replace(':', '-')}" for name in PRESETS[args.preset]["models"]}
    taken = [f for f in (out.with_suffix(".json"), out.with_suffix(".png")) if f.exists()]
    taken += [d for d in run_dirs.values() if d.is_dir() and any(d.iterdir())]
    if taken and not args.overwrite:
        sys.exit(f"error: {', '.join(map(str, taken))} already exist{'s' if len(taken) == 1 else ''}: choose another "
                 "--out, or add --overwrite to replace them")
    return out, run_dirs


def counts(name):
    from llmpy.config import config_from_name, family_of
    cfg = config_from_name(name)
    total = sum(math.prod(s.shape) for s in family_of(cfg).spec(cfg))
    emb = sum(math.prod(s.shape) for s in family_of(cfg).spec(cfg) if s.vocab_rows is not None or s.name == "wpe")
    return total, total - emb


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--steps", type=int, help="override the preset's steps")
    ap.add_argument("--out", default=str(OUT), help="folder for compare_<preset>.png and .json (default "
                    "runs/compare/, not tracked; docs/ holds the published ones)")
    ap.add_argument("--runs", help="the run folders go here (default: --out)")
    ap.add_argument("--overwrite", action="store_true", help="replace the figure, its JSON and the run folders of an "
                    "earlier comparison there")
    args = ap.parse_args(argv)
    out, run_dirs = targets(args)
    sys.path.insert(0, str(ROOT))
    from llmpy.train import TrainConfig, run
    p = dict(PRESETS[args.preset])
    p.pop("models")
    if args.steps:
        p["steps"] = args.steps
    results = {}
    for name, run_dir in run_dirs.items():
        t0 = time.perf_counter()
        res = run(TrainConfig(init=name, out=str(run_dir), overwrite=args.overwrite,
                              lr=2e-3, warmup_steps=max(1, p["steps"] // 20), checkpoint_every=0, sample_tokens=0,
                              progress=False, seed=1337, **p))
        ev = [json.loads(line) for line in open(res.out / "metrics.jsonl")]
        total, nonemb = counts(name)
        results[name] = {"params": total, "non_embedding": nonemb, "seconds": time.perf_counter() - t0,
                         "train": [(e["step"], e["train_loss"]) for e in ev if "train_loss" in e],
                         "val": [(e["step"], e["val_loss"]) for e in ev if "val_loss" in e]}
        print(f"{name}: final val {results[name]['val'][-1][1]:.4f}", file=sys.stderr)
    meta = {"date": time.strftime("%Y-%m-%d"), "preset": args.preset, "run": p, "lr": 2e-3}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    plot(out.with_suffix(".png"), meta, results)
    print(f"\n{meta['date']}  preset {args.preset}: B={p['batch_size']} T={p['seq_len']} {p['steps']} steps on "
          f"{p['device']}, lr 2e-3 cosine, Shakespeare (GPT-2 tokens)")
    print("| model | params | non-embedding | final val loss | best val loss | time s |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['params'] / 1e6:.2f}M | {r['non_embedding'] / 1e6:.2f}M | {r['val'][-1][1]:.4f} | "
              f"{min(v for _, v in r['val']):.4f} | {r['seconds']:.0f} |")


def plot(path, meta, results):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for (name, r), c in zip(results.items(), ("tab:blue", "tab:green", "tab:red")):
        s, loss = zip(*r["train"])
        k = max(1, len(loss) // 30)  # a running mean over ~1/30 of the run
        smooth = [sum(loss[max(0, i - k + 1):i + 1]) / len(loss[max(0, i - k + 1):i + 1]) for i in range(len(loss))]
        label = f"{name} ({r['non_embedding'] / 1e6:.2f}M non-emb.)"
        ax.plot(s, smooth, color=c, alpha=0.8, label=label + " train")
        vs, vl = zip(*r["val"])
        ax.plot(vs, vl, "o--", color=c, ms=3, label="val")
    ax.set_xlabel("steps done")
    ax.set_ylabel("loss")
    ax.set_title(f"Shakespeare, same tokens ({meta['preset']} preset, {meta['date']})")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
