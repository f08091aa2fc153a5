"""Causal self-attention on the GPU.

qkv (B, T, (NH + 2K) hs) = [q | k | v]: NH query heads, K key/value heads (K = NH: plain multi-head attention,
qkv (B, T, 3C)); query head h reads key/value head h // (NH / K) (grouped-query attention).

`CudnnAttention`: cuDNN's fused flash attention (bf16) through nvidia-cudnn-frontend. q (B, NH, T, hs) and k, v
(B, K, T, hs) are strided views into the packed qkv rows (cuDNN takes K heads directly and returns dk, dv at K
heads); forward saves only the softmax statistics (B, NH, T) in fp32; backward is cuDNN's deterministic algorithm
(or, opted into with --fast-attention, its non-deterministic one: faster, not bitwise reproducible).

`FallbackAttention`: our own, for fp32 and when cuDNN is missing: scores materialised as (B, NH, T, T), cuBLASLt
batched products, softmax kernels from kernels/attention.cu. The softmax (B, NH, T, T) is the saved state. Under
grouped-query attention k, v are repeated to NH heads as they are permuted out of qkv, and each kv head's gradient
is summed over its group's query heads as it is permuted back (in head order: deterministic).
"""
from __future__ import annotations

import math

import numpy as np

from .runtime import cdiv


