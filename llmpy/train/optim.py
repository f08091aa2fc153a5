"""AdamW over the flat parameter buffer, global-norm clipping and learning-rate schedules."""
from __future__ import annotations

import math

import numpy as np

from ..errors import UserError

SCHEDULES = ("constant", "cosine", "linear", "wsd")


class AdamW:
    """Bias-corrected AdamW (Loshchilov & Hutter) with decoupled weight decay on the tensors the family's spec marks
    decayed (its matrices and embeddings, not biases or norm gains; decay_all: on everything), and global-norm
    clipping.

    Moments are buffers in the parameters' layout (models/params.py), or this rank's shard of it under ZeRO: fp32,
    or with moments="bf16" (a bf16 backend) bf16 with stochastic rounding (half the memory and traffic; checkpoints
    still hold them as fp32, exactly).
    The update reads its per-step scalars (lr, bias corrections, clip, rounding seed) and the gradient norm from
    device buffers, so a captured CUDA graph can replay it every step. `t` counts updates (bias correction uses
    t = 1 on the first). With a communicator (data parallelism) the gradients reach apply() already summed over
    ranks (zero 0: in full; zero >= 1: this rank's slices, in `gshard`); ZeRO then all-gathers the updated
    weights."""

    def __init__(self, model, *, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, decay_all=False, seed=0,
                 comm=None, moments: str = "fp32"):
        from ..models.params import ParamBuffer, ShardBuffer
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise UserError(f"AdamW betas must be in [0, 1): got beta1={beta1}, beta2={beta2}")
        if eps <= 0 or weight_decay < 0:
            raise UserError(f"AdamW needs eps > 0 and weight decay >= 0 (got eps={eps}, wd={weight_decay})")
        self.model, self.be, self.comm = model, model.be, comm
        self.beta1, self.beta2, self.eps, self.weight_decay = beta1, beta2, eps, weight_decay
        self.decay_all = decay_all
        layout, be = model.layout, model.be
        if moments not in ("fp32", "bf16"):
            raise UserError(f"--moments must be fp32 or bf16 (got {moments!r})")
        if moments == "bf16" and np.dtype(be.param_dtype) == np.float32:
            raise UserError("--moments bf16 needs --dtype bf16 (a CUDA device): fp32 training keeps fp32 moments")
        self.moment_dtype = np.dtype(np.float32) if moments == "fp32" else np.dtype(be.param_dtype)
        self.sharded = model.zero >= 1
        if self.sharded:
            self.m, self.v = (ShardBuffer(be, layout, self.moment_dtype, model.rank) for _ in range(2))
            self.gshard = ShardBuffer(be, layout, be.param_dtype, model.rank)  # this rank's reduced gradients
            self.runs = layout.shard_runs(model.rank)
        else:
            self.m, self.v = (ParamBuffer(be, layout, self.moment_dtype) for _ in range(2))
            self.gshard = None
            self.runs = [(o, o, n, d) for o, n, d in layout.runs()]
        self.hp = be.zeros(8, np.float32)           # [lr, b1, b2, eps, 1/(1-b1^t), 1/(1-b2^t), clip, seed]
        self.norm = be.zeros(1, be.acc_dtype)       # the global gradient norm of the current step
        self.sumsq = be.zeros(1, be.acc_dtype)      # its square, summed over ranks under ZeRO
        self.seed = seed
        self.t = 0

    def nbytes(self) -> int:
        return self.m.nbytes() + self.v.nbytes() + (self.gshard.nbytes() if self.gshard is not None else 0)

    def set_step(self, lr: float, grad_clip: float = 0.0) -> None:
        """Host side of one update: advances t and uploads this step's scalars."""
        self.t += 1
        t = self.t
        seed = np.array([(self.seed * 0x9E3779B1 + t) & 0xFFFFFFFF], np.uint32).view(np.float32)[0]
        hp = np.array([lr, self.beta1, self.beta2, self.eps, 1.0 / (1.0 - self.beta1 ** t),
                       1.0 / (1.0 - self.beta2 ** t), grad_clip, seed], np.float32)
        self.be.upload(self.hp, hp)

    def apply(self) -> None:
        """Device side: the global gradient norm, then AdamW over every run of parameters (clipped by the norm;
        skipped when the norm or the step's loss is not finite, so a diverging step never touches the weights)."""
        be, model = self.be, self.model
        guard = model.loss_acc  # NaN loss -> NaN norm -> no update
        if self.sharded:
            grads = self.gshard.flat
            be.grad_sumsq(self.sumsq, grads)
            self.comm.all_reduce(self.sumsq)
            be.norm_from_sumsq(self.norm, self.sumsq, guard)
        else:
            grads = model.grads.flat
            be.grad_sumsq(self.sumsq, grads)
            be.norm_from_sumsq(self.norm, self.sumsq, guard)
        master = model.master.flat if model.master is not None else None
        p, m, v = model.params.flat, self.m.flat, self.v.flat
        for g0, l0, n, decayed in self.runs:
            wd = self.weight_decay if (decayed or self.decay_all) else 0.0
            be.adamw(p[g0:g0 + n], None if master is None else master[l0:l0 + n], grads[l0:l0 + n],
                     m[l0:l0 + n], v[l0:l0 + n], self.hp, self.norm, wd, g0)
        if self.sharded:  # every rank gets the others' updated slices of the compute weights
            layout = model.layout
            for b, (g0, _, s) in enumerate(layout.shard(model.rank)):
                b0, b1 = layout.buckets[b]
                self.comm.all_gather(p[g0:g0 + s], p[b0:b1])

    def step(self, lr: float, grad_clip: float = 0.0) -> float:
        """set_step + apply, eagerly (single process); returns the gradient norm."""
        self.set_step(lr, grad_clip)
        self.apply()
        return self.last_norm()

    def last_norm(self) -> float:
        return float(self.be.to_numpy(self.norm)[0])

    def moments_numpy(self) -> tuple[dict, dict] | tuple[np.ndarray, np.ndarray]:
        """Unsharded: (m, v) as dicts of named fp32 host arrays; sharded: this rank's flat shards (fp32; bf16
        moments widen exactly)."""
        def host(buf):
            return np.asarray(self.be.to_numpy(buf.flat)).astype(np.float32, copy=False)
        if self.sharded:
            return host(self.m), host(self.v)
        return tuple(self.model.layout.from_flat(host(buf)) for buf in (self.m, self.v))

    def load_moments(self, m, v) -> None:
        """The inverse of moments_numpy (fp32 values into bf16 moments round to nearest: exact for values that
        came from bf16 moments)."""
        be, dt = self.be, self.moment_dtype
        if self.sharded:
            be.copy_(self.m.flat, be.asarray(np.asarray(m, np.float32).astype(dt)))
            be.copy_(self.v.flat, be.asarray(np.asarray(v, np.float32).astype(dt)))
            return
        for buf, src in ((self.m, m), (self.v, v)):
            be.copy_(buf.flat, be.asarray(np.asarray(self.model.layout.to_flat(src), np.float32).astype(dt)))


def lr_at(step: int, *, lr: float, schedule: str, steps: int, warmup: int = 0, final_frac: float = 0.0,
          decay_frac: float = 0.2) -> float:
    """Learning rate for 0-based `step` of `steps`. Warmup (any schedule) ramps linearly: lr*(step+1)/warmup.
    cosine: to final_frac*lr at the end; linear: straight line to final_frac*lr; wsd (warmup-stable-decay):
    flat, then a linear cooldown to final_frac*lr over the last decay_frac of the steps."""
    if schedule not in SCHEDULES:
        raise UserError(f"unknown lr schedule {schedule!r}: choose from {', '.join(SCHEDULES)}")
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    final = lr * final_frac
    if schedule == "wsd":
        start = max(warmup, steps - int(round(decay_frac * steps)))
        if step < start:
            return lr
        progress = (step - start) / max(1, steps - start)
        return lr + (final - lr) * progress
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    if schedule == "linear":
        return lr + (final - lr) * progress
    return final + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - final)
