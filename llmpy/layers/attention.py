"""Causal multi-head self-attention over a packed qkv tensor.

qkv (B, T, 3C) holds [q | k | v]; head h uses channels h*hs:(h+1)*hs of each. The softmax of the scaled scores
att (B, NH, T, T) is saved for backward (masked entries are exactly 0).
"""
import functools
import math

import numpy as np

from ._scratch import buf


def split_heads(qkv, num_heads):
    """(B, T, 3C) -> three (B, NH, T, hs) strided views (no copy)."""
    B, T, C3 = qkv.shape
    hs = C3 // 3 // num_heads
    h = qkv.reshape(B, T, 3, num_heads, hs).transpose(2, 0, 3, 1, 4)
    return h[0], h[1], h[2]


@functools.lru_cache(maxsize=8)
def _causal_bias(T, dtype):
    """(T, T): 0 where key position <= query position, -inf where the key is in the future."""
    m = np.triu(np.full((T, T), -np.inf, dtype=dtype), k=1)
    m.flags.writeable = False
    return m


def attention_forward(out, att, qkv, num_heads, scratch=None):
    # out (B, T, C); att (B, NH, T, T) saved softmax; qkv (B, T, 3C). scratch: B*NH*T elements
    B, T, C = out.shape
    hs = C // num_heads
    q, k, v = split_heads(qkv, num_heads)
    rowmax = buf(scratch, (B, num_heads, T, 1), qkv.dtype)
    np.matmul(q, k.swapaxes(-1, -2), out=att)
    att *= 1.0 / math.sqrt(hs)
    att += _causal_bias(T, att.dtype)                         # -inf above the diagonal: exp() makes it 0
    np.max(att, axis=-1, keepdims=True, out=rowmax)
    att -= rowmax
    np.exp(att, out=att)
    np.einsum("bhij->bhi", att, out=rowmax[..., 0])           # row sums (einsum: 2x np.sum over short rows)
    att /= rowmax
    np.matmul(att, v, out=out.reshape(B, T, num_heads, hs).swapaxes(1, 2))  # heads written in place


def attention_backward(dqkv, dout, qkv, att, num_heads, scratch=None):
    # dqkv (B, T, 3C) overwritten; dout (B, T, C); qkv, att as saved by forward.
    # scratch: B*NH*T*T + B*NH*T elements
    B, T, C = dout.shape
    hs = C // num_heads
    q, k, v = split_heads(qkv, num_heads)
    dq, dk, dv = split_heads(dqkv, num_heads)
    do = dout.reshape(B, T, num_heads, hs).swapaxes(1, 2)
    n_att = B * num_heads * T * T
    s = buf(scratch, (n_att + B * num_heads * T,), qkv.dtype)
    datt, rowdot = s[:n_att].reshape(B, num_heads, T, T), s[n_att:].reshape(B, num_heads, T)
    np.matmul(do, v.swapaxes(-1, -2), out=datt)
    np.matmul(att.swapaxes(-1, -2), do, out=dv)
    # softmax backward: dpre = att * (datt - sum_j att*datt), then the 1/sqrt(hs) scale of the scores
    np.einsum("bhij,bhij->bhi", att, datt, out=rowdot)
    datt -= rowdot[..., None]
    datt *= att
    datt *= 1.0 / math.sqrt(hs)
    np.matmul(datt, k, out=dq)
    np.matmul(datt.swapaxes(-1, -2), q, out=dk)


def attention_decode(out, qkv, k_cache, v_cache, pos, num_heads):
    # One new position per sequence, inference only. qkv (B, 1, 3C): the new token's q, k, v; k_cache, v_cache
    # (B, NH, maxT, hs): its k and v are written at `pos`, then q attends over positions 0..pos. out (B, 1, C).
    B, _, C3 = qkv.shape
    hs = C3 // 3 // num_heads
    q, k, v = split_heads(qkv, num_heads)                     # (B, NH, 1, hs) each
    k_cache[:, :, pos] = k[:, :, 0]
    v_cache[:, :, pos] = v[:, :, 0]
    att = np.matmul(q, k_cache[:, :, :pos + 1].swapaxes(-1, -2))  # (B, NH, 1, pos+1)
    att *= 1.0 / math.sqrt(hs)
    att -= att.max(axis=-1, keepdims=True)
    np.exp(att, out=att)
    att /= att.sum(axis=-1, keepdims=True)
    np.matmul(att, v_cache[:, :, :pos + 1], out=out.reshape(B, 1, num_heads, hs).swapaxes(1, 2))
