"""Rotary position embedding (RoPE), Meta's pairing (llama-models, llm.c): in each head vector the pairs
(x[2i], x[2i+1]) are rotated by the angle t * f_i, f_i = theta^(-2i/d), with Llama 3.1's frequency scaling. Applied in
place to the q and k parts of a packed qkv (B, T, (H + 2K) d); v is left alone. (Hugging Face pairs x_i with
x_{i+d/2} instead; formats/hf permutes wq and wk's rows to convert.)"""
import math

import numpy as np


def rope_frequencies(head_size, theta=500000.0, factor=1.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_context=8192):
    """f_i (d/2,) as float32, computed as Llama 3.1's `apply_scaling` does: wavelengths 2 pi / f shorter than
    original_context / high_freq_factor are kept, longer than original_context / low_freq_factor divided by
    `factor`, the band between blended linearly in original_context / wavelength. factor 1: no scaling."""
    i = np.arange(0, head_size, 2, dtype=np.float32)
    f = (1.0 / (np.float32(theta) ** (i / np.float32(head_size)))).astype(np.float32)
    if factor == 1.0:
        return f
    wavelen = 2 * math.pi / f.astype(np.float64)
    low, high = original_context / low_freq_factor, original_context / high_freq_factor
    mu = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - mu) * f / factor + mu * f
    out = np.where(wavelen < high, f, np.where(wavelen > low, f / factor, blended))
    return out.astype(np.float32)


def rope_table(max_seq_len, freqs):
    """(maxT, d/2, 2) float32: cos and sin of t * f_i, the angle formed in float32 as the reference does."""
    t = np.arange(max_seq_len, dtype=np.float32)
    angle = np.outer(t, freqs).astype(np.float32)
    return np.stack([np.cos(angle.astype(np.float64)), np.sin(angle.astype(np.float64))], -1).astype(np.float32)


def _pairs(qkv, num_heads, kv_heads):
    """The q and k parts of qkv (B, T, (H + 2K) d) as (B, T, H + K, d/2, 2) views."""
    B, T, W = qkv.shape
    d = W // (num_heads + 2 * kv_heads)
    return qkv[..., :(num_heads + kv_heads) * d].reshape(B, T, num_heads + kv_heads, d // 2, 2)


def rope_forward(qkv, table, num_heads, kv_heads, pos=0):
    # qkv (B, T, (H + 2K) d) in place; table (>= pos + T, d/2, 2) from rope_table; positions pos..pos+T-1
    T = qkv.shape[1]
    x = _pairs(qkv, num_heads, kv_heads)
    cs = table[pos:pos + T, None, :, :]                      # (T, 1, d/2, 2)
    c, s = cs[..., 0].astype(qkv.dtype), cs[..., 1].astype(qkv.dtype)
    x0, x1 = x[..., 0].copy(), x[..., 1].copy()
    np.multiply(x0, c, out=x[..., 0])
    x[..., 0] -= x1 * s                                      # y0 = x0 cos - x1 sin
    np.multiply(x0, s, out=x[..., 1])
    x[..., 1] += x1 * c                                      # y1 = x0 sin + x1 cos


def rope_backward(dqkv, table, num_heads, kv_heads, pos=0):
    # dqkv (B, T, (H + 2K) d) in place: the transposed rotation, dx0 = g0 cos + g1 sin, dx1 = -g0 sin + g1 cos
    T = dqkv.shape[1]
    g = _pairs(dqkv, num_heads, kv_heads)
    cs = table[pos:pos + T, None, :, :]
    c, s = cs[..., 0].astype(dqkv.dtype), cs[..., 1].astype(dqkv.dtype)
    g0, g1 = g[..., 0].copy(), g[..., 1].copy()
    np.multiply(g0, c, out=g[..., 0])
    g[..., 0] += g1 * s
    np.multiply(g1, c, out=g[..., 1])
    g[..., 1] -= g0 * s
