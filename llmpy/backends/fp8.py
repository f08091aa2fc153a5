"""`--dtype fp8`: the block products a model registers run on FP8 operands (layers/fp8.py gives the recipe). This
module holds what both backends share, the registry of FP8 products and their scale state, and the CPU's emulation
of them (the GPU's is cuda/fp8.py).

A model registers the weights of its block products, and of its LM head with LLMPY_FP8_HEAD=1 (`fp8_head`), once
(`Backend.fp8_register`); from then on `matmul_forward` / `matmul_backward` given one of those weights (found by
its address: the model code does not change) quantize their operands and multiply in FP8. Product p's state: its
operands' amax histories hist (P, 3, HISTORY), this step's amax pending (P, 3), the scales scale (P, 3) (roles X,
W, D) and the count of values clamped this step. The trainer calls `fp8_begin_step` before a step's first
micro-batch and `fp8_end_step` after AdamW (fold the step's amax into the histories, new scales, quantize the new
weights).
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import UserError
from ..layers import fp8 as F


def head_enabled(fp8: bool) -> bool:
    """A backend's `fp8_head`: with --dtype fp8 and LLMPY_FP8_HEAD=1 the LM head runs in FP8 too (off by default:
    its GPU path has not been measured yet)."""
    return fp8 and os.environ.get("LLMPY_FP8_HEAD", "0") == "1"


class Fp8Ops:
    """The --dtype fp8 ops of backends/ops.py, the same on both backends: each delegates to the registry of FP8
    products (`self.fp8`) that the backend's `_fp8_new(weights, rows, head_rows)` makes."""
    fp8_enabled = False  # the backend was made for --dtype fp8
    fp8 = None           # its registered products (fp8_register)
    fp8_fused = False    # the products keep FP8 copies of their inputs, the producers write them (ops.py; the GPU's)
    fp8_head = False     # the LM head is an FP8 product too (a model registers it where this is on)

    def fp8_register(self, weights, rows: int, head=None, head_rows: int = 0) -> int:
        if not self.fp8_enabled:
            raise ValueError("fp8_register: this backend was not made for --dtype fp8")
        if head is not None and head_rows < 1:
            raise ValueError("fp8_register: a head needs head_rows >= 1")
        # head_rows 0: no head (the products' rows are then all `rows`)
        self.fp8 = self._fp8_new(list(weights) + ([] if head is None else [head]), rows,
                                 0 if head is None else head_rows)
        return self.fp8.nbytes

    def fp8_begin_step(self) -> None:
        self.fp8.begin_step()

    def fp8_end_step(self) -> None:
        self.fp8.end_step()

    def fp8_quantize_weights(self) -> None:
        self.fp8.quantize_weights()

    def fp8_state(self) -> dict:
        return self.fp8.state()

    def fp8_load_state(self, state: dict) -> None:
        self.fp8.load_state(state)

    def _fp8_slot(self, w) -> int | None:
        """The registered product whose weight is w, if any."""
        return None if self.fp8 is None else self.fp8.slot(w)


