"""The training loop: data -> step -> log / eval / sample / checkpoint.

`run(TrainConfig(...))` is what `llmpy train` calls. Steps are numbered from 0; step s evaluates (when due),
then runs grad_accum micro-batches, clips, and updates with lr_at(s). A checkpoint written after step s holds the
state from which step s+1 starts: weights, AdamW moments, loader position, sampler RNG, so that a resumed run's
loss sequence is bitwise the uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..backends import get_backend, resolve_device
from ..config import GPT2Config, config_from_name
from ..distributed.dataparallel import Dist
from ..errors import UserError
from ..models.gpt2 import GPT2
from .checkpointing import load_shard, prune_shards, save_shard
from .config import CHECKPOINT, DEFAULT_MODEL, TrainConfig
from .metrics import MetricsLog
from .optim import AdamW, lr_at
from .step import TrainStep

@dataclass
class TrainResult:
    out: Path
    steps_done: int
    world: int = 1
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0


class _StopFlag:
    """Ctrl-C (SIGINT) / SIGTERM ask the loop to stop at the next step boundary and checkpoint; a second
    Ctrl-C interrupts at once (the previous checkpoint stays intact: every write is atomic)."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        if _in_main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step (Ctrl-C again to abort at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _in_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


# ---------------------------------------------------------------------------------------------------- set-up

def _load_init(tc: TrainConfig) -> tuple[GPT2Config, dict | None, str]:
    """(config, weights or None for a fresh init, description)."""
    from ..formats.checkpoint import load_weights
    spec = tc.init or DEFAULT_MODEL
    if os.path.exists(spec):
        cfg, params = load_weights(spec)
        return cfg, params, f"weights from {spec}"
    if os.sep in spec or spec.endswith((".bin", ".safetensors")):
        raise UserError(f"--init {spec}: no such file")
    return config_from_name(spec), None, f"{spec}, fresh init (seed {tc.seed})"


def _data_globs(tc: TrainConfig, dist) -> tuple[str, str | None]:
    if tc.train_data is None:
        from ..data.prepare import prepare_shakespeare
        if not dist.main:
            dist.barrier()  # rank 0 prepares the corpus once; the others wait, then read it
        train, val = prepare_shakespeare()
        if dist.main:
            dist.barrier()
        return train, tc.val_data or val
    return tc.train_data, tc.val_data


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**30:.3f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def _rng_state(rng: np.random.Generator) -> dict:
    return rng.bit_generator.state


# ---------------------------------------------------------------------------------------------------- loop

