"""bfloat16 as raw uint16 bits (the top half of an IEEE float32), in pure NumPy.

bf16 keeps float32's 8-bit exponent and 7 of its 23 mantissa bits, so conversion is a 16-bit shift plus
rounding. We round to nearest, ties to even (what llm.c's Python exporter, PyTorch and CUDA's
__float2bfloat16_rn do), so a round trip fp32 -> bf16 -> fp32 errs by at most half a bf16 ulp.
"""
from __future__ import annotations

import numpy as np


def fp32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 array -> uint16 array of the same shape holding bf16 bits (round to nearest even).

    Inf stays Inf, finite values too large for bf16 round to Inf (as IEEE rounding does), NaN stays NaN
    (made quiet, sign kept). Only float32 input is accepted: rounding a float64 to float32 first and then
    to bf16 would round twice, which is not round-to-nearest."""
    x = np.asarray(x)
    if x.dtype != np.float32:
        raise TypeError(f"fp32_to_bf16_bits needs a float32 array, got {x.dtype}")
    # Work on a 1-D view: on 0-d arrays NumPy would do scalar arithmetic, which warns on the NaN wraparound.
    flat = np.ascontiguousarray(x).reshape(-1)
    u = flat.view(np.uint32)
    # Adding 0x7FFF plus the lowest kept bit rounds the dropped 16 bits to nearest, ties towards an even
    # kept mantissa; a carry out of the mantissa correctly bumps the exponent (up to Inf).
    lsb = (u >> 16) & 1
    rounded = ((u + 0x7FFF + lsb) >> 16).astype(np.uint16)  # NaN inputs may wrap here; replaced below
    # NaN: truncate and force the quiet bit, so a NaN whose payload sits in the low bits cannot become Inf.
    quiet_nan = ((u >> 16) | 0x0040).astype(np.uint16)
    return np.where(np.isnan(flat), quiet_nan, rounded).reshape(x.shape)


def bf16_bits_to_fp32(u16: np.ndarray) -> np.ndarray:
    """uint16 array of bf16 bits -> float32 array of the same shape (exact: every bf16 is a float32)."""
    u16 = np.asarray(u16)
    if u16.dtype not in (np.uint16, np.int16):
        raise TypeError(f"bf16_bits_to_fp32 needs a uint16 array of bf16 bits, got {u16.dtype}")
    flat = np.ascontiguousarray(u16).reshape(-1).view(np.uint16)
    return (flat.astype(np.uint32) << 16).view(np.float32).reshape(u16.shape)
