"""The decisions of a run's set-up that need no model yet: the initial weights, gradient accumulation, whether the
model can fit, where the data is, and the warnings to give before the first step."""
from __future__ import annotations

import math
import os

from ..config import config_from_name, family_of
from ..errors import UserError
from ..paths import path_problem
from .checkpointing import nonfinite
from .config import DEFAULT_MODEL, TrainConfig
from .optim import lr_at

EPOCHS_WARNING = 10  # a run reading its training data more often than this is warned about
CPU_PLAN_WARNING_S = 12 * 3600  # a CPU plan that needs at least this long is said to be one
MIN_CPU_FLOPS = 5e9  # float32 FLOP/s every CPU's matrix products exceed: smaller plans are not measured


def load_init(tc: TrainConfig):
    """(config, weights or None for a fresh init, description)."""
    from ..formats.checkpoint import load_weights
    from ..formats.hub import hub_repo
    name = tc.init or DEFAULT_MODEL
    # a path that exists (or is a dangling link: load_weights says so), or a Hub name (gpt2, hf:owner/name), fetched
    # into the cache
    if os.path.lexists(name) or hub_repo(name):
        cfg, params = load_weights(name)
        bad = nonfinite(params)
        if bad:
            raise UserError(f"--init {name}: the weights hold NaN/Inf ({', '.join(bad[:3])})")
        return cfg, params, f"weights from {name}"
    if os.sep in name or name.endswith((".bin", ".safetensors")):
        raise UserError(f"--init {name}: {name} {path_problem(name)}")
    return config_from_name(name), None, f"{name}, fresh init (seed {tc.seed})"


def check_flags(tc: TrainConfig, dtype: str) -> None:
    """Flags given on the command line (tc.explicit) that could do nothing with the others: one-line errors
    rather than a run that silently ignores them (a resumed run's own settings are not checked again)."""
    given = set(tc.explicit)
    if "master_weights" in given and not tc.master_weights and dtype == "fp32":
        raise UserError("--no-master-weights is for bf16 training (--dtype bf16, a CUDA device): fp32 weights are "
                        "their own master copy")
    for flag in ("eval_every", "eval_limit"):
        if flag in given and not tc.eval_tasks:
            raise UserError(f"--{flag.replace('_', '-')} goes with --eval-tasks (no tasks are scored in this run)")
    if "sample_every" in given and tc.sample_every and not tc.sample_tokens:
        raise UserError("--sample-every goes with --sample-tokens N > 0 (samples of 0 tokens are not printed)")


def idle_flags(tc: TrainConfig, device: str, world: int, val_glob: str | None) -> list[str]:
    """One-line notes for flags given on the command line that do nothing where the run is, saying what happens
    instead."""
    given, notes = set(tc.explicit), []
    if val_glob is None and ("val_every" in given and tc.val_every or "val_batches" in given):  # asked for
        notes.append("note: no validation data (--val-data): --val-every and --val-batches do nothing; the run "
                     "logs no val loss")
    if "zero" in given and tc.zero and world == 1:
        notes.append(f"note: --zero {tc.zero} shards over data-parallel ranks; a single process trains as --zero 0")
    if "graph" in given and not tc.graph and device != "cuda":
        notes.append("note: --no-graph is for CUDA devices; the CPU replays no graphs")
    if "tokenizer" in given and tc.train_data is not None and not tc.sample_tokens and not tc.eval_tasks:
        notes.append("note: --tokenizer is for the Shakespeare shards, samples and task scoring; this run has none of "
                     "them")
    return notes


def grad_accum(tc: TrainConfig, world: int) -> int:
    """Micro-batches per step: --grad-accum, or --total-batch-size / (B*T*world) (llm.c's -d)."""
    if tc.total_batch_size is None:
        return tc.grad_accum
    per = tc.batch_size * tc.seq_len * world
    if tc.total_batch_size % per:
        raise UserError(f"--total-batch-size {tc.total_batch_size} is not a multiple of B*T*world = "
                        f"{tc.batch_size}*{tc.seq_len}*{world} = {per} tokens")
    A = tc.total_batch_size // per
    if ("grad_accum" in tc.explicit or tc.grad_accum != 1) and tc.grad_accum != A:
        raise UserError(f"--grad-accum {tc.grad_accum} contradicts --total-batch-size {tc.total_batch_size} "
                        f"(= {A} micro-batches of {per} tokens): give one of them")
    tc.grad_accum = A  # recorded in the checkpoint and config.json
    return A


