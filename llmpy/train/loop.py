"""The training loop: data -> step -> log / eval / sample / checkpoint.

`run(TrainConfig(...))` is what `llmpy train` calls: `Trainer(tc)` sets up (settings, device, model, optimizer,
data, and the state of a resumed run), `loop()` runs the steps, `finish()` evaluates, samples and saves at the end.
Steps are counted as steps done, everywhere a person sees them (the bar, step lines, metrics.jsonl, --stop-at,
--checkpoint-every, checkpoint names, the summary): "step n" is the n-th optimizer step, after which n are done.
Before step n+1 the loop evaluates when due (the val loss logged at n describes the weights after n steps), then
runs grad_accum micro-batches, clips, and updates with lr_at(n) (the schedule's position counts from 0). The host
launches the next step before reading the previous one's loss, so the GPU never waits for it.
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..backends import get_backend, resolve_device
from ..config import family_of
from ..distributed.dataparallel import Dist
from ..errors import UserError
from . import checkpointing, setup
from .checkpointing import CHECKPOINT
from .config import TrainConfig
from .metrics import MetricsLog
from .optim import AdamW, lr_at
from .progress import Progress
from .rundir import LOCK, RUN_FILE, RunDir
from .step import TrainStep


@dataclass
class TrainResult:
    out: Path
    steps_done: int
    world: int = 1
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    evals: list[tuple[int, str, float, float]] = field(default_factory=list)  # (step, task, acc, acc_norm)
    seconds: float = 0.0
    signal: int | None = None  # the signal (SIGINT, SIGTERM) that stopped the run before its last step


def run(tc: TrainConfig, *, dist: Dist | None = None) -> TrainResult:
    """dist: this process's place in a data-parallel job; by default read from the environment (launcher, MPI,
    Slurm). Tests pass ranks that are threads over an in-process communicator, on the CPU."""
    trainer = Trainer(tc, dist)
    try:
        # divergence is detected and reported when a step's result is read; NumPy's overflow warnings on the way
        # there are noise
        with _StopFlag() as stop, np.errstate(over="ignore", invalid="ignore"):
            trainer.loop(stop)
            trainer.finish()
        if trainer.result.steps_done < trainer.last:
            trainer.result.signal = stop.signum
        return trainer.report()
    finally:
        trainer.run_dir.release()


class Trainer:
    # ---- set-up ---------------------------------------------------------------------------------------------
    def __init__(self, tc: TrainConfig, dist: Dist | None = None):
        resume = None
        if tc.resume:
            if tc.overwrite:
                raise UserError("--overwrite starts a new run over an earlier one; --resume continues a run (drop "
                                "--overwrite)")
            try:
                tc, resume = checkpointing.open_resume(tc)  # reads only; refuses a resume that means nothing
            except UserError:
                folder = Path(tc.resume) if os.path.isdir(tc.resume) else Path(tc.resume).parent
                if tc.out is None or Path(tc.out).resolve() == folder.resolve():  # a run continued in place
                    freed = RunDir.sweep(folder)  # a finished run is never claimed again: its kill's leftovers
                    if freed:
                        print(f"removed temporary files of interrupted writes from {folder} ({_fmt_bytes(freed)})")
                raise
        tc.check()
        dist = dist if dist is not None else Dist.start(tc)
        device = "cuda" if dist.world > 1 and tc.device == "auto" else resolve_device(tc.device)
        dtype = tc.dtype or ("bf16" if device == "cuda" else "fp32")
        if device == "cpu" and dtype == "bf16":
            raise UserError("--dtype bf16 needs --device cuda (the CPU reference runs in fp32; --dtype fp8 is "
                            "emulated there)")
        setup.check_flags(tc, "fp32" if device == "cpu" else dtype)  # (the weights' dtype: fp8 runs bf16 ones)
        out = Path(tc.out or time.strftime("runs/%Y%m%d-%H%M%S"))
        in_place = resume is not None and checkpointing.continues_in_place(out, resume)
        if resume is not None:
            was = (resume.state["world"], resume.state["train"].get("zero", 0))
            if was[1] >= 1 and was[0] != dist.world:
                raise UserError(f"{tc.resume} was written by {was[0]} ranks with --zero {was[1]}: its optimizer "
                                f"shards only fit {was[0]} ranks (this run has {dist.world}); resume with the same "
                                "world size")
        _check_target(out, resume, in_place, tc.overwrite)
        self.tc, self.dist, self.out = tc, dist, out
        self.say = print if dist.main else _quiet
        be = get_backend(device, dtype, device_id=dist.env.local_rank if dist.world > 1 else None)
        if tc.fast_attention:
            if not hasattr(be, "fast_attention"):
                raise UserError("--fast-attention is for CUDA devices (cuDNN's attention backward)")
            be.fast_attention = True
            self.say("note: --fast-attention: cuDNN's non-deterministic attention backward; this run is not "
                     "bitwise reproducible")
        if tc.tune_gemm:
            if not hasattr(be, "gemm"):
                raise UserError("--tune-gemm is for CUDA devices (it times cuBLASLt's algorithms)")
            be.gemm.tune = True  # with several ranks they agree on rank 0's choices before the first step
        pins = resume.ckpt.state.get("gemm_algos") if resume is not None else None
        if pins and hasattr(be, "gemm"):
            try:  # a resume replays the products' algorithms: the same kernels, the same bits
                be.gemm.load_pins(pins)
            except UserError as e:
                self.say(f"note: {e}; resuming with {'tuned' if tc.tune_gemm else 'default'} algorithms")
        elif tc.gemm_algos and resume is None:
            if not hasattr(be, "gemm"):
                raise UserError("--gemm-algos is for CUDA devices (cuBLASLt's algorithm choices)")
            be.gemm.load_pins(checkpointing.gemm_pins(tc.gemm_algos))
        self.comm = dist.connect(be)
        self.run_dir = RunDir(out)
        self._claim(resume, in_place)
        try:
            self._setup(resume, in_place, be, device, dtype)
        except BaseException:
            self.run_dir.abandon()  # a failed start leaves no empty run folder behind
            raise

    def _claim(self, resume, in_place: bool) -> None:
        """Rank 0 locks the run folder and checks what it holds; every rank stops if that failed."""
        err, out = None, self.out
        if self.dist.main:
            try:
                freed = self.run_dir.claim()
                earlier = _check_target(out, resume, in_place, self.tc.overwrite)  # again, now that it is ours
                if freed:
                    self.say(f"removed temporary files of interrupted writes from {out} ({_fmt_bytes(freed)})")
                if earlier:  # --overwrite
                    for p in earlier:
                        p.unlink()
                    self.say(f"--overwrite: removed the earlier run's {', '.join(p.name for p in earlier)} from "
                             f"{out}")
            except UserError as e:
                self.run_dir.abandon()
                err = e
        if self.dist.sum(float(err is not None)) > 0:
            raise err or UserError(f"rank 0 could not take the run folder {out}")

    def _setup(self, resume, in_place: bool, be, device: str, dtype: str) -> None:
        from ..data.loader import DataLoader
        tc, dist, out, say = self.tc, self.dist, self.out, self.say
        if resume is not None:
            cfg, params, what = resume.ckpt.cfg, resume.ckpt.params, f"resumed from {resume.path}"
        else:
            cfg, params, what = setup.load_init(tc)
        B, T = tc.batch_size, tc.seq_len
        A = setup.grad_accum(tc, dist.world)
        recompute = tc.recompute if tc.recompute is not None else (1 if device == "cuda" else 0)
        n_params = setup.check_size(cfg, device)
        try:
            model = family_of(cfg).model(cfg, be, B, T, recompute=recompute, recompute_keep=tc.recompute_keep,
                                         master_weights=tc.master_weights,
                                         rank=dist.rank, world=dist.world, zero=tc.zero if dist.world > 1 else 0)
            if params is None:
                model.init_weights(tc.seed)
            else:
                model.load_params(params)
            opt = AdamW(model, beta1=tc.beta1, beta2=tc.beta2, eps=tc.eps, weight_decay=tc.weight_decay,
                        seed=tc.seed, comm=self.comm, moments=tc.moments)
        except MemoryError as e:
            raise UserError(f"{cfg.describe()} ({n_params / 1e6:,.1f}M parameters) with batch {B}x{T} does not fit "
                            f"in {device} memory ({e})") from None
        self.cfg, self.be, self.model, self.opt = cfg, be, model, opt
        self.stepper = TrainStep(model, opt, A, grad_clip=tc.grad_clip, graph=tc.graph, comm=self.comm)

        train_glob, val_glob = setup.data_globs(tc, dist, cfg)
        self.train_loader = DataLoader(train_glob, B, T, rank=dist.rank, world=dist.world, shuffle=tc.shuffle,
                                       seed=tc.seed, vocab_size=cfg.vocab_size)
        self.val_loader = DataLoader(val_glob, B, T, vocab_size=cfg.vocab_size, val=True) if val_glob else None
        self.val_batches = min(tc.val_batches, self.val_loader.num_batches_per_epoch) if self.val_loader else 0
        self.sample_rng = np.random.default_rng([tc.seed, 1])
        self.start, self.saved_step, self.saved_path = 0, None, None
        if resume is not None:
            self.start = checkpointing.restore(resume, model, opt, self.train_loader, self.sample_rng, dist)
            self.saved_path = resume.path  # left as it is until this run saves
            self.saved_step = self.start if in_place else None
        self.last = min(tc.steps, tc.stop_at) if tc.stop_at is not None else tc.steps  # steps done at the end
        self.result = TrainResult(out=out, steps_done=self.start, world=dist.world)
        self.tokens_per_step = B * T * A * dist.world
        self._decoder = None
        self._scorer, self.eval_examples = None, {}
        if tc.eval_tasks:  # downloaded once into the cache (the first run of a task fetches it)
            from ..evals import check_tasks, load_task
            for task in check_tasks(tc.eval_tasks):
                self.eval_examples[task] = load_task(task, progress=dist.main)[:tc.eval_limit]
            say(f"eval: {', '.join(f'{t} ({len(e)} examples)' for t, e in self.eval_examples.items())}, "
                + (f"every {tc.eval_every} steps and " if tc.eval_every else "") + "after the last")

        plan = model.memory_plan()
        plan["optimizer"] = opt.nbytes()
        if dist.world > 1:
            say(f"data parallel: {dist.world} ranks over NCCL, ZeRO-{model.zero}; memory below is per rank")
        say(f"model: {cfg.describe()} ({n_params / 1e6:.1f}M parameters), {what}")
        keep = f" (the first {tc.recompute_keep} layers keep theirs)" if tc.recompute_keep else ""
        say(f"device: {device} {dtype}, recompute {recompute}{keep}; memory plan: "
            + ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in plan.items()) + f"; total {_fmt_bytes(sum(plan.values()))}")
        say(f"data: train {train_glob} ({self.train_loader.num_batches_per_epoch} batches/epoch), "
            f"val {val_glob or 'none'}; batch {B}x{T}x{A}x{dist.world} = {self.tokens_per_step} tokens/step")
        steps = (f"training steps {self.start + 1}..{self.last}" if self.last > self.start else "training: no steps")
        steps += f" of {tc.steps}" if self.last < tc.steps or self.start else ""
        say(f"{steps}, lr {tc.lr} {tc.lr_schedule}, output {out}/", flush=True)
        self.sample_n, self.sample_prompt = self._plan_samples()
        # the first writes: the metrics log (a resume into a new folder copies the run's history there) and the
        # settings; everything that can refuse the run has been checked
        source = None if resume is None or in_place else resume.src / "metrics.jsonl"
        self.log = (MetricsLog(out / "metrics.jsonl", done=self.start, source=source) if dist.main
                    else _NullLog())
        for line in setup.idle_flags(tc, device, dist.world, val_glob) + setup.warnings(
                tc, resume, self.start, A, self.train_loader.num_batches_per_epoch, getattr(self.log, "damaged", 0)):
            say(line)
        if device == "cpu" and dist.main:
            line = setup.cpu_plan_warning(cfg, T, self.tokens_per_step, self.last - self.start, n_params)
            if line:
                say(line, flush=True)
        if dist.main:
            self.run_dir.write_config({
                "train": {k: v for k, v in dataclasses.asdict(tc).items() if k != "explicit"},
                "model": {"family": type(cfg).family, **cfg.to_dict()}, "parameters": n_params,
                "device": device, "dtype": dtype, "recompute": recompute, "world": dist.world,
                "tokens_per_step": self.tokens_per_step, "start_step": self.start,
                "resumed_from": str(resume.path) if resume is not None else None, "llmpy": __version__})
        flops = None
        if device == "cuda":
            try:
                flops = cfg.flops_per_token(T)
            except (AttributeError, NotImplementedError):
                pass
        self.progress = Progress(start=self.start, last=self.last, steps=tc.steps, show=dist.main,
                                 lines=not (tc.progress and sys.stderr.isatty()),
                                 tokens_per_step=self.tokens_per_step, flops_per_token=flops, world=dist.world)

    def _plan_samples(self) -> tuple[int, list[int]]:
        """(tokens per sample, the prompt): samples start at the tokenizer's document token (GPT-2's end-of-text,
        Llama 3's <|begin_of_text|>) and fit the context. Every rank knows the length (under ZeRO all of them
        gather the weights for a sample); rank 0 the prompt."""
        tc, cfg = self.tc, self.cfg
        n = min(tc.sample_tokens, cfg.max_seq_len - 1)  # after a one-token prompt
        if not n or not self.dist.main:
            return n, []
        from ..data.tokenizers import get_tokenizer, tokenizer_for
        self.tokenizer = get_tokenizer(tokenizer_for(cfg.vocab_size, tc.tokenizer))
        doc = self.tokenizer.doc
        if doc >= cfg.vocab_size:
            self.say(f"note: samples start from token 0 (the model's vocabulary of {cfg.vocab_size} has no "
                     f"document token {doc})")
        if n < tc.sample_tokens:
            self.say(f"note: samples are cropped to {n} tokens (the model's context is {cfg.max_seq_len})")
        return n, [doc if doc < cfg.vocab_size else 0]

    # ---- the step loop --------------------------------------------------------------------------------------
    def loop(self, stop) -> None:
        tc, dist = self.tc, self.dist
        self.t_start = time.perf_counter()
        self.pending = []  # the launched step whose result is not read yet: [(its number, lr, handle)]
        self.prev_ready = 0.0  # when the previous step's result existed (train/step.py)
        if tc.tune_gemm and dist.world > 1 and not self.be.gemm.loaded:
            self._tune_together()
        try:
            for done in range(self.start, self.last):  # `done` steps are done; this runs step done + 1
                if tc.val_every and done % tc.val_every == 0:
                    self._pause(self.evaluate, done)
                if tc.sample_every and done > 0 and done % tc.sample_every == 0:
                    self._pause(self.sample, done)
                if self.eval_examples and tc.eval_every and done % tc.eval_every == 0:
                    self._pause(self.score_tasks, done)
                lr = lr_at(done, lr=tc.lr, schedule=tc.lr_schedule, steps=tc.steps, warmup=tc.warmup_steps,
                           final_frac=tc.final_lr_frac, decay_frac=tc.decay_frac)
                handle = self.stepper.launch((self.train_loader.next_batch() for _ in range(self.stepper.A)), lr)
                if done == self.start and tc.tune_gemm:
                    self.progress.write(self.be.gemm.tuning_summary())
                self._read_pending()  # the previous step, while the device works on this one
                self.pending.append((done + 1, lr, handle))
                dist.progress()
                _inject_fault(dist.rank, done)
                if dist.stop_agreed(stop.requested):  # every rank stops after the same step
                    break
                if tc.checkpoint_every and (done + 1) % tc.checkpoint_every == 0 and done + 1 < self.last:
                    self._pause(self.save, done + 1)
            self._read_pending()
        finally:
            self.progress.close()

    def _tune_together(self) -> None:
        """--tune-gemm on several ranks: each times the products on one throwaway forward and backward (token 0s, no
        update, the gradients zeroed after), then every rank takes rank 0's choices (an NCCL sum of rank 0's indices
        and the others' zeros). So all ranks run the same kernels from the first step, and the checkpoint's choices
        replay the run bitwise, as on one GPU."""
        m, be, comm = self.model, self.be, self.comm
        x = np.zeros((m.B, m.T), np.int32)
        m.forward(x, x, grad_scale=1.0 / (m.B * m.T), return_loss=False)
        m.backward()
        m.zero_grad()
        keys = sorted(be.gemm.pins)
        mine = np.array([len(keys), zlib.crc32("\n".join(keys).encode())], np.float64)
        check = be.asarray(mine)
        comm.all_reduce(check)
        if not np.array_equal(be.to_numpy(check), mine * comm.world):
            raise UserError("--tune-gemm: the ranks planned different matrix products (their models or libraries "
                            "differ); run without --tune-gemm")
        idx = be.asarray(np.array([be.gemm.pins[k] if self.dist.main else 0 for k in keys], np.float64))
        comm.all_reduce(idx)
        be.gemm.adopt(dict(zip(keys, be.to_numpy(idx).astype(np.int64).tolist())))

    def _read_pending(self) -> None:
        """Reads the pending step's loss and norm (the next step may already be running) and logs it with its own
        time: from when it could start (launched, and the step before it done) to when its result existed."""
        if not self.pending:
            return
        step, lr, handle = self.pending.pop()  # step: its number, the steps done once it is
        loss, norm = handle.result()
        seconds = handle.ready - max(handle.started, self.prev_ready)
        self.prev_ready = handle.ready
        if not (math.isfinite(loss) and math.isfinite(norm)):
            raise UserError(f"training diverged at step {step}: loss {loss}, grad norm {norm} (lr {lr:.3g}); the "
                            f"update was not applied and nothing was saved; {self._last_good()}. Try a lower --lr "
                            "or --grad-clip 1")
        tps = self.progress.step(step, loss, norm, lr, seconds)
        record = {"step": step, "train_loss": loss, "lr": lr, "grad_norm": norm, "tokens_per_s": tps}
        if handle.fp8_clamped is not None:
            record["fp8_clamped"] = handle.fp8_clamped
            self._fp8_overflow(step, handle.fp8_clamped)
        self.log.write(record)
        self.result.train_losses.append(loss)
        self.result.steps_done = step

    def _fp8_overflow(self, step: int, clamped: int) -> None:
        """--dtype fp8: values beyond an FP8 format's range were clamped in this step (the delayed scales lag a
        tensor that grew). Said on its first step, and again when it goes on for 10 and 100 steps in a row."""
        self._fp8_streak = getattr(self, "_fp8_streak", 0) + 1 if clamped else 0
        if self._fp8_streak in (1, 10, 100):
            more = "" if self._fp8_streak == 1 else f" ({self._fp8_streak} steps in a row: the scales do not keep up; " \
                "if the loss suffers, resume with --dtype bf16)"
            self.progress.write(f"step {step}: fp8: {clamped:,} values clamped to their format's largest{more}")

    def _pause(self, fn, *a) -> None:
        """Evaluation, sampling, saving: after the pending step, off the step clock."""
        self._read_pending()
        fn(*a)

    def _last_good(self) -> str:
        if self.saved_path is None:
            return "there is no checkpoint of this run yet"
        return f"the last checkpoint, {self.saved_path}, is intact"

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
            raise UserError(f"val loss is {loss} at step {step}: the weights hold NaN/Inf; {self._last_good()}")
        self.log.write({"step": step, "val_loss": loss})
        self.result.val_losses.append((step, loss))
        self.progress.write(f"step {step}: val loss {loss:.4f}")

    def score_tasks(self, step: int) -> None:
        """Multiple-choice accuracy (llmpy/evals) of the current weights, the examples shared out over the ranks.
        The scorer's model lives on a backend of its own: a second model on the training backend would re-plan the
        workspace that the captured step graphs point at."""
        if not self.eval_examples:
            return
        from ..backends import get_backend
        from ..data.tokenizers import get_tokenizer, tokenizer_for
        from ..evals.scoring import Scorer
        dist, be = self.dist, self.be
        weights = self.model.params_numpy(self.comm)  # under ZeRO every rank gathers
        try:
            if self._scorer is None:
                sbe = get_backend(be.name, be.dtype_name, device_id=dist.env.local_rank if dist.world > 1 else None)
                tok = get_tokenizer(tokenizer_for(self.cfg.vocab_size, self.tc.tokenizer))
                self._scorer = Scorer(self.cfg, weights, sbe, tok)
            else:
                if be.name == "cuda":  # its ops run on the current stream: the scorer's own, as when it was made
                    self._scorer.be.stream.use()
                self._scorer.load_params(weights)
            for task, examples in self.eval_examples.items():
                r = self._scorer.score(task, examples[dist.rank::dist.world])
                n = dist.sum(float(r["n"]))
                acc, acc_norm = (dist.sum(r[k] * r["n"]) / max(n, 1.0) for k in ("acc", "acc_norm"))
                self.log.write({"step": step, "eval_task": task, "acc": acc, "acc_norm": acc_norm, "n": int(n)})
                self.result.evals.append((step, task, acc, acc_norm))
                self.progress.write(f"step {step}: {task} acc {acc:.4f} acc_norm {acc_norm:.4f} ({int(n)} examples)")
        finally:
            if be.name == "cuda":
                be.stream.use()  # the scorer's backend made its own stream current

    def sample(self, step: int) -> None:
        """Rank 0 generates on the CPU through the family's own forward; under ZeRO every rank takes part in
        gathering the sharded weights first. A sample that fails is reported and costs the run nothing."""
        if not self.sample_n or not (self.dist.main or self.opt.sharded):
            return
        weights = self.model.params_numpy(self.comm)
        if not self.dist.main:
            return
        from ..models.decode import decoder, generate
        try:
            if self._decoder is None:
                self._decoder = decoder(self.cfg, weights, get_backend("cpu"))
            else:
                self._decoder.load_params(weights)
            ids = generate(self._decoder, self.sample_prompt, self.sample_n, rng=self.sample_rng, top_k=40)
            self.progress.write(f"--- sample at step {step} ---\n{self.tokenizer.decode(ids)}\n---")
        except Exception as e:  # noqa: BLE001 -- a sample is a courtesy: no error of it may stop the run
            self.progress.write(f"warning: the sample at step {step} failed ({type(e).__name__}: {e}); the run "
                                "goes on")

    def save(self, done: int) -> None:
        checkpointing.save(self.out, done, self.tc, self.model, self.opt, self.train_loader, self.sample_rng,
                           self.dist, self.comm, prev_step=self.saved_step, last_good=self._last_good())
        self.saved_step, self.saved_path = done, self.out / CHECKPOINT

    # ---- the end --------------------------------------------------------------------------------------------
    def finish(self) -> None:
        """After the last step (or a stop): the final evaluation and sample when the run is complete, then the
        checkpoint."""
        done = self.result.steps_done
        if done == self.tc.steps:
            self.evaluate(self.tc.steps)
            self.score_tasks(self.tc.steps)
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
            print(f"stopped after {done} of {self.tc.steps} steps; continue with: llmpy train --resume {out}")
        print(self.progress.summary(res.seconds, res.val_losses))
        print(f"done: {done - self.start} steps in {res.seconds:.1f} s; checkpoint {out / CHECKPOINT}, "
              f"metrics {out / 'metrics.jsonl'}, loss curve {out / 'loss.png'}, settings {out / 'config.json'}")
        if self.be.name == "cuda":
            import cupy
            print(f"peak GPU memory held: {cupy.get_default_memory_pool().total_bytes() / 2**30:.2f} GiB per rank")
        return res


# ---------------------------------------------------------------------------------------------------- helpers

def _check_target(out: Path, resume, in_place: bool, overwrite: bool = False) -> list[Path]:
    """A new run needs a folder without an earlier run's files in it (with --overwrite: returns them, to be
    removed); a run resumed into another folder needs a new or empty one."""
    if resume is None:
        earlier = sorted(p for p in out.iterdir() if RUN_FILE.fullmatch(p.name)) if os.path.isdir(out) else []
        if earlier and not overwrite:
            if os.path.exists(out / CHECKPOINT):
                raise UserError(f"{out} already holds a run: continue it with --resume {out}, choose another --out, "
                                "or add --overwrite to start over in it")
            raise UserError(f"{out} holds files of an earlier run ({', '.join(p.name for p in earlier[:3])}) and "
                            "no checkpoint to resume: choose another --out, or add --overwrite to replace them")
        return earlier
    if resume is not None and not in_place and os.path.isdir(out):
        held = sorted(p.name for p in out.iterdir() if p.name != LOCK)
        if held:
            raise UserError(f"--out {out} holds {', '.join(held[:3])}: a run resumed from {resume.src} into another "
                            "folder needs a new or empty one (its own folder is continued with --resume alone)")
    return []


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**30:.3f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


class _StopFlag:
    """Ctrl-C (SIGINT) / SIGTERM ask the loop to stop at the next step boundary and checkpoint; a second
    Ctrl-C interrupts at once (the previous checkpoint stays intact: every write is atomic)."""

    def __init__(self):
        self.requested = False
        self.signum: int | None = None  # the first signal received
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum
        print("\nstopping after this step (Ctrl-C again to abort at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _inject_fault(rank: int, step: int) -> None:
    """For testing fault handling: LLMPY_FAULT_INJECT=R:S makes rank R die abruptly once step S+1 is launched (S
    steps done)."""
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
