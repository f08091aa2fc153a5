"""The training state on disk, in the run folder: `checkpoint.safetensors` (weights, AdamW moments, the bf16
compute copy, and step, loader position, sampler RNG, settings: formats/checkpoint.py) and, under ZeRO, one
optimizer shard per rank beside it. A checkpoint written after step s holds the state from which step s+1 starts,
so that a resumed run is bitwise the uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

from ..errors import UserError
from .config import TrainConfig

CHECKPOINT = "checkpoint.safetensors"


def open_resume(tc: TrainConfig):
    """(the settings to resume with, the checkpoint) for `--resume DIR`: the saved settings, overridden by the flags
    given now (steps, out, ...)."""
    from ..formats.checkpoint import load_checkpoint
    path = Path(tc.resume)
    path = path / CHECKPOINT if path.is_dir() else path
    if not path.exists():
        raise UserError(f"--resume {tc.resume}: no {CHECKPOINT} there")
    ckpt = load_checkpoint(path)
    if "train" not in ckpt.state:
        raise UserError(f"{path} holds weights only (no training state): use --init {path} instead")
    return _merge_resume(tc, ckpt.state["train"]), ckpt


def _merge_resume(tc: TrainConfig, saved: dict) -> TrainConfig:
    base = TrainConfig(**{k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__})
    explicit = set(tc.explicit)
    for name in explicit:
        setattr(base, name, getattr(tc, name))
    base.resume = tc.resume
    base.init = None
    for once in ("stop_at", "progress"):  # per-invocation settings, not part of the run
        if once not in explicit:
            setattr(base, once, getattr(TrainConfig, once))
    if base.out is None or "out" not in explicit:
        base.out = tc.out or tc.resume
    return base


def save(out: Path, next_step: int, tc: TrainConfig, model, opt, loader, sample_rng, dist, comm) -> None:
    """Writes the state from which step `next_step` starts. Collective under data parallelism: a sharded master is
    gathered; each rank writes its optimizer shard (named by step) before rank 0 replaces the checkpoint, which
    then names that step."""
    from ..formats.checkpoint import save_checkpoint
    be = model.be
    state = {"step": next_step, "adam_t": opt.t, "loader": loader.state(), "world": dist.world,
             "sample_rng": sample_rng.bit_generator.state, "train": dataclasses.asdict(tc)}
    weights = model.params_numpy(comm)
    if opt.sharded:
        save_shard(out, next_step, dist, *opt.moments_numpy())
        dist.barrier()
    if dist.main:
        compute = None
        if np.dtype(be.param_dtype) != np.float32:
            compute = {n: np.asarray(be.to_numpy(model.params[n])).view(np.uint16) for n in model.params.shapes}
        m, v = (None, None) if opt.sharded else opt.moments_numpy()
        save_checkpoint(out / CHECKPOINT, model.cfg, weights, adam_m=m, adam_v=v, state=state, compute_bf16=compute)
    if opt.sharded:
        dist.barrier()
        prune_shards(out, next_step, dist)


def restore(ckpt, tc: TrainConfig, out: Path, model, opt, loader, sample_rng, dist) -> int:
    """Puts a resumed run's state back (its weights are loaded with the model); returns the step to start from."""
    be, st = model.be, ckpt.state
    if opt.sharded:
        opt.load_moments(*load_shard(out, int(st["step"]), dist))
    elif ckpt.adam_m is None:
        raise UserError(f"{tc.resume} has no optimizer state to resume from")
    else:
        opt.load_moments(ckpt.adam_m, ckpt.adam_v)
    if ckpt.compute_bf16 is not None:  # the compute copy was stochastically rounded: exact bits
        for name in model.params.shapes:
            be.copy_(model.params[name], be.asarray(ckpt.compute_bf16[name].view(be.param_dtype)))
    opt.t = int(st["adam_t"])
    loader.load_state(st["loader"])
    sample_rng.bit_generator.state = st["sample_rng"]
    return int(st["step"])


def last_checkpoint(out: Path) -> str:
    p = out / CHECKPOINT
    return str(p) if p.exists() else "none yet"


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