def run(tc: TrainConfig, *, dist: Dist | None = None) -> TrainResult:
    """dist: this process's place in a data-parallel job; by default read from the environment (launcher, MPI,
    Slurm). Tests pass ranks that are threads over an in-process communicator, on the CPU."""
    from ..data.loader import DataLoader
    from ..formats.checkpoint import load_checkpoint, save_checkpoint

    resume_ckpt = None
    if tc.resume:
        path = Path(tc.resume)
        path = path / CHECKPOINT if path.is_dir() else path
        if not path.exists():
            raise UserError(f"--resume {tc.resume}: no {CHECKPOINT} there")
        resume_ckpt = load_checkpoint(path)
        if "train" not in resume_ckpt.state:
            raise UserError(f"{path} holds weights only (no training state): use --init {path} instead")
        tc = _merge_resume(tc, resume_ckpt.state["train"])
    tc.check()
    dist = dist if dist is not None else Dist.start(tc)
    device = "cuda" if dist.world > 1 and tc.device == "auto" else resolve_device(tc.device)
    dtype = tc.dtype or ("bf16" if device == "cuda" else "fp32")
    if device == "cpu" and dtype != "fp32":
        raise UserError("--dtype bf16 needs --device cuda (the CPU reference runs in fp32)")
    out = Path(tc.out or tc.resume or time.strftime("runs/%Y%m%d-%H%M%S"))
    if resume_ckpt is None and (out / CHECKPOINT).exists():
        raise UserError(f"{out} already holds a run: continue it with --resume {out}, or choose another --out")
    if resume_ckpt is not None:
        was = (resume_ckpt.state.get("world", 1), resume_ckpt.state.get("train", {}).get("zero", 0))
        if was[1] >= 1 and was[0] != dist.world:
            raise UserError(f"{tc.resume} was written by {was[0]} ranks with --zero {was[1]}: its optimizer shards "
                            f"only fit {was[0]} ranks (this run has {dist.world}); resume with the same world size")
    out.mkdir(parents=True, exist_ok=True)
    say = print if dist.main else _quiet

    if resume_ckpt is not None:
        cfg, params, what = resume_ckpt.cfg, resume_ckpt.params, f"resumed from {tc.resume}"
    else:
        cfg, params, what = _load_init(tc)
    be = get_backend(device, dtype, device_id=dist.env.local_rank if dist.world > 1 else None)
    comm = dist.connect(be)
    B, T, A = tc.batch_size, tc.seq_len, tc.grad_accum
    recompute = tc.recompute if tc.recompute is not None else (1 if device == "cuda" else 0)
    model = GPT2(cfg, be, B, T, recompute=recompute, master_weights=tc.master_weights, rank=dist.rank,
                 world=dist.world, zero=tc.zero if dist.world > 1 else 0)
    if params is None:
        model.init_weights(tc.seed)
    else:
        model.load_params(params)
    opt = AdamW(model, beta1=tc.beta1, beta2=tc.beta2, eps=tc.eps, weight_decay=tc.weight_decay, seed=tc.seed,
                comm=comm)
    stepper = TrainStep(model, opt, A, grad_clip=tc.grad_clip, graph=tc.graph, comm=comm)

    train_glob, val_glob = _data_globs(tc, dist)
    train_loader = DataLoader(train_glob, B, T, rank=dist.rank, world=dist.world, shuffle=tc.shuffle, seed=tc.seed,
                              vocab_size=cfg.vocab_size)
    val_loader = DataLoader(val_glob, B, T, vocab_size=cfg.vocab_size) if val_glob else None
    val_batches = min(tc.val_batches, val_loader.num_batches_per_epoch) if val_loader else 0
    sample_rng = np.random.default_rng([tc.seed, 1])
    start = 0
    if resume_ckpt is not None:
        st = resume_ckpt.state
        if opt.sharded:
            m, v = load_shard(out, int(st["step"]), dist)
            opt.load_moments(m, v)
        elif resume_ckpt.adam_m is None:
            raise UserError(f"{tc.resume} has no optimizer state to resume from")
        else:
            opt.load_moments(resume_ckpt.adam_m, resume_ckpt.adam_v)
        if resume_ckpt.compute_bf16 is not None:  # the compute copy was stochastically rounded: exact bits
            for name in model.params.shapes:
                be.copy_(model.params[name], be.asarray(resume_ckpt.compute_bf16[name].view(be.param_dtype)))
        opt.t = int(st["adam_t"])
        start = int(st["step"])
        train_loader.load_state(st["loader"])
        sample_rng.bit_generator.state = st["sample_rng"]
    log = MetricsLog(out / "metrics.jsonl", keep_before=start) if dist.main else _NullLog()

    plan = model.memory_plan()
    plan["optimizer"] = opt.nbytes()
    tokens_per_step = B * T * A * dist.world
    if dist.world > 1:
        say(f"data parallel: {dist.world} ranks over NCCL, ZeRO-{model.zero}; memory below is per rank")
    say(f"model: GPT-2 L={cfg.num_layers} H={cfg.num_heads} C={cfg.channels} maxT={cfg.max_seq_len} "
          f"V={cfg.vocab_size} ({cfg.num_params() / 1e6:.1f}M parameters), {what}")
    say(f"device: {device} {dtype}, recompute {recompute}; memory plan: "
          + ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in plan.items()) + f"; total {_fmt_bytes(sum(plan.values()))}")
    say(f"data: train {train_glob} ({train_loader.num_batches_per_epoch} batches/epoch), "
        f"val {val_glob or 'none'}; batch {B}x{T}x{A}x{dist.world} = {tokens_per_step} tokens/step")
    say(f"training steps {start}..{tc.steps - 1}, lr {tc.lr} {tc.lr_schedule}, output {out}/", flush=True)

    def save(next_step: int) -> None:
        """Collective under data parallelism: a sharded master is gathered; each rank writes its optimizer
        shard (named by step) before rank 0 replaces the checkpoint, which then names that step."""
        state = {"step": next_step, "adam_t": opt.t, "loader": train_loader.state(), "world": dist.world,
                 "sample_rng": _rng_state(sample_rng), "train": dataclasses.asdict(tc)}
        weights = model.params_numpy(comm)
        if opt.sharded:
            save_shard(out, next_step, dist, *opt.moments_numpy())
            dist.barrier()
        if dist.main:
            compute = None
            if np.dtype(be.param_dtype) != np.float32:
                compute = {n: np.asarray(be.to_numpy(model.params[n])).view(np.uint16) for n in model.params.shapes}
            m, v = (None, None) if opt.sharded else opt.moments_numpy()
            save_checkpoint(out / CHECKPOINT, cfg, weights, adam_m=m, adam_v=v, state=state, compute_bf16=compute)
        if opt.sharded:
            dist.barrier()
            prune_shards(out, next_step, dist)

    def evaluate(step: int) -> None:
        if val_loader is None:
            return
        val_loader.reset()
        total = 0.0
        for i in range(val_batches):  # the first val_batches batches, shared out over the ranks
            x, y = val_loader.next_batch()
            if i % dist.world == dist.rank:
                total += model.forward(x, y)  # no grad_scale: gradients and the step's loss sum are untouched
        loss = dist.sum(total) / val_batches
        if not math.isfinite(loss):
            raise UserError(f"val loss is {loss} at step {step}: the weights hold NaN/Inf; "
                            f"last good checkpoint: {out / CHECKPOINT}")
        log.write({"step": step, "val_loss": loss})
        result.val_losses.append((step, loss))
        if dist.main:
            bar.write(f"step {step}: val loss {loss:.4f}")

    def sample(step: int) -> None:
        """Rank 0 generates; under ZeRO every rank takes part in gathering the sharded weights first."""
        if not (dist.main or opt.sharded):
            return
        weights = model.params_numpy(comm)
        if not dist.main:
            return
        from ..sample import generate
        from ..data.tokenizers import get_tokenizer
        tok = get_tokenizer()
        ids = generate(weights, cfg, [tok.eot], tc.sample_tokens, rng=sample_rng, top_k=40)
        bar.write(f"--- sample at step {step} ---\n{tok.decode(ids)}\n---")

    result = TrainResult(out=out, steps_done=start, world=dist.world)
    bar = _progress(tc, start, dist.main)
    t_start = time.perf_counter()
    last = min(tc.steps, tc.stop_at + 1) if tc.stop_at is not None else tc.steps
    pending = []  # the launched step whose result is not read yet: [(step, lr, handle)]
    clock = [time.perf_counter()]

    def finish() -> None:
        """Reads the pending step's loss and norm (the next step may already be running) and logs it."""
        if not pending:
            return
        step, lr, handle = pending.pop()
        loss, norm = handle.result()
        now = time.perf_counter()
        tps = tokens_per_step / (now - clock[0])
        clock[0] = now
        if not (math.isfinite(loss) and math.isfinite(norm)):
            raise UserError(f"training diverged at step {step}: loss {loss}, grad norm {norm} "
                            f"(lr {lr:.3g}); the update was not applied and nothing was saved; "
                            f"last good checkpoint: {_last_ckpt(out)}. Try a lower --lr or --grad-clip 1")
        log.write({"step": step, "train_loss": loss, "lr": lr, "grad_norm": norm, "tokens_per_s": tps})
        result.train_losses.append(loss)
        result.steps_done = step + 1
        bar.update(1)
        bar.set_postfix_str(f"loss {loss:.4f} | {tps:,.0f} tok/s | lr {lr:.2e}", refresh=False)

    def pause(fn, *a) -> None:  # evaluation, sampling, saving: after the pending step, off the step clock
        finish()
        fn(*a)
        clock[0] = time.perf_counter()

    # divergence is detected and reported in finish(); NumPy's overflow warnings on the way there are noise
    with _StopFlag() as stop, np.errstate(over="ignore", invalid="ignore"):
        try:
            for step in range(start, last):
                if tc.val_every and step % tc.val_every == 0:
                    pause(evaluate, step)
                if tc.sample_every and step > 0 and step % tc.sample_every == 0:
                    pause(sample, step)
                lr = lr_at(step, lr=tc.lr, schedule=tc.lr_schedule, steps=tc.steps, warmup=tc.warmup_steps,
                           final_frac=tc.final_lr_frac, decay_frac=tc.decay_frac)
                handle = stepper.launch((train_loader.next_batch() for _ in range(A)), lr)
                finish()  # the previous step, while the GPU works on this one
                pending.append((step, lr, handle))
                dist.progress()
                _inject_fault(dist.rank, step)
                if dist.stop_agreed(stop.requested):  # every rank stops after the same step
                    break
                if tc.checkpoint_every and (step + 1) % tc.checkpoint_every == 0 and step + 1 < last:
                    pause(save, step + 1)
            finish()
        finally:
            bar.close()
        done = result.steps_done
        if done == tc.steps:
            evaluate(tc.steps)
            if tc.sample_tokens:
                sample(tc.steps)
        save(done)
    result.seconds = time.perf_counter() - t_start
    log.close()
    dist.stop()
    if not dist.main:
        return result
    _plot(out, log)
    if done < tc.steps:
        print(f"stopped after step {done - 1}; continue with: llmpy train --resume {out}")
    print(f"done: {done - start} steps in {result.seconds:.1f} s; checkpoint {out / CHECKPOINT}, "
          f"metrics {out / 'metrics.jsonl'}, loss curve {out / 'loss.png'}")
    if be.name == "cuda":
        import cupy
        print(f"peak GPU memory held: {cupy.get_default_memory_pool().total_bytes() / 2**30:.2f} GiB per rank")
    return result


