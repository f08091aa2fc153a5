"""Every training setting, its default (the one source of truth: the CLI's help reads them from here) and its
validation."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UserError
from .optim import SCHEDULES

# The embedded default (`llmpy train` with no arguments): a small GPT-2 on Shakespeare, ~5 minutes on 2 cores.
DEFAULT_MODEL = "l4h4c128t128"


@dataclass
class TrainConfig:
    init: str | None = None          # llm.c .bin, llmpy checkpoint, HF safetensors, or a config name (d12, ...)
    train_data: str | None = None    # glob of llm.c-format token shards; None: the Shakespeare corpus
    val_data: str | None = None
    batch_size: int = 16
    seq_len: int = 128
    steps: int = 200
    lr: float = 2e-3
    lr_schedule: str = "cosine"
    warmup_steps: int = 20
    final_lr_frac: float = 0.1
    decay_frac: float = 0.2          # wsd: the cooldown's share of the steps
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    grad_accum: int = 1
    shuffle: bool = True
    val_every: int = 50
    val_batches: int = 10
    sample_every: int = 0
    sample_tokens: int = 64
    checkpoint_every: int = 100
    stop_at: int | None = None       # stop (with a checkpoint) after this step, keeping the schedule of `steps`
    seed: int = 1337
    out: str | None = None
    resume: str | None = None
    device: str = "auto"
    dtype: str | None = None         # fp32 on the CPU, bf16 on the GPU
    zero: int = 0                    # data parallel: 0 all-reduce, 1 shard optimizer state, 2 also gradients
    recompute: int | None = None     # 1: recompute GELU in backward; 2: also the LayerNorms (default: 1 on
                                     # the GPU, 0 on the CPU)
    master_weights: bool = True      # bf16: keep fp32 master weights (off: stochastic rounding into bf16 only)
    graph: bool = True               # CUDA: capture the step as CUDA graphs
    progress: bool = True
    explicit: tuple = ()             # names of the settings given on the command line (they override a resume)

    def check(self) -> None:
        pos = {"batch_size": self.batch_size, "seq_len": self.seq_len, "grad_accum": self.grad_accum,
               "val_batches": self.val_batches}
        bad = [f"--{k.replace('_', '-')} {v}" for k, v in pos.items() if v < 1]
        nonneg = {"steps": self.steps, "warmup_steps": self.warmup_steps, "val_every": self.val_every,
                  "sample_every": self.sample_every, "checkpoint_every": self.checkpoint_every, "seed": self.seed,
                  "sample_tokens": self.sample_tokens}
        bad += [f"--{k.replace('_', '-')} {v}" for k, v in nonneg.items() if v < 0]
        if bad:
            raise UserError(f"bad value: {', '.join(bad)} (sizes must be >= 1, counts >= 0)")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"--lr must be a positive number (got {self.lr})")
        if self.grad_clip < 0:
            raise UserError(f"--grad-clip must be >= 0 (0 turns clipping off), got {self.grad_clip}")
        if self.lr_schedule not in SCHEDULES:
            raise UserError(f"unknown --lr-schedule {self.lr_schedule!r}: choose from {', '.join(SCHEDULES)}")
        if self.dtype not in (None, "fp32", "bf16"):
            raise UserError(f"unknown --dtype {self.dtype!r}: use fp32 or bf16")