class CudnnAttention:
    state_kind = "stat"  # fp32 statistics, (B, NH, T)

    def __init__(self, cupy, B, T, NH, K, hs, deterministic: bool = True):
        import cudnn
        self.cupy, self.cudnn = cupy, cudnn
        self.B, self.T, self.NH, self.K, self.hs = B, T, NH, K, hs
        self.handle = cudnn.create_handle()
        C, W = NH * hs, (NH + 2 * K) * hs  # out row, qkv row
        self.scale = 1.0 / math.sqrt(hs)
        dims, kv_dims = [B, NH, T, hs], [B, K, T, hs]
        self.qkv_strides = [T * W, hs, W, 1]  # q, k, v (and dq, dk, dv) all step through the packed rows
        self.o_strides = [T * C, hs, C, 1]
        bf16, f32 = cudnn.data_type.BFLOAT16, cudnn.data_type.FLOAT
        # forward
        g = cudnn.pygraph(io_data_type=bf16, intermediate_data_type=f32, compute_data_type=f32, handle=self.handle)
        q = g.tensor(name="q", dim=dims, stride=self.qkv_strides, data_type=bf16)
        k, v = (g.tensor(name=n, dim=kv_dims, stride=self.qkv_strides, data_type=bf16) for n in "kv")
        o, stats = g.sdpa(name="sdpa", q=q, k=k, v=v, generate_stats=True, attn_scale=self.scale,
                          use_causal_mask=True)
        o.set_output(True).set_dim(dims).set_stride(self.o_strides).set_data_type(bf16)
        stats.set_output(True).set_dim([B, NH, T, 1]).set_stride([NH * T, T, 1, 1]).set_data_type(f32)
        self.fwd = _build(g, cudnn)
        self.fwd_t = (q, k, v, o, stats)
        self.bwd, self.bwd_t = self.backward_graph(deterministic)
        _build(self.bwd, cudnn, planned=True)
        self.workspace = cupy.empty(max(self.fwd.get_workspace_size(), self.bwd.get_workspace_size(), 1),
                                    dtype=cupy.uint8)
        self.nbytes = self.workspace.nbytes

    def backward_graph(self, deterministic: bool, heur=None):
        """The backward's cuDNN graph, planned (its ranked plans listed, none built; heuristic modes `heur`, default
        A then FALLBACK), and its tensors (q, k, v, o, do, stats, dq, dk, dv). dev/attention_plans.py
        times every plan of it."""
        cudnn, B, T, NH, K, hs = self.cudnn, self.B, self.T, self.NH, self.K, self.hs
        bf16, f32 = cudnn.data_type.BFLOAT16, cudnn.data_type.FLOAT
        dims, kv_dims = [B, NH, T, hs], [B, K, T, hs]
        g = cudnn.pygraph(io_data_type=bf16, intermediate_data_type=f32, compute_data_type=f32, handle=self.handle)
        q = g.tensor(name="q", dim=dims, stride=self.qkv_strides, data_type=bf16)
        k, v = (g.tensor(name=n, dim=kv_dims, stride=self.qkv_strides, data_type=bf16) for n in "kv")
        o = g.tensor(name="o", dim=dims, stride=self.o_strides, data_type=bf16)
        do = g.tensor(name="do", dim=dims, stride=self.o_strides, data_type=bf16)
        stats = g.tensor(name="stats", dim=[B, NH, T, 1], stride=[NH * T, T, 1, 1], data_type=f32)
        dq, dk, dv = g.sdpa_backward(name="sdpa_bwd", q=q, k=k, v=v, o=o, dO=do, stats=stats,
                                     attn_scale=self.scale, use_causal_mask=True,
                                     use_deterministic_algorithm=deterministic)
        for t, d in ((dq, dims), (dk, kv_dims), (dv, kv_dims)):
            t.set_output(True).set_dim(d).set_stride(self.qkv_strides).set_data_type(bf16)
        _plan(g, cudnn, heur)
        return g, (q, k, v, o, do, stats, dq, dk, dv)

    @staticmethod
    def state_shape(B, T, NH):
        return (B, NH, T)

    def _bind(self):
        self.cudnn.set_stream(handle=self.handle, stream=self.cupy.cuda.get_current_stream().ptr)

    def _offsets(self, itemsize):
        """Byte offsets of the k and v parts in a qkv row."""
        return self.NH * self.hs * itemsize, (self.NH + self.K) * self.hs * itemsize

    def forward(self, out, stats, qkv):
        # out (B, T, C); stats (B, NH, T) fp32; qkv (B, T, (NH + 2K) hs)
        ko, vo = self._offsets(qkv.itemsize)
        p = qkv.data.ptr
        q, k, v, o, st = self.fwd_t
        self._bind()
        self.fwd.execute({q: p, k: p + ko, v: p + vo, o: out.data.ptr, st: stats.data.ptr},
                         self.workspace.data.ptr, handle=self.handle)

    def backward(self, dqkv, dout, qkv, stats, out):
        # dqkv (B, T, (NH + 2K) hs) overwritten (dk, dv at K heads); dout, out (B, T, C); stats from forward
        ko, vo = self._offsets(qkv.itemsize)
        p, dp = qkv.data.ptr, dqkv.data.ptr
        q, k, v, o, do, st, dq, dk, dv = self.bwd_t
        self._bind()
        self.bwd.execute({q: p, k: p + ko, v: p + vo, o: out.data.ptr, do: dout.data.ptr, st: stats.data.ptr,
                          dq: dp, dk: dp + ko, dv: dp + vo}, self.workspace.data.ptr, handle=self.handle)


