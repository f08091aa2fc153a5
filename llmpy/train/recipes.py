"""`llmpy train --recipe NAME`: llm.c's published GPT-2 runs (karpathy/llm.c scripts/run_gpt2_{124M,350M,774M,
1558M}.sh) as our settings. Any flag given on the command line overrides the recipe's value; the total batch is
reached by gradient accumulation over the GPUs present (--total-batch-size / (B T ranks) micro-batches a step).

| recipe | model | data (llmpy prepare ...) | B | tokens/step | lr | final lr | warmup | steps | checkpoint | sample |
|---|---|---|---|---|---|---|---|---|---|---|
| gpt2-124m | d12 | fineweb 10BT | 64 | 524,288 | 6e-4 | 0 | 700 | 18,865 (~9.9B tokens) | 5000 | 20000 |
| gpt2-350m | d24 | fineweb 100BT | 64 | 524,288 | 3e-4 | 0 | 700 | 60,000 (31.5B) | 2000 | 100000 |
| gpt2-774m | d36 | fineweb 100BT | 32 | 524,288 | 2.5e-4 | 0 | 700 | 286,102 (150B) | 4000 | 300000 |
| gpt2-1.5b | d48 | fineweb-edu 100BT | 16 | 1,048,576 | 6e-4 | 0.1 lr | 700 | 32,000 (33.6B) | 2000 | 300000 |

All: T = 1024, cosine schedule, AdamW (0.9, 0.95) with weight decay 0.1, clip 1.0, ZeRO-1 (llm.c's -z 1), val loss
over 20 batches and HellaSwag every 250 steps (llm.c's -v 250 -h 1; its val_max_steps default 20)."""
from __future__ import annotations

from ..errors import UserError

_COMMON = dict(seq_len=1024, lr_schedule="cosine", weight_decay=0.1, warmup_steps=700, val_every=250, val_batches=20,
               eval_tasks="hellaswag", eval_every=250, zero=1)
RECIPES: dict[str, dict] = {
    "gpt2-124m": dict(init="d12", data=("fineweb", "10BT"), batch_size=64, total_batch_size=524_288, lr=6e-4,
                      final_lr_frac=0.0, steps=18_865, checkpoint_every=5000, sample_every=20_000,
                      sample_tokens=144),
    "gpt2-350m": dict(init="d24", data=("fineweb", "100BT"), batch_size=64, total_batch_size=524_288, lr=3e-4,
                      final_lr_frac=0.0, steps=60_000, checkpoint_every=2000, sample_every=100_000,
                      sample_tokens=144),
    "gpt2-774m": dict(init="d36", data=("fineweb", "100BT"), batch_size=32, total_batch_size=524_288, lr=2.5e-4,
                      final_lr_frac=0.0, steps=286_102, checkpoint_every=4000, sample_every=300_000,
                      sample_tokens=144),
    "gpt2-1.5b": dict(init="d48", data=("fineweb-edu", "100BT"), batch_size=16, total_batch_size=1_048_576,
                      lr=6e-4, final_lr_frac=0.1, steps=32_000, checkpoint_every=2000, sample_every=300_000,
                      sample_tokens=384),
}


def recipe_settings(name: str) -> tuple[dict, str]:
    """(the TrainConfig settings of recipe `name`, with the data as the globs `llmpy prepare` writes them to; the
    command that prepares that data)."""
    if name not in RECIPES:
        raise UserError(f"unknown recipe {name!r}: use one of {', '.join(RECIPES)}")
    r = dict(_COMMON, **RECIPES[name])
    dataset, sample = r.pop("data")
    from ..data.fineweb import shard_globs
    r["train_data"], r["val_data"] = shard_globs(dataset, sample)
    return r, f"llmpy prepare {dataset} --sample {sample}"


def describe(name: str, recipe: dict, given: dict) -> str:
    """The run's settings from the recipe as flags, one line; a flag given on the command line shows its value,
    marked (overridden)."""
    flags = " ".join(f"--{k.replace('_', '-')} {given.get(k, v)}" + (" (overridden)" if k in given else "")
                     for k, v in recipe.items())
    return f"recipe {name}: {flags}"
