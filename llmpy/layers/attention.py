"""Causal multi-head self-attention over a packed qkv tensor, with grouped-query attention (GQA).

qkv (B, T, (NH + 2K) hs) holds [q | k | v]: NH query heads, K key/value heads (K = NH, the default, is plain
multi-head attention with qkv (B, T, 3C)); head h uses channels h*hs:(h+1)*hs of its part, and query head h reads
key/value head h // (NH / K). The softmax of the scaled scores att (B, NH, T, T) is saved for backward (masked entries
are exactly 0).
"""
import functools
import math

import numpy as np

from ._scratch import buf


def split_heads(qkv, num_heads, kv_heads=None):
    """(B, T, (NH + 2K) hs) -> q (B, NH, T, hs), k and v (B, K, T, hs): strided views (no copy)."""
    B, T, W = qkv.shape
    K = kv_heads or num_heads
    hs = W // (num_heads + 2 * K)
    if K == num_heads:
        h = qkv.reshape(B, T, 3, num_heads, hs).transpose(2, 0, 3, 1, 4)
        return h[0], h[1], h[2]
    q = qkv[..., :num_heads * hs].reshape(B, T, num_heads, hs).transpose(0, 2, 1, 3)
    k = qkv[..., num_heads * hs:(num_heads + K) * hs].reshape(B, T, K, hs).transpose(0, 2, 1, 3)
    v = qkv[..., (num_heads + K) * hs:].reshape(B, T, K, hs).transpose(0, 2, 1, 3)
    return q, k, v


def _groups(x, K):
    """(B, NH, ...) -> (B, K, NH/K, ...): the query heads that share a key/value head, side by side (a view)."""
    return x.reshape(x.shape[0], K, x.shape[1] // K, *x.shape[2:])


@functools.lru_cache(maxsize=8)
def _causal_bias(T, dtype):
    """(T, T): 0 where key position <= query position, -inf where the key is in the future."""
    m = np.triu(np.full((T, T), -np.inf, dtype=dtype), k=1)
    m.flags.writeable = False
    return m


def attention_forward(out, att, qkv, num_heads, kv_heads=None, scratch=None):
    # out (B, T, C); att (B, NH, T, T) saved softmax; qkv (B, T, (NH + 2K) hs). scratch: B*NH*T elements
    B, T, C = out.shape
    hs = C // num_heads
    K = kv_heads or num_heads
    q, k, v = split_heads(qkv, num_heads, K)
    rowmax = buf(scratch, (B, num_heads, T, 1), qkv.dtype)
    if K == num_heads:
        np.matmul(q, k.swapaxes(-1, -2), out=att)
    else:  # each key head against its group of query heads, broadcast (k is never repeated in memory)
        np.matmul(_groups(q, K), k[:, :, None].swapaxes(-1, -2), out=_groups(att, K))
    att *= 1.0 / math.sqrt(hs)
    att += _causal_bias(T, att.dtype)                         # -inf above the diagonal: exp() makes it 0
    np.max(att, axis=-1, keepdims=True, out=rowmax)
    att -= rowmax
    np.exp(att, out=att)
    np.einsum("bhij->bhi", att, out=rowmax[..., 0])           # row sums (einsum: 2x np.sum over short rows)
    att /= rowmax
    heads = out.reshape(B, T, num_heads, hs).swapaxes(1, 2)   # heads written in place
    if K == num_heads:
        np.matmul(att, v, out=heads)
    else:
        np.matmul(_groups(att, K), v[:, :, None], out=_groups(heads, K))


def attention_backward(dqkv, dout, qkv, att, num_heads, kv_heads=None, scratch=None):
    # dqkv (B, T, (NH + 2K) hs) overwritten; dout (B, T, C); qkv, att as saved by forward. A key/value head's
    # gradient sums over its group of query heads. scratch: B*NH*T*T + B*NH*T elements
    B, T, C = dout.shape
    hs = C // num_heads
    K = kv_heads or num_heads
    q, k, v = split_heads(qkv, num_heads, K)
    dq, dk, dv = split_heads(dqkv, num_heads, K)
    do = dout.reshape(B, T, num_heads, hs).swapaxes(1, 2)
    n_att = B * num_heads * T * T
    s = buf(scratch, (n_att + B * num_heads * T,), qkv.dtype)
    datt, rowdot = s[:n_att].reshape(B, num_heads, T, T), s[n_att:].reshape(B, num_heads, T)
    if K == num_heads:
        np.matmul(do, v.swapaxes(-1, -2), out=datt)
        np.matmul(att.swapaxes(-1, -2), do, out=dv)
    else:
        np.matmul(_groups(do, K), v[:, :, None].swapaxes(-1, -2), out=_groups(datt, K))
        np.einsum("bkrij,bkrid->bkjd", _groups(att, K), _groups(do, K), out=dv)
    # softmax backward: dpre = att * (datt - sum_j att*datt), then the 1/sqrt(hs) scale of the scores
    np.einsum("bhij,bhij->bhi", att, datt, out=rowdot)
    datt -= rowdot[..., None]
    datt *= att
    datt *= 1.0 / math.sqrt(hs)
    if K == num_heads:
        np.matmul(datt, k, out=dq)
        np.matmul(datt.swapaxes(-1, -2), q, out=dk)
    else:
        np.matmul(_groups(datt, K), k[:, :, None], out=_groups(dq, K))
        np.einsum("bkrij,bkrid->bkjd", _groups(datt, K), _groups(q, K), out=dk)


def attention_decode(out, qkv, k_cache, v_cache, pos, num_heads, kv_heads=None):
    # One new position per sequence, inference only. qkv (B, 1, (NH + 2K) hs): the new token's q, k, v; k_cache,
    # v_cache (B, K, maxT, hs): its k and v are written at `pos`, then q attends over positions 0..pos. out (B, 1, C).
    B, _, W = qkv.shape
    K = kv_heads or num_heads
    hs = W // (num_heads + 2 * K)
    q, k, v = split_heads(qkv, num_heads, K)                  # (B, NH, 1, hs), (B, K, 1, hs), (B, K, 1, hs)
    k_cache[:, :, pos] = k[:, :, 0]
    v_cache[:, :, pos] = v[:, :, 0]
    if K != num_heads:  # a group of query heads becomes the rows of one key head's product
        q = q.reshape(B, K, num_heads // K, hs)
    att = np.matmul(q, k_cache[:, :, :pos + 1].swapaxes(-1, -2))  # (B, NH, 1, pos+1) or (B, K, NH/K, pos+1)
    att *= 1.0 / math.sqrt(hs)
    att -= att.max(axis=-1, keepdims=True)
    np.exp(att, out=att)
    att /= att.sum(axis=-1, keepdims=True)
    heads = out.reshape(B, 1, num_heads, hs).swapaxes(1, 2) if K == num_heads else out.reshape(B, K, -1, hs)
    np.matmul(att, v_cache[:, :, :pos + 1], out=heads)


def kv_cache_write(k_cache, v_cache, qkv, pos, num_heads, kv_heads=None):
    # A decoding prefill's keys and values: qkv (B, n, (NH + 2K) hs) -> k_cache, v_cache (B, K, maxT, hs) at
    # positions pos..pos+n-1.
    _, k, v = split_heads(qkv, num_heads, kv_heads)           # (B, K, n, hs) each
    n = qkv.shape[1]
    k_cache[:, :, pos:pos + n] = k
    v_cache[:, :, pos:pos + n] = v