def _plan(g, cudnn, heur=None):
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans(heur or [cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    return g


def _build(g, cudnn, planned=False):
    if not planned:
        _plan(g, cudnn)
    g.build_plans()
    return g


class FallbackAttention:
    state_kind = "act"  # the softmax (B, NH, T, T) in the activation dtype

    def __init__(self, backend, B, T, NH, K, hs):
        self.gemm, self.k = backend.gemm, backend.k["attention"]
        self.B, self.T, self.NH, self.K, self.hs = B, T, NH, K, hs
        n = B * NH * T * hs
        # scratch: q, k, v, y (or their gradients) per query head (k, v repeated under GQA), and the raw scores
        # (B*NH, T, T)
        flat = backend.zeros(4 * n + B * NH * T * T, backend.act_dtype)
        self.q, self.kk, self.v, self.y = (flat[i * n:(i + 1) * n].reshape(B * NH, T, hs) for i in range(4))
        self.scores = flat[4 * n:].reshape(B * NH, T, T)
        self.nbytes = flat.nbytes

    @staticmethod
    def state_shape(B, T, NH):
        return (B, NH, T, T)

    def _perm(self, fn, *arrays):
        n = self.B * self.NH * self.T * self.hs
        fn((cdiv(n, 256),), (256,), (*arrays, np.int32(self.B), np.int32(self.T), np.int32(self.NH),
                                     np.int32(self.hs)))

    def _permute_qkv(self, qkv):
        """q, kk, v (B*NH, T, hs) <- qkv (B, T, (NH + 2K) hs); k, v repeated over each group's query heads."""
        if self.K == self.NH:
            self._perm(self.k.permute_qkv, self.q, self.kk, self.v, qkv)
        else:
            n = self.B * self.NH * self.T * self.hs
            self.k.permute_qkv_gqa((cdiv(n, 256),), (256,), (self.q, self.kk, self.v, qkv, np.int32(self.B),
                                                             np.int32(self.T), np.int32(self.NH), np.int32(self.K),
                                                             np.int32(self.hs)))

    def forward(self, out, att, qkv):
        B, T, NH, hs, g = self.B, self.T, self.NH, self.hs, self.gemm
        BH = B * NH
        self._permute_qkv(qkv)
        # scores (T, T) = q @ k^T per (b, h)
        g.mm(self.scores, self.q, self.kk, T, T, hs, transy=True, batch=BH, stride_x=T * hs, stride_y=T * hs,
             stride_o=T * T)
        rows = BH * T
        self.k.softmax_causal_forward((cdiv(rows, 8),), (256,), (att, self.scores, np.float32(1 / math.sqrt(hs)),
                                                                 np.int32(rows), np.int32(T)))
        g.mm(self.y, att.reshape(BH, T, T), self.v, T, hs, T, batch=BH, stride_x=T * T, stride_y=T * hs,
             stride_o=T * hs)
        self._perm(self.k.heads_to_rows, out, self.y)

    def backward(self, dqkv, dout, qkv, att, out=None):
        B, T, NH, hs, g = self.B, self.T, self.NH, self.hs, self.gemm
        BH = B * NH
        att = att.reshape(BH, T, T)
        self._permute_qkv(qkv)
        self._perm(self.k.rows_to_heads, self.y, dout)                 # y <- dy (B*NH, T, hs)
        dscores = self.scores
        g.mm(dscores, self.y, self.v, T, T, hs, transy=True, batch=BH, stride_x=T * hs, stride_y=T * hs,
             stride_o=T * T)                                            # datt = dy @ v^T
        dv = self.v                                                     # v is no longer needed: dv over it
        g.mm(dv, att, self.y, T, hs, T, transx=True, batch=BH, stride_x=T * T, stride_y=T * hs, stride_o=T * hs)
        rows = BH * T
        self.k.softmax_causal_backward((cdiv(rows, 8),), (256,), (dscores, att, np.float32(1 / math.sqrt(hs)),
                                                                  np.int32(rows), np.int32(T)))
        dq = self.y                                                     # dy is no longer needed
        g.mm(dq, dscores, self.kk, T, hs, T, batch=BH, stride_x=T * T, stride_y=T * hs, stride_o=T * hs)
        # dk = dscores^T @ q, written over k after dq has been formed from it
        g.mm(self.kk, dscores, self.q, T, hs, T, transx=True, batch=BH, stride_x=T * T, stride_y=T * hs,
             stride_o=T * hs)
        if self.K == self.NH:
            self._perm(self.k.unpermute_qkv, dqkv, dq, self.kk, dv)
        else:  # one thread per element of dqkv: a kv head's dk, dv summed over its query heads
            n = dqkv.size
            self.k.unpermute_qkv_gqa((cdiv(n, 256),), (256,), (dqkv, dq, self.kk, dv, np.int32(B), np.int32(T),
                                                               np.int32(NH), np.int32(self.K), np.int32(hs)))
