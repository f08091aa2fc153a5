"""AdamW over the flat parameter buffer, global-norm clipping and learning-rate schedules."""
from __future__ import annotations

import math

from .config import DECAYED, param_shapes
from .errors import UserError

SCHEDULES = ("constant", "cosine", "linear", "wsd")


class AdamW:
    """Bias-corrected AdamW (Loshchilov & Hutter) with decoupled weight decay applied to the 2-D weight matrices
    (wte, wpe, qkvw, attprojw, fcw, fcprojw) and not to biases or LayerNorm gains. Moments are fp32 flat buffers
    shaped like the parameters; `t` counts updates (bias correction uses t = 1 on the first)."""

    def __init__(self, model, *, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, decay_all=False):
        from .models.gpt2 import FlatBuffer
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise UserError(f"AdamW betas must be in [0, 1): got beta1={beta1}, beta2={beta2}")
        if eps <= 0 or weight_decay < 0:
            raise UserError(f"AdamW needs eps > 0 and weight decay >= 0 (got eps={eps}, wd={weight_decay})")
        self.model, self.be = model, model.be
        self.beta1, self.beta2, self.eps, self.weight_decay = beta1, beta2, eps, weight_decay
        self.decayed = {n for n, _ in param_shapes(model.cfg)} if decay_all else set(DECAYED)
        shapes = param_shapes(model.cfg)
        self.m = FlatBuffer(self.be, shapes, self.be.param_dtype)
        self.v = FlatBuffer(self.be, shapes, self.be.param_dtype)
        self.t = 0

    def nbytes(self) -> int:
        return self.m.nbytes() + self.v.nbytes()

    def step(self, lr: float, grad_scale: float = 1.0) -> None:
        self.t += 1
        p, g = self.model.params, self.model.grads
        for name, _ in param_shapes(self.model.cfg):
            wd = self.weight_decay if name in self.decayed else 0.0
            self.be.adamw(p[name].reshape(-1), g[name].reshape(-1), self.m[name].reshape(-1),
                          self.v[name].reshape(-1), lr=lr, beta1=self.beta1, beta2=self.beta2, eps=self.eps,
                          weight_decay=wd, t=self.t, grad_scale=grad_scale)


def grad_norm(model) -> float:
    """Global L2 norm of all parameter gradients (fixed reduction order: deterministic)."""
    return math.sqrt(model.be.sumsq(model.grads.flat))


def clip_scale(norm: float, max_norm: float) -> float:
    """The factor AdamW applies to every gradient: max_norm / norm when clipping triggers, else 1 (0 = off)."""
    return max_norm / norm if max_norm > 0 and norm > max_norm else 1.0


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
