"""Every training setting, its default (the one source of truth: the CLI's help reads them from here) and its
validation."""
from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass, fields

import numpy as np

from ..errors import UserError
from ..data.tokenizers import tokenizer_problem
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
    total_batch_size: int | None = None  # tokens per step (llm.c's -d): sets grad_accum = it / (B*T*world)
    shuffle: bool = True
    val_every: int = 50              # val loss when the steps done are 0, N, 2N, ... and after the last step
    val_batches: int = 10
    sample_every: int = 0
    sample_tokens: int = 64
    eval_tasks: str | None = None    # comma-separated multiple-choice tasks (llmpy/evals), e.g. hellaswag
    eval_every: int = 0              # their accuracy at 0, N, 2N, ... steps done and after the last; 0: at the end
    eval_limit: int | None = None    # the first N examples of each task (default: all)
    checkpoint_every: int = 100      # a checkpoint when the steps done are a multiple of N, and at the end
    keep: int = 1                    # checkpoints kept: the latest, and keep-1 earlier ones as checkpoint-<steps done>
    stop_at: int | None = None       # stop (with a checkpoint) when this many steps are done, keeping the schedule
                                     # of `steps`
    seed: int = 1337
    tokenizer: str | None = None     # gpt2 | llama3 (the Shakespeare shards, samples); default: by the vocabulary
    out: str | None = None
    overwrite: bool = False          # a new run may replace an earlier run's files in `out` (removed first)
    resume: str | None = None
    extend: bool = False             # resume: allow --steps beyond the run's planned steps (stretches the schedule)
    device: str = "auto"
    dtype: str | None = None         # fp32 on the CPU, bf16 on the GPU; fp8: FP8 block products (bf16 elsewhere)
    zero: int = 0                    # data parallel: 0 all-reduce, 1 shard optimizer state, 2 also gradients
    recompute: int | None = None     # 1: recompute GELU in backward; 2: also the LayerNorms (default: 1 on
                                     # the GPU, 0 on the CPU)
    recompute_keep: int = 0          # with recompute: the first N layers keep those activations (more memory, less
                                     # recomputation)
    master_weights: bool = True      # bf16: keep fp32 master weights (off: stochastic rounding into bf16 only)
    moments: str = "fp32"            # AdamW's m and v: fp32, or bf16 with stochastic rounding (bf16 only)
    graph: bool = True               # CUDA: capture the step as CUDA graphs
    fast_attention: bool = False     # CUDA: cuDNN's non-deterministic attention backward (faster; not reproducible)
    tune_gemm: bool = False          # CUDA: time cuBLASLt's top algorithms per product shape once; choices kept
                                     # in the checkpoint (a resume replays them)
    gemm_algos: str | None = None    # CUDA: replay the choices of a --tune-gemm run (its checkpoint, or a JSON)
    progress: bool = True
    explicit: tuple = ()             # names of the settings given on the command line (they override a resume)

    def check(self, *, files: bool = True) -> None:
        """UserError listing every bad setting, whether given as a flag or read from a resumed run; files=False
        leaves out the settings that name files (task files, a tokenizer's), for reading a finished run's
        settings."""
        _check_types(self)
        bad = []

        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                bad.append(f"--{name.replace('_', '-')} {getattr(self, name)} ({what})")
        for name in ("batch_size", "seq_len", "grad_accum", "val_batches", "keep"):
            need(getattr(self, name) >= 1, name, "must be >= 1")
        for name in ("steps", "warmup_steps", "val_every", "sample_every", "sample_tokens", "checkpoint_every",
                     "seed", "eval_every"):
            need(getattr(self, name) >= 0, name, "must be >= 0")
        need(self.stop_at is None or self.stop_at >= 0, "stop_at", "must be >= 0")
        need(self.total_batch_size is None or self.total_batch_size >= 1, "total_batch_size", "must be >= 1")
        need(self.eval_limit is None or self.eval_limit >= 1, "eval_limit", "must be >= 1")
        if self.eval_tasks and files:  # "" (--eval-tasks none): off
            from ..evals import check_tasks
            try:
                check_tasks(self.eval_tasks)
            except UserError as e:
                bad.append(f"--eval-tasks {self.eval_tasks} ({e})")
        # floats: `not (x >= 0)` is also true for NaN; fp32 is what the optimizer computes in
        need(_fp32_finite(self.lr) and np.float32(self.lr) > 0, "lr", "must be > 0 and finite in fp32")
        for name in ("beta1", "beta2"):
            need(0 <= getattr(self, name) < 1, name, "must be in [0, 1)")
        need(_fp32_finite(self.eps) and np.float32(self.eps) > 0, "eps", "must be > 0 and finite in fp32")
        for name in ("weight_decay", "grad_clip"):
            need(math.isfinite(getattr(self, name)) and getattr(self, name) >= 0, name, "must be >= 0 and finite")
        for name in ("final_lr_frac", "decay_frac"):
            need(0 <= getattr(self, name) <= 1, name, "must be in [0, 1]")
        need(self.lr_schedule in SCHEDULES, "lr_schedule", f"choose from {', '.join(SCHEDULES)}")
        need(self.dtype in (None, "fp32", "bf16", "fp8"), "dtype", "use fp32, bf16 or fp8")
        need(self.device in ("cpu", "cuda", "auto"), "device", "use cpu, cuda or auto")
        need(self.zero in (0, 1, 2), "zero", "use 0, 1 or 2")
        need(self.moments in ("fp32", "bf16"), "moments", "use fp32 or bf16")
        if self.tokenizer is not None and files:
            problem = tokenizer_problem(self.tokenizer)
            need(problem is None, "tokenizer", problem or "")
        if self.extend and not self.resume:
            bad.append("--extend without --resume (it stretches the schedule of a resumed run)")
        if bad:
            raise UserError(f"bad setting: {'; '.join(bad)}")


def _check_types(tc: TrainConfig) -> None:
    """Each setting has its field's type (a resumed run's settings come from a file): ints are not bools, floats
    may be ints."""
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        if f.name == "explicit":
            continue
        hint, v = hints[f.name], getattr(tc, f.name)
        allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        ok = any(v is None if t is type(None) else
                 isinstance(v, (int, float)) and not isinstance(v, bool) if t is float else
                 isinstance(v, int) and not isinstance(v, bool) if t is int else isinstance(v, t)
                 for t in allowed)
        if not ok:
            want = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
            raise UserError(f"bad setting: {f.name.replace('_', '-')} is {v!r}, not {want}")
        if isinstance(v, int) and not isinstance(v, bool) and not -INT64 <= v < INT64:
            raise UserError(f"bad setting: --{f.name.replace('_', '-')} {v} is beyond a 64-bit integer's range")
        if v == "" and f.name != "eval_tasks":  # an empty path is the current folder, an empty name nothing
            raise UserError(f"bad setting: --{f.name.replace('_', '-')} is empty")


INT64 = 2**63  # every integer setting lies in -INT64..INT64-1: what NumPy, the GPU kernels and seeds take


def _fp32_finite(x: float) -> bool:
    return math.isfinite(x) and abs(x) <= float(np.finfo(np.float32).max)
