"""AdamW over the flat parameter buffer, global-norm clipping and learning-rate schedules."""
from __future__ import annotations

import math

import numpy as np

from .config import DECAYED, param_shapes
from .errors import UserError

SCHEDULES = ("constant", "cosine", "linear", "wsd")


class AdamW:
    """Bias-corrected AdamW (Loshchilov & Hutter) with decoupled weight decay applied to the 2-D weight matrices
    (wte, wpe, qkvw, attprojw, fcw, fcprojw) and not to biases or LayerNorm gains, and global-norm clipping.

    Moments are fp32 flat buffers shaped like the parameters; the update reads its per-step scalars (lr, bias
    corrections, clip, rounding seed) and the gradient norm from device buffers, so a captured CUDA graph can
    replay it every step. `t` counts updates (bias correction uses t = 1 on the first)."""

    def __init__(self, model, *, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, decay_all=False, seed=0):
        from .models.gpt2 import FlatBuffer
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise UserError(f"AdamW betas must be in [0, 1): got beta1={beta1}, beta2={beta2}")
        if eps <= 0 or weight_decay < 0:
            raise UserError(f"AdamW needs eps > 0 and weight decay >= 0 (got eps={eps}, wd={weight_decay})")
        self.model, self.be = model, model.be
        self.beta1, self.beta2, self.eps, self.weight_decay = beta1, beta2, eps, weight_decay
        self.decayed = {n for n, _ in param_shapes(model.cfg)} if decay_all else set(DECAYED)
        shapes = param_shapes(model.cfg)
        self.m = FlatBuffer(self.be, shapes, np.float32)
        self.v = FlatBuffer(self.be, shapes, np.float32)
        self.hp = self.be.zeros(8, np.float32)           # [lr, b1, b2, eps, 1/(1-b1^t), 1/(1-b2^t), clip, seed]
        self.norm = self.be.zeros(1, self.be.acc_dtype)  # the global gradient norm of the current step
        self.seed = seed
        self.t = 0

    def nbytes(self) -> int:
        return self.m.nbytes() + self.v.nbytes()

    def set_step(self, lr: float, grad_clip: float = 0.0) -> None:
        """Host side of one update: advances t and uploads this step's scalars."""
        self.t += 1
        t = self.t
        seed = np.array([(self.seed * 0x9E3779B1 + t) & 0xFFFFFFFF], np.uint32).view(np.float32)[0]
        hp = np.array([lr, self.beta1, self.beta2, self.eps, 1.0 / (1.0 - self.beta1 ** t),
                       1.0 / (1.0 - self.beta2 ** t), grad_clip, seed], np.float32)
        self.be.upload(self.hp, hp)

    def apply(self) -> None:
        """Device side: the global gradient norm, then AdamW on every tensor (clipped by the norm; skipped when
        the norm is not finite, so a diverging step never touches the weights)."""
        be, model = self.be, self.model
        p, g, master = model.params, model.grads, model.master
        be.grad_norm(self.norm, g.flat, model.loss_acc)  # NaN (so no update) if the step's loss is not finite
        for name, _ in param_shapes(model.cfg):
            wd = self.weight_decay if name in self.decayed else 0.0
            be.adamw(p[name].reshape(-1), None if master is None else master[name].reshape(-1),
                     g[name].reshape(-1), self.m[name].reshape(-1), self.v[name].reshape(-1), self.hp, self.norm,
                     wd, p.offsets[name])

    def step(self, lr: float, grad_clip: float = 0.0) -> float:
        """set_step + apply, eagerly; returns the gradient norm."""
        self.set_step(lr, grad_clip)
        self.apply()
        return self.last_norm()

    def last_norm(self) -> float:
        return float(self.be.to_numpy(self.norm)[0])


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
