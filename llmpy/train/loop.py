"""The training loop: data -> step -> log / eval / sample / checkpoint.

`run(TrainConfig(...))` is what `llmpy train` calls: `Trainer(tc)` sets up (settings, device, model, optimizer,
data, and the state of a resumed run), `loop()` runs the steps, `finish()` evaluates, samples and saves at the end.
Steps are numbered from 0; step s evaluates (when due), then runs grad_accum micro-batches, clips, and updates with
lr_at(s). The host launches step s+1 before reading step s's loss, so the GPU never waits for it.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..backends import get_backend, resolve_device
from ..config import config_from_name, family_of
from ..distributed.dataparallel import Dist
from ..errors import UserError
from . import checkpointing
from .checkpointing import CHECKPOINT
from .config import DEFAULT_MODEL, TrainConfig
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


def run(tc: TrainConfig, *, dist: Dist | None = None) -> TrainResult:
    """dist: this process's place in a data-parallel job; by default read from the environment (launcher, MPI,
    Slurm). Tests pass ranks that are threads over an in-process communicator, on the CPU."""
    trainer = Trainer(tc, dist)
    # divergence is detected and reported when a step's result is read; NumPy's overflow warnings on the way
    # there are noise
    with _StopFlag() as stop, np.errstate(over="ignore", invalid="ignore"):
        trainer.loop(stop)
        trainer.finish()
    return trainer.report()


class Trainer:
    # ---- set-up ---------------------------------------------------------------------------------------------
    def __init__(self, tc: TrainConfig, dist: Dist | None = None):
        from ..data.loader import DataLoader
        resume = None
        if tc.resume:
            tc, resume = checkpointing.open_resume(tc)
        tc.check()
        dist = dist if dist is not None else Dist.start(tc)
        device = "cuda" if dist.world > 1 and tc.device == "auto" else resolve_device(tc.device)
        dtype = tc.dtype or ("bf16" if device == "cuda" else "fp32")
        if device == "cpu" and dtype != "fp32":
            raise UserError("--dtype bf16 needs --device cuda (the CPU reference runs in fp32)")
        out = Path(tc.out or tc.resume or time.strftime("runs/%Y%m%d-%H%M%S"))
        if resume is None and (out / CHECKPOINT).exists():
            raise UserError(f"{out} already holds a run: continue it with --resume {out}, or choose another --out")
        if resume is not None:
            was = (resume.state.get("world", 1), resume.state.get("train", {}).get("zero", 0))
            if was[1] >= 1 and was[0] != dist.world:
                raise UserError(f"{tc.resume} was written by {was[0]} ranks with --zero {was[1]}: its optimizer "
                                f"shards only fit {was[0]} ranks (this run has {dist.world}); resume with the same "
                                "world size")
        out.mkdir(parents=True, exist_ok=True)
        self.tc, self.dist, self.out = tc, dist, out
        self.say = print if dist.main else _quiet

        if resume is not None:
            cfg, params, what = resume.cfg, resume.params, f"resumed from {tc.resume}"
        else:
            cfg, params, what = _load_init(tc)
        be = get_backend(device, dtype, device_id=dist.env.local_rank if dist.world > 1 else None)
        self.comm = comm = dist.connect(be)
        B, T, A = tc.batch_size, tc.seq_len, tc.grad_accum
        recompute = tc.recompute if tc.recompute is not None else (1 if device == "cuda" else 0)
        model = family_of(cfg).model(cfg, be, B, T, recompute=recompute, master_weights=tc.master_weights,
                                     rank=dist.rank, world=dist.world, zero=tc.zero if dist.world > 1 else 0)
        if params is None:
            model.init_weights(tc.seed)
        else:
            model.load_params(params)
        opt = AdamW(model, beta1=tc.beta1, beta2=tc.beta2, eps=tc.eps, weight_decay=tc.weight_decay, seed=tc.seed,
                    comm=comm)
        self.cfg, self.be, self.model, self.opt = cfg, be, model, opt
        self.stepper = TrainStep(model, opt, A, grad_clip=tc.grad_clip, graph=tc.graph, comm=comm)

        train_glob, val_glob = _data_globs(tc, dist)
        self.train_loader = DataLoader(train_glob, B, T, rank=dist.rank, world=dist.world, shuffle=tc.shuffle,
                                       seed=tc.seed, vocab_size=cfg.vocab_size)
        self.val_loader = DataLoader(val_glob, B, T, vocab_size=cfg.vocab_size) if val_glob else None
        self.val_batches = min(tc.val_batches, self.val_loader.num_batches_per_epoch) if self.val_loader else 0
        self.sample_rng = np.random.default_rng([tc.seed, 1])
        self.start = 0
        if resume is not None:
            self.start = checkpointing.restore(resume, tc, out, model, opt, self.train_loader, self.sample_rng, dist)
        self.log = MetricsLog(out / "metrics.jsonl", keep_before=self.start) if dist.main else _NullLog()
        self.result = TrainResult(out=out, steps_done=self.start, world=dist.world)
        self.tokens_per_step = B * T * A * dist.world
        self._decoder = None

        plan = model.memory_plan()
        plan["optimizer"] = opt.nbytes()
        say = self.say
        if dist.world > 1:
            say(f"data parallel: {dist.world} ranks over NCCL, ZeRO-{model.zero}; memory below is per rank")
        n_params = sum(math.prod(s.shape) for s in model.specs)
        say(f"model: {cfg.describe()} ({n_params / 1e6:.1f}M parameters), {what}")
        say(f"device: {device} {dtype}, recompute {recompute}; memory plan: "
            + ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in plan.items()) + f"; total {_fmt_bytes(sum(plan.values()))}")
        say(f"data: train {train_glob} ({self.train_loader.num_batches_per_epoch} batches/epoch), "
            f"val {val_glob or 'none'}; batch {B}x{T}x{A}x{dist.world} = {self.tokens_per_step} tokens/step")
        say(f"training steps {self.start}..{tc.steps - 1}, lr {tc.lr} {tc.lr_schedule}, output {out}/", flush=True)

    # ---- the step loop --------------------------------------------------------------------------------------
    def loop(self, stop) -> None:
        tc, dist = self.tc, self.dist
        self.t_start = time.perf_counter()
        last = min(tc.steps, tc.stop_at + 1) if tc.stop_at is not None else tc.steps
        self.pending = []  # the launched step whose result is not read yet: [(step, lr, handle)]
        self.clock = time.perf_counter()
        self.bar = _progress(tc, self.start, dist.main)
        try:
            for step in range(self.start, last):
                if tc.val_every and step % tc.val_every == 0:
                    self._pause(self.evaluate, step)
                if tc.sample_every and step > 0 and step % tc.sample_every == 0:
                    self._pause(self.sample, step)
                lr = lr_at(step, lr=tc.lr, schedule=tc.lr_schedule, steps=tc.steps, warmup=tc.warmup_steps,
                           final_frac=tc.final_lr_frac, decay_frac=tc.decay_frac)
                handle = self.stepper.launch((self.train_loader.next_batch() for _ in range(tc.grad_accum)), lr)
                self._read_pending()  # the previous step, while the device works on this one
                self.pending.append((step, lr, handle))
                dist.progress()
                _inject_fault(dist.rank, step)
                if dist.stop_agreed(stop.requested):  # every rank stops after the same step
                    break
                if tc.checkpoint_every and (step + 1) % tc.checkpoint_every == 0 and step + 1 < last:
                    self._pause(self.save, step + 1)
            self._read_pending()
        finally:
            self.bar.close()

    def _read_pending(self) -> None:
        """Reads the pending step's loss and norm (the next step may already be running) and logs it."""
        if not self.pending:
            return
        step, lr, handle = self.pending.pop()
        loss, norm = handle.result()
        now = time.perf_counter()
        tps = self.tokens_per_step / (now - self.clock)
        self.clock = now
        if not (math.isfinite(loss) and math.isfinite(norm)):
            raise UserError(f"training diverged at step {step}: loss {loss}, grad norm {norm} "
                            f"(lr {lr:.3g}); the update was not applied and nothing was saved; "
                            f"last good checkpoint: {checkpointing.last_checkpoint(self.out)}. Try a lower --lr or "
                            "--grad-clip 1")
        self.log.write({"step": step, "train_loss": loss, "lr": lr, "grad_norm": norm, "tokens_per_s": tps})
        self.result.train_losses.append(loss)
        self.result.steps_done = step + 1
        self.bar.update(1)
        self.bar.set_postfix_str(f"loss {loss:.4f} | {tps:,.0f} tok/s | lr {lr:.2e}", refresh=False)

    def _pause(self, fn, *a) -> None:
        """Evaluation, sampling, saving: after the pending step, off the step clock."""
        self._read_pending()
        fn(*a)
        self.clock = time.perf_counter()

    def evaluate(self, step: int) -> None:
        """The mean loss over the first val_batches batches, shared out over the ranks."""
        dist, loader = self.dist, self.val_loader
        if loader is None:
            return
        loader.reset()
        total = 0.0
        for i in range(self.val_batches):
            x, y = loader.next_batch()
            if i % dist.world == dist.rank:
                total += self.model.forward(x, y)  # no grad_scale: gradients and the step's loss sum untouched
        loss = dist.sum(total) / self.val_batches
        if not math.isfinite(loss):
            raise UserError(f"val loss is {loss} at step {step}: the weights hold NaN/Inf; "
                            f"last good checkpoint: {self.out / CHECKPOINT}")
        self.log.write({"step": step, "val_loss": loss})
        self.result.val_losses.append((step, loss))
        if dist.main:
            self.bar.write(f"step {step}: val loss {loss:.4f}")

    def sample(self, step: int) -> None:
        """Rank 0 generates on the CPU through the family's own forward; under ZeRO every rank takes part in
        gathering the sharded weights first."""
        if not (self.dist.main or self.opt.sharded):
            return
        weights = self.model.params_numpy(self.comm)
        if not self.dist.main:
            return
        from ..backends import get_backend
        from ..data.tokenizers import get_tokenizer
        from ..models.decode import decoder, generate
        if self._decoder is None:
            self._decoder = decoder(self.cfg, weights, get_backend("cpu"))
        else:
            self._decoder.load_params(weights)
        tok = get_tokenizer()
        ids = generate(self._decoder, [tok.eot], self.tc.sample_tokens, rng=self.sample_rng, top_k=40)
        self.bar.write(f"--- sample at step {step} ---\n{tok.decode(ids)}\n---")

    def save(self, next_step: int) -> None:
        checkpointing.save(self.out, next_step, self.tc, self.model, self.opt, self.train_loader, self.sample_rng,
                           self.dist, self.comm)

    # ---- the end --------------------------------------------------------------------------------------------
    def finish(self) -> None:
        """After the last step (or a stop): the final evaluation and sample when the run is complete, then the
        checkpoint."""
        done = self.result.steps_done
        if done == self.tc.steps:
            self.evaluate(self.tc.steps)
            if self.tc.sample_tokens:
                self.sample(self.tc.steps)
        self.save(done)

    def report(self) -> TrainResult:
        res, out, dist = self.result, self.out, self.dist
        res.seconds = time.perf_counter() - self.t_start
        self.log.close()
        dist.stop()
        if not dist.main:
            return res
        from .metrics import plot_losses
        plot_losses(self.log.path, out / "loss.png")
        done = res.steps_done
        if done < self.tc.steps:
            print(f"stopped after step {done - 1}; continue with: llmpy train --resume {out}")
        print(f"done: {done - self.start} steps in {res.seconds:.1f} s; checkpoint {out / CHECKPOINT}, "
              f"metrics {out / 'metrics.jsonl'}, loss curve {out / 'loss.png'}")
        if self.be.name == "cuda":
            import cupy
            print(f"peak GPU memory held: {cupy.get_default_memory_pool().total_bytes() / 2**30:.2f} GiB per rank")
        return res


# ---------------------------------------------------------------------------------------------------- helpers

def _load_init(tc: TrainConfig):
    """(config, weights or None for a fresh init, description)."""
    from ..formats.checkpoint import load_weights
    name = tc.init or DEFAULT_MODEL
    if os.path.exists(name):
        cfg, params = load_weights(name)
        return cfg, params, f"weights from {name}"
    if os.sep in name or name.endswith((".bin", ".safetensors")):
        raise UserError(f"--init {name}: no such file")
    return config_from_name(name), None, f"{name}, fresh init (seed {tc.seed})"


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


class _StopFlag:
    """Ctrl-C (SIGINT) / SIGTERM ask the loop to stop at the next step boundary and checkpoint; a second
    Ctrl-C interrupts at once (the previous checkpoint stays intact: every write is atomic)."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
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
