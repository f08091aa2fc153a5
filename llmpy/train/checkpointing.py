"""The training state on disk: ZeRO optimizer shards (one file per rank beside the checkpoint)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import UserError


def shard_path(out: Path, step: int, rank: int, world: int) -> Path:
    return Path(out) / f"zero-step{step:08d}-rank{rank}-of-{world}.safetensors"


def save_shard(out, step: int, dist, m: np.ndarray, v: np.ndarray) -> None:
    from ..formats.safetensors import save_safetensors
    Path(out).mkdir(parents=True, exist_ok=True)
    save_safetensors(shard_path(out, step, dist.rank, dist.world), {"adam_m": m, "adam_v": v},
                     {"format": "llmpy-zero-shard", "step": str(step), "rank": str(dist.rank),
                      "world": str(dist.world)})


def load_shard(out, step: int, dist) -> tuple[np.ndarray, np.ndarray]:
    from ..formats.safetensors import load_safetensors
    path = shard_path(out, step, dist.rank, dist.world)
    if not path.exists():
        raise UserError(f"rank {dist.rank}: the optimizer shard {path.name} for step {step} is missing from {out} "
                        f"(ZeRO checkpoints need every rank's shard and the same number of ranks)")
    t, meta = load_safetensors(path)
    if meta.get("format") != "llmpy-zero-shard" or meta.get("step") != str(step):
        raise UserError(f"{path} is not the ZeRO shard of step {step}")
    return t["adam_m"], t["adam_v"]


def prune_shards(out, step: int, dist) -> None:
    """Removes this rank's shards of other steps (after the checkpoint naming `step` is in place)."""
    keep = shard_path(out, step, dist.rank, dist.world).name
    pattern = re.compile(rf"zero-step\d+-rank{dist.rank}-of-{dist.world}\.safetensors")
    for p in Path(out).glob(f"zero-step*-rank{dist.rank}-of-{dist.world}.safetensors"):
        if p.name != keep and pattern.fullmatch(p.name):
            p.unlink(missing_ok=True)