def _last_ckpt(out: Path) -> str:
    p = out / CHECKPOINT
    return str(p) if p.exists() else "none yet"


def _merge_resume(tc: TrainConfig, saved: dict) -> TrainConfig:
    """A resumed run takes its settings from the checkpoint; flags given now override (steps, out, ...)."""
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


def _progress(tc: TrainConfig, start: int, main: bool = True):
    from tqdm import tqdm
    total = (min(tc.steps, tc.stop_at + 1) if tc.stop_at is not None else tc.steps)
    return tqdm(total=total, initial=start, desc="train", unit="step", disable=not (tc.progress and main),
                dynamic_ncols=True, file=sys.stderr)


def _inject_fault(rank: int, step: int) -> None:
    """For testing fault handling: LLMPY_FAULT_INJECT=R:S makes rank R die abruptly at step S."""
    spec = os.environ.get("LLMPY_FAULT_INJECT")
    if spec and spec == f"{rank}:{step}":
        print(f"rank {rank}: dying at step {step} (LLMPY_FAULT_INJECT)", file=sys.stderr, flush=True)
        os._exit(9)


def _quiet(*args, **kwargs) -> None:
    pass


class _NullLog:
    path = None

    def write(self, event: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _plot(out: Path, log: MetricsLog) -> None:
    from .metrics import plot_losses
    plot_losses(log.path, out / "loss.png")
