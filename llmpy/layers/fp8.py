"""FP8 matrix products with per-tensor delayed scaling: the recipe `--dtype fp8` trains with, in NumPy. It is the spec
the GPU follows (kernels/fp8.cu, cuBLASLt's FP8 products) and the CPU backend's emulation of it.

Every block product out = X @ W.T (GPT-2's and Llama's qkv, attention output, MLP up/gate and down) runs on 8-bit
operands with fp32 accumulation; its three operands each have a power-of-two scale s:

    Xq = sat(round(X * s_x))    e4m3 (max 448)      the activation, forward and dW = dY^T X
    Wq = sat(round(W * s_w))    e4m3                the weight, forward and dX = dY W
    Dq = sat(round(dY * s_d))   e5m2 (max 57344)    the output's gradient, dX and dW
    out = (Xq @ Wq.T) / (s_x s_w);  dX = (Dq @ Wq) / (s_d s_w);  dW = (Dq.T @ Xq) / (s_d s_x)

round is round-to-nearest-even into the format, sat clamps to its largest finite value (counted as an overflow).
Powers of two make X * s and the final division exact, so the CPU's casts and the GPU's give the same bits.

Delayed scaling: each operand keeps the amax (max |value|, NaN ignored) of its last HISTORY steps; after a step,
s = 2^floor(log2(fmax / max(history))), so the largest value seen lately lands in [fmax/2, fmax]. A product's
operands are scaled by what earlier steps saw, so the kernel that produces a tensor can write its FP8 copy in the
same pass (no extra pass to find the tensor's own amax first). The first step of a fresh run has no history: it
scales each operand by its own amax (current scaling), which fills the histories. Weights are quantized once per
step, after AdamW, with their own histories.

The LM head (logits = X @ E.T, the tied embedding or the head weight) can be a product too (LLMPY_FP8_HEAD=1),
with one difference: its output gradient dlogits = dloss * (softmax - onehot(target)) is bounded by dloss
(|p - onehot| <= 1; the bf16 dlogits up to their rounding, which cannot pass fmax: 57344 is a bf16 value and s_d a
power of two), so its scale is fixed, s_d = 2^floor(log2(fmax / dloss)) (`head_grad_scale`): no history, never a
clamped value, and the classifier that forms dlogits can write their FP8 copies at once.
"""
from __future__ import annotations

import math

import numpy as np

HISTORY = 16                     # steps of amax each scale looks back over
X, W, D = 0, 1, 2                # an operand's role in a product: activation, weight, output gradient
E4M3_MAX, E5M2_MAX = 448.0, 57344.0
FMAX = (E4M3_MAX, E4M3_MAX, E5M2_MAX)  # by role


def formats():
    """The ml_dtypes types of the roles (e4m3fn for X and W, e5m2 for D)."""
    import ml_dtypes
    return (ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2)


def amax(x) -> float:
    """max |x| over the finite and infinite values, NaN ignored (0 for an empty or all-NaN x)."""
    a = np.abs(np.asarray(x, np.float32))
    return float(np.fmax.reduce(a, axis=None, initial=0.0))


def quantize(out, x, scale: float, role: int) -> int:
    # out (same shape as x, the role's float8 dtype) = sat(round(x * scale)); returns the overflows: elements whose
    # |x * scale| exceeds the format's largest value (clamped to it; NaN stays NaN)
    fmax = np.float32(FMAX[role])
    y = np.asarray(x, np.float32) * np.float32(scale)
    over = int(np.count_nonzero(np.abs(y) > fmax))
    np.clip(y, -fmax, fmax, out=y)
    out[...] = y.astype(out.dtype)
    return over


def dequantize(q, scale: float):
    """q (float8) as fp32 values / scale (exact: the scale is a power of two)."""
    return q.astype(np.float32) * np.float32(1.0 / scale)


def scale_from_amax(a: float, role: int, previous: float) -> float:
    """2^floor(log2(fmax / a)) for a finite a > 0 (exponent clamped to [-100, 100]); else `previous`. Formed from
    the two numbers' exponents and mantissas (no rounded division), as the GPU forms it."""
    if not (a > 0.0 and math.isfinite(a)):
        return previous
    mf, ef = math.frexp(FMAX[role])
    ma, ea = math.frexp(np.float32(a))
    e = ef - ea - (1 if mf < ma else 0)
    return float(2.0 ** max(-100, min(100, e)))


def head_grad_scale(dloss: float) -> float:
    """The LM head's fixed output-gradient scale (role D) for the classifier's dloss: |dlogits| <= dloss (up to
    the bf16 rounding, which s_d * dloss <= fmax absorbs)."""
    return scale_from_amax(abs(float(dloss)), D, 1.0)


def fold(hist, pending, scale) -> None:
    # hist (P, 3, HISTORY) fp32: the amax of each product's operands over the last steps, newest first; pending
    # (P, 3): this step's (non-finite values count as 0); scale (P, 3) fp32, updated from the new histories
    # (an all-zero history keeps its scale)
    hist[..., 1:] = hist[..., :-1].copy()
    p = np.where(np.isfinite(pending), pending, 0.0)
    hist[..., 0] = p
    top = hist.max(axis=-1)
    for i in np.ndindex(scale.shape):
        scale[i] = scale_from_amax(float(top[i]), i[-1], float(scale[i]))


def matmul_forward(out, xq, wq, sx: float, sw: float, bias=None):
    # out (N, OC) = (xq (N, K) @ wq (OC, K).T) / (sx sw) (+ bias (OC,)); fp32 accumulation
    OC = wq.shape[0]
    np.matmul(xq.reshape(-1, xq.shape[-1]).astype(np.float32), wq.astype(np.float32).T, out=out.reshape(-1, OC))
    out *= np.float32(1.0 / (sx * sw))
    if bias is not None:
        out += bias


def matmul_backward_dinp(dinp, dq, wq, sd: float, sw: float):
    # dinp (N, K) = (dq (N, OC) @ wq (OC, K)) / (sd sw)
    K = wq.shape[1]
    np.matmul(dq.reshape(-1, wq.shape[0]).astype(np.float32), wq.astype(np.float32), out=dinp.reshape(-1, K))
    dinp *= np.float32(1.0 / (sd * sw))


def matmul_backward_dw(dw, dq, xq, sd: float, sx: float, accumulate: bool, scratch=None):
    # dw (OC, K) (+)= (dq (N, OC).T @ xq (N, K)) / (sd sx)
    OC, K = dw.shape
    prod = np.matmul(dq.reshape(-1, OC).astype(np.float32).T, xq.reshape(-1, K).astype(np.float32))
    prod *= np.float32(1.0 / (sd * sx))
    if accumulate:
        dw += prod
    else:
        dw[...] = prod
