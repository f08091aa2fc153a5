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
def _future_mask(T):
    m = np.triu(np.ones((T, T), dtype=bool), k=1)            # True where key position > query position
    m.flags.writeable = False
    return m


def attention_forward(out, att, qkv, num_heads, scratch=None):
    # out (B, T, C); att (B, NH, T, T) saved softmax; qkv (B, T, 3C). scratch: B*C*T + B*NH*T elements
    B, T, C = out.shape
    hs = C // num_heads
    q, k, v = split_heads(qkv, num_heads)
    s = buf(scratch, (B * T * C + B * num_heads * T,), qkv.dtype)
    y, rowmax = s[:B * T * C].reshape(B, num_heads, T, hs), s[B * T * C:].reshape(B, num_heads, T, 1)
    np.matmul(q, k.swapaxes(-1, -2), out=att)
    att *= 1.0 / math.sqrt(hs)
    np.copyto(att, -np.inf, where=_future_mask(T))
    np.max(att, axis=-1, keepdims=True, out=rowmax)
    att -= rowmax
    np.exp(att, out=att)
    np.sum(att, axis=-1, keepdims=True, out=rowmax)
    att /= rowmax
    np.matmul(att, v, out=y)
    np.copyto(out.reshape(B, T, num_heads, hs), y.transpose(0, 2, 1, 3))


def attention_backward(dqkv, dout, qkv, att, num_heads, scratch=None):
    # dqkv (B, T, 3C) overwritten; dout (B, T, C); qkv, att as saved by forward.
    # scratch: B*NH*T*T + B*C*T + B*NH*T elements
    B, T, C = dout.shape
    hs = C // num_heads
    q, k, v = split_heads(qkv, num_heads)
    dq, dk, dv = split_heads(dqkv, num_heads)
    do = dout.reshape(B, T, num_heads, hs).transpose(0, 2, 1, 3)
    n_att, n_y = B * num_heads * T * T, B * T * C
    s = buf(scratch, (n_att + n_y + B * num_heads * T,), qkv.dtype)
    datt = s[:n_att].reshape(B, num_heads, T, T)
    tmp = s[n_att:n_att + n_y].reshape(B, num_heads, T, hs)
    rowdot = s[n_att + n_y:].reshape(B, num_heads, T)
    np.matmul(do, v.swapaxes(-1, -2), out=datt)
    np.matmul(att.swapaxes(-1, -2), do, out=tmp)
    np.copyto(dv, tmp)
    # softmax backward: dpre = att * (datt - sum_j att*datt), then the 1/sqrt(hs) scale of the scores
    np.einsum("bhij,bhij->bhi", att, datt, out=rowdot)
    datt -= rowdot[..., None]
    datt *= att
    datt *= 1.0 / math.sqrt(hs)
    np.matmul(datt, k, out=tmp)
    np.copyto(dq, tmp)
    np.matmul(datt.swapaxes(-1, -2), q, out=tmp)
    np.copyto(dk, tmp)