class Fp8Products:
    """The registered products: slot by weight address, scale state arrays (the backend's), host-side flags."""

    def __init__(self, be, weights: list, head: bool = False):
        # weights: the (OC, K) views of the registered products' weights, one per product (a layer's own); head:
        # the last is the LM head's
        self.be, self.weights = be, list(weights)
        self.slots = {be._ptr(w): i for i, w in enumerate(self.weights)}
        if len(self.slots) != len(self.weights):
            raise ValueError("fp8_register: two products share a weight")
        P = len(self.weights)
        self.hist = be.zeros(P * 3 * F.HISTORY, np.float32).reshape(P, 3, F.HISTORY)
        self.pending = be.zeros(P * 3, np.float32).reshape(P, 3)
        self.scale = be.zeros(P * 3, np.float32).reshape(P, 3)
        self.scale[...] = 1.0
        self.overflows = be.zeros(1, np.int32)  # values clamped to their format's largest this step
        self.calibrate = True  # no history yet: a step scales each operand by its own amax (set by the trainer)
        self.head = P - 1 if head else None  # the LM head's product, whose D scale is fixed (layers/fp8.py)

    def slot(self, w) -> int | None:
        return self.slots.get(self.be._ptr(w))

    def fixed(self, i: int, role: int) -> bool:
        """Whether operand `role` of product i has a fixed scale (the LM head's output gradient): no amax recorded,
        never calibrated."""
        return i == self.head and role == F.D

    def head_target(self, fp8_next, dloss) -> int | None:
        """The classifier's dlogits are the LM head's output gradient where fp8_next is the registered head weight
        (and there is a gradient): its product, whose fixed D scale is set from dloss here; else None."""
        j = self.head
        if j is None or fp8_next is None or dloss is None or self.slot(fp8_next) != j:
            return None
        self.set_scale(j, F.D, F.head_grad_scale(dloss))
        return j

    def set_scale(self, i: int, role: int, s: float) -> None:
        raise NotImplementedError

    def state(self) -> dict[str, np.ndarray]:
        """The scale state as host arrays (for the checkpoint)."""
        return {"fp8_amax_history": np.array(self.be.to_numpy(self.hist), np.float32),
                "fp8_scale": np.array(self.be.to_numpy(self.scale), np.float32)}

    def load_state(self, state: dict) -> None:
        """Restores `state()`'s arrays (a resume); the weights are quantized again with the restored scales."""
        for k, dst in (("fp8_amax_history", self.hist), ("fp8_scale", self.scale)):
            a = np.asarray(state[k], np.float32)
            if a.ndim == dst.ndim and a.shape[0] != dst.shape[0]:
                raise UserError(f"the checkpoint's {k} is for {a.shape[0]} FP8 products and this run has "
                                f"{dst.shape[0]} (LLMPY_FP8_HEAD=1 makes the LM head one more): resume with the "
                                "setting the run was made with")
            if a.shape != tuple(dst.shape) or not np.all(np.isfinite(a)):
                raise UserError(f"the checkpoint's {k} is damaged: shape {a.shape}, expected {tuple(dst.shape)}, "
                                "finite values")
            self.be.upload(dst, a) if self.be.name == "cuda" else np.copyto(dst, a)
        self.calibrate = False
        self.pending[...] = 0.0  # (amax taken from the weights before the resumed compute copy was put back)
        self.quantize_weights()

    def quantize_weights(self) -> None:
        """The registered weights' FP8 copies from the compute weights (their scales from their histories, or from
        their own amax while calibrating); records their amax."""
        raise NotImplementedError

    def begin_step(self) -> None:
        """Before a step's first micro-batch: this step's X and D amax and the clamp count start at zero (while
        `calibrate`, the first step of a fresh run, each operand is scaled by its own amax)."""
        raise NotImplementedError

    def end_step(self) -> None:
        """After AdamW: the step's amax into the histories, new scales, the new weights quantized."""
        raise NotImplementedError


class CpuFp8(Fp8Products):
    """The recipe in NumPy (the CPU backend's emulation): quantized copies as ml_dtypes float8 arrays."""

    def __init__(self, be, weights, head: bool = False):
        super().__init__(be, weights, head)
        fx, fw, fd = F.formats()
        self.fmt = (fx, fw, fd)
        self.wq = [np.zeros(w.shape, fw) for w in self.weights]
        self.nbytes = sum(w.size for w in self.weights) + self.hist.nbytes

    def set_scale(self, i: int, role: int, s: float) -> None:
        self.scale[i, role] = s

    def _scale_for(self, i: int, role: int, x) -> float:
        """Records x's amax as product i's operand `role` and returns its scale (set from that amax when
        calibrating; a fixed scale as it is)."""
        if self.fixed(i, role):
            return float(self.scale[i, role])
        a = F.amax(x)
        self.pending[i, role] = max(float(self.pending[i, role]), a)
        if self.calibrate:
            self.scale[i, role] = F.scale_from_amax(a, role, float(self.scale[i, role]))
        return float(self.scale[i, role])

    def _quantize(self, i: int, role: int, x, count: bool = True):
        # count: add the clamped values to the step's count (as the GPU does: X in forward, D where dX is formed)
        s = self._scale_for(i, role, x)
        q = np.empty(x.shape, self.fmt[role])
        over = F.quantize(q, x, s, role)
        if count:
            self.overflows[0] += over
        return q, s

    def begin_step(self) -> None:
        self.pending[:, F.X] = 0.0
        self.pending[:, F.D] = 0.0
        self.overflows[0] = 0.0

    def end_step(self) -> None:
        F.fold(self.hist, self.pending, self.scale)
        self.pending[...] = 0.0
        self.calibrate = False
        self.quantize_weights()

    def quantize_weights(self) -> None:
        for i, w in enumerate(self.weights):
            self.overflows[0] += F.quantize(self.wq[i], w, self._scale_for(i, F.W, w), F.W)

    def forward(self, out, inp, b, gelu_pre, i: int) -> None:
        xq, sx = self._quantize(i, F.X, inp)
        target = out if gelu_pre is None else gelu_pre
        F.matmul_forward(target, xq, self.wq[i], sx, float(self.scale[i, F.W]), b)
        if gelu_pre is not None:
            self.be.gelu_forward(out, gelu_pre)

    def backward(self, dinp, dw, dout, inp, i: int, first: bool) -> None:
        """dinp = dout @ W in FP8 (overwritten); dw (+)= dout.T @ inp in FP8 (first: overwritten)."""
        dq, sd = self._quantize(i, F.D, dout, count=dinp is not None)
        sw = float(self.scale[i, F.W])
        if dinp is not None:
            F.matmul_backward_dinp(dinp, dq, self.wq[i], sd, sw)
        if dw is not None:
            xq, sx = self._quantize(i, F.X, inp, count=False)
            F.matmul_backward_dw(dw, dq, xq, sd, sx, accumulate=not first)