def check_size(cfg, device: str) -> int:
    """The parameter count; a one-line error when the model alone cannot fit this machine's memory (fp32
    weights, gradients and two moments: 16 bytes a parameter) rather than a MemoryError or the OOM killer."""
    n = sum(math.prod(s.shape) for s in family_of(cfg).spec(cfg))
    if device == "cpu":
        try:
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            ram = None
        if ram and 16 * n > ram:
            raise UserError(f"{cfg.describe()} has {n / 1e6:,.1f}M parameters: training it needs at least "
                            f"{16 * n / 2**30:,.1f} GiB, more than this machine's {ram / 2**30:,.1f} GiB")
    return n


def data_globs(tc: TrainConfig, dist, cfg) -> tuple[str, str | None]:
    if tc.train_data is None:
        from ..data.prepare import prepare_shakespeare
        from ..data.tokenizers import tokenizer_for
        name = tokenizer_for(cfg.vocab_size, tc.tokenizer)
        if not dist.main:
            dist.barrier()  # rank 0 prepares the corpus once; the others wait, then read it
        train, val = prepare_shakespeare(tokenizer=name)
        if dist.main:
            dist.barrier()
        return train, tc.val_data or val
    return tc.train_data, tc.val_data


def cpu_matmul_flops() -> float:
    """This machine's float32 matrix-product rate in FLOP/s: the best of a few 1024 x 1024 products (~0.1 s on 2
    cores). A training step reaches a fraction of it, so a time computed from it is a lower bound."""
    import time

    import numpy as np
    a = np.random.default_rng(0).standard_normal((1024, 1024), dtype=np.float32)
    out = np.empty_like(a)
    best = math.inf
    for _ in range(4):
        t = time.perf_counter()
        np.matmul(a, a, out=out)
        best = min(best, time.perf_counter() - t)
    return 2 * 1024**3 / max(best, 1e-9)


def cpu_plan_warning(cfg, T: int, tokens_per_step: int, steps: int, n_params: int) -> str | None:
    """One line when training `steps` steps of `tokens_per_step` tokens on the CPU obviously will not finish in
    reasonable time (at least CPU_PLAN_WARNING_S at this CPU's peak matrix-product rate): a GPU-sized model or
    plan, said once before the first step with the plan's size."""
    try:
        per_token = cfg.flops_per_token(T)
    except (AttributeError, NotImplementedError):
        per_token = 6 * n_params
    total = per_token * tokens_per_step * steps
    if total < CPU_PLAN_WARNING_S * MIN_CPU_FLOPS:
        return None  # short on any CPU: not worth measuring
    rate = cpu_matmul_flops()
    seconds = total / rate
    if seconds < CPU_PLAN_WARNING_S:
        return None
    took = f"{seconds / 86400:,.1f} days" if seconds >= 2 * 86400 else f"{seconds / 3600:,.0f} hours"
    return (f"warning: this plan will not finish in reasonable time on the CPU: {steps:,} steps x {tokens_per_step:,} "
            f"tokens of a {n_params / 1e6:,.1f}M-parameter model, about {total:.1e} FLOPs: at least {took} "
            f"here (this CPU's matrix products peak near {rate / 1e9:,.0f} GFLOP/s); train it on a GPU "
            "(--device cuda), or choose a smaller model, batch or fewer --steps")


def warnings(tc: TrainConfig, resume, start: int, A: int, batches_per_epoch: int, damaged: int) -> list[str]:
    """What a person should know before the run starts: an extended schedule, dropped metrics lines, a corpus
    read many times over."""
    lines = []
    if resume is not None and tc.steps > resume.planned:
        kw = {"lr": tc.lr, "schedule": tc.lr_schedule, "warmup": tc.warmup_steps, "final_frac": tc.final_lr_frac,
              "decay_frac": tc.decay_frac}
        # step n (numbered from 1, as everywhere a person reads them) runs at lr_at(n - 1)
        old, new = lr_at(resume.planned - 1, steps=resume.planned, **kw), lr_at(start, steps=tc.steps, **kw)
        lines.append(f"warning: --extend: the run was planned for {resume.planned} steps (its lr was {old:.3g} at "
                     f"step {resume.planned}); its {tc.lr_schedule} schedule now spans {tc.steps}: lr "
                     f"{new:.3g} at step {start + 1}, {lr_at(tc.steps - 1, steps=tc.steps, **kw):.3g} at step "
                     f"{tc.steps}. The result is not bitwise an uninterrupted {tc.steps}-step run")
    if damaged:
        lines.append(f"warning: {damaged} damaged line(s) of metrics.jsonl could not be read and were dropped")
    epochs = tc.steps * A / batches_per_epoch
    if epochs > EPOCHS_WARNING:
        lines.append(f"warning: {tc.steps} steps read the training data {epochs:,.0f} times over "
                     f"({batches_per_epoch} batches per pass): a corpus this small is memorized; use more data or "
                     "fewer steps")
    return lines
