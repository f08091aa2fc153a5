"""The CUDA backend: the same ops as backends/cpu.py, run by our NVRTC kernels, cuBLASLt and cuDNN on one stream.

Precision (--dtype bf16): bf16 weights, activations and gradients; fp32 master weights, AdamW moments, LayerNorm
statistics, losses and every reduction. --dtype fp32 runs everything in fp32 (and the fallback attention, since
cuDNN's flash attention is half precision only).
"""
from __future__ import annotations

import contextlib
import math
import os
import sys

import numpy as np

from ...errors import UserError
from ..fp8 import Fp8Ops, head_enabled
from ..fresh import FreshGrads
from ..ops import DinpSums, OpShapes, take_sums
from .gemm import Gemm
from .mmfree import MMFree
from .runtime import bf16_dtype, cdiv, import_cupy, module

_NORM_BLOCKS = 264  # grid of the sum-of-squares partials: 2 per SM on an H200; fixed, so the sum's order is fixed
# the norms' row kernels: rows of at most this many use the `_batched` kernels (4 packs a lane in flight; a wave or
# two of warps is latency-bound one pack at a time), more rows the plain ones (kernels/layernorm.cu; H200: batched
# faster at 8192 and 16384 rows, slower at 65536)
ROWS_BATCHED = 32768
_CHUNK_ROWS = 256   # rows per partial in the column sums (bias / LayerNorm parameter gradients)
# LayerNorm's one-pass backward (layernorm.cu norm_backward_onepass): about this many blocks (a fixed grid for a
# given row count: the sums' order depends on the rows only), each over a multiple of _LN_ONEPASS_ROWS rows
_LN_ONEPASS_BLOCKS = 264
_LN_ONEPASS_ROWS = 32
_COLSUM_WARPS = 8   # warps per block of those partial sums (COLSUM_WARPS in common.cuh)
_DECODE_THREADS = 256  # block of attention_decode, one per (sequence, query head)
_FAMILIES = ("encoder", "layernorm", "rmsnorm", "matmul", "gelu", "swiglu", "rope", "residual", "attention",
             "classifier", "adamw", "cast")  # (fp8 and the MatMul-free kernels load with their ops)


class CUDABackend(FreshGrads, Fp8Ops):
    name = "cuda"

    def __init__(self, dtype: str = "bf16", attention: str = "auto", device_id: int | None = None, fp8: bool = False):
        cp = import_cupy()
        if device_id is not None:
            if device_id >= cp.cuda.runtime.getDeviceCount():
                raise UserError(f"GPU {device_id} requested but only {cp.cuda.runtime.getDeviceCount()} visible")
            cp.cuda.Device(device_id).use()
        if dtype not in ("fp32", "bf16"):
            raise UserError(f"the cuda device supports --dtype fp32 or bf16 (got {dtype})")
        self.cp = self.xp = cp
        self.dtype_name = dtype
        self.act_dtype = self.param_dtype = np.dtype(np.float32) if dtype == "fp32" else bf16_dtype()
        self.stat_dtype = self.acc_dtype = np.dtype(np.float32)
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.stream.use()
        self.k = {n: module(n, dtype) for n in _FAMILIES}  # kernels/<n>.cu
        self.gemm = Gemm(cp, dtype)
        self.attention_mode = attention  # auto: cuDNN for bf16 when importable, else our fallback
        self.fast_attention = False      # cuDNN's non-deterministic backward (opt-in: --fast-attention)
        self.attn = {}                   # (B, T, NH, K, hs, fast) -> attention implementation
        self._decode_scores = {}         # (B, NH, maxT) -> attention_decode's fp32 scores (B*NH*maxT)
        self.capturing = False
        self.fresh = []                  # byte ranges of parameter gradients that count as zero (fresh_grads)
        self.mmfree = MMFree(self)       # BitLinear, MLGRU, lower bounds (mmfree.py) and their scratch
        self.fp8_enabled = fp8           # --dtype fp8: registered products on FP8 tensor cores (fp8.py)
        # their inputs' FP8 copies kept and written by the producers (cuda/fp8.py), bit for bit the separate passes
        # (tests/test_cuda_fp8.py); LLMPY_FP8_FUSED=0 runs the separate passes instead (to compare them)
        self.fp8_fused = fp8 and os.environ.get("LLMPY_FP8_FUSED", "1") != "0"
        self.fp8_head = head_enabled(fp8)  # the LM head an FP8 product too (LLMPY_FP8_HEAD=1)
        if fp8:
            cc = int(cp.cuda.Device().compute_capability)  # "90" on Hopper
            if dtype != "bf16" or cc < 89:
                raise UserError(f"--dtype fp8 needs FP8 tensor cores (compute capability 8.9 or later: Ada, Hopper "
                                f"and newer); this GPU is sm_{cc}: use --dtype bf16")

    # ---- memory ---------------------------------------------------------------------------------------------
    def zeros(self, n, dtype):
        try:
            return self.cp.zeros(int(n), dtype=dtype)
        except self.cp.cuda.memory.OutOfMemoryError:
            free, total = self.cp.cuda.runtime.memGetInfo()
            need = int(n) * np.dtype(dtype).itemsize
            raise UserError(f"out of GPU memory allocating {need / 2**30:.2f} GiB ({free / 2**30:.1f} of "
                            f"{total / 2**30:.1f} GiB free): use a smaller --batch-size or --recompute 2") from None
        except (ValueError, OverflowError):  # a size past what an array can index: no memory holds it either
            raise MemoryError(f"{int(n):,} elements of {np.dtype(dtype).name}") from None

    def to_numpy(self, x) -> np.ndarray:
        # Copy a strided view to a contiguous one ourselves: CuPy's get() would do it inside `with stream:`,
        # whose exit leaves the null stream current (see on()). Then restore our stream regardless.
        if not x.flags.c_contiguous:
            x = self.cp.ascontiguousarray(x)
        try:
            return self.cp.asnumpy(x, stream=self.stream)
        finally:
            self.stream.use()

    def asarray(self, x, dtype=None):
        a = np.ascontiguousarray(x, dtype=dtype)
        out = self.cp.empty(a.shape, dtype=a.dtype)
        out.set(a, stream=self.stream)
        return out

    def copy_(self, dst, src):
        if dst.dtype == src.dtype:
            self.cp.copyto(dst, src)
        elif src.dtype == np.float32:
            self.load_f32(dst, src)
        else:
            raise TypeError(f"copy {src.dtype} -> {dst.dtype}")

    def load_f32(self, dst, src_f32):
        """dst (any T) = src (fp32, device or host), rounded to nearest."""
        if isinstance(src_f32, np.ndarray):
            src_f32 = self.asarray(src_f32, np.float32)
        n = dst.size
        self.k["cast"].cast_from_f32((cdiv(n, 256),), (256,), (dst, src_f32, np.int64(n)))

    def fill_zero(self, x):
        self.cp.cuda.runtime.memsetAsync(x.data.ptr, 0, x.nbytes, self.cp.cuda.get_current_stream().ptr)

    def release_cache(self):
        self.stream.synchronize()  # the copies out of the freed blocks have run
        self.cp.get_default_memory_pool().free_all_blocks()

    def add_inplace(self, a, b):
        n = a.size
        self.k["residual"].add_inplace((cdiv(n, 256),), (256,), (a, b, np.int64(n)))

    # ---- parameter gradients that count as zero (backends/fresh.py) ------------------------------------------
    @staticmethod
    def _ptr(a) -> int:
        return a.data.ptr

    def _zero_bytes(self, ranges) -> None:
        for a, b in ranges:
            self.cp.cuda.runtime.memsetAsync(a, 0, b - a, self.cp.cuda.get_current_stream().ptr)

    def side_stream(self):
        """A second stream (communication overlapping backward) and the event helpers to order the two."""
        return self.cp.cuda.Stream(non_blocking=True)

    def event(self):
        return self.cp.cuda.Event(disable_timing=True)

    @contextlib.contextmanager
    def on(self, stream):
        """Runs the ops inside on `stream`, then makes the backend's stream current again. Not CuPy's `with
        stream:`: its exit rewinds to the stream current before any `with` (the null stream), ignoring `use()`;
        that silently moved every later op off self.stream, racing the reads that wait on it (H200 x2)."""
        stream.use()
        try:
            yield stream
        finally:
            self.stream.use()

    def synchronize(self):
        self.stream.synchronize()

    def logit_columns(self, vocab_size: int, padded_vocab_size: int) -> int:
        return padded_vocab_size  # all Vp columns (multiples of 128 tile well); the pad gets no probability

    def _attention(self, B, T, NH, hs, K=None):
        K = K or NH
        _check_heads(NH, K)
        key = (B, T, NH, K, hs, self.fast_attention)
        if key not in self.attn:
            from .attention import CudnnAttention, FallbackAttention
            a = None
            if self.dtype_name == "bf16" and self.attention_mode in ("auto", "cudnn"):
                try:
                    a = CudnnAttention(self.cp, B, T, NH, K, hs, deterministic=not self.fast_attention)
                except ImportError:
                    if self.attention_mode == "cudnn":
                        raise UserError("cuDNN attention needs nvidia-cudnn-frontend: pip install -e '.[cuda]'")
                except Exception as e:  # cuDNN has no plan for this shape (e.g. T = 1 when decoding)
                    if self.attention_mode == "cudnn":
                        raise
                    print(f"note: cuDNN attention has no plan for B={B} T={T} heads={NH} kv heads={K} head size "
                          f"{hs} ({e}); using llmpy's own", file=sys.stderr)
            self.attn[key] = a or FallbackAttention(self, B, T, NH, K, hs)
        return self.attn[key]

    def _attention_for(self, out, qkv, num_heads, kv_heads):
        B, T, C = out.shape
        hs, K = C // num_heads, kv_heads or num_heads
        if qkv.shape != (B, T, (num_heads + 2 * K) * hs) or C != num_heads * hs:
            raise ValueError(f"attention: qkv {qkv.shape} and out/dout {out.shape} do not fit {num_heads} query and "
                             f"{K} key/value heads")
        return self._attention(B, T, num_heads, hs, K)

    def attention_state(self, B: int, T: int, heads: int, kv_heads: int, head_size: int) -> tuple[tuple, str]:
        a = self._attention(B, T, heads, head_size, kv_heads)
        return a.state_shape(B, T, heads), a.state_kind

    def plan_workspace(self, shapes: OpShapes) -> int:
        """Everything the ops need besides the planned tensors, allocated once; returns its size in bytes."""
        B, T, C = shapes.B, shapes.T, shapes.channels
        N = B * T
        if C % 8:
            raise UserError(f"the cuda kernels need channels divisible by 8 (got {C})")
        attention = self._attention(B, T, shapes.heads, shapes.head_size, shapes.kv_heads) if shapes.heads else None
        # column-sum partials, one row per chunk of rows: LayerNorm's dw|db (2C wide; RMSNorm's dw: C) or the
        # widest bias
        width = max(2 * C, max(shapes.bias_widths, default=0))
        self.colsum_part = self.zeros(max(cdiv(N, _CHUNK_ROWS) * width, _LN_ONEPASS_BLOCKS * 2 * C), np.float32)
        # the column sums of a norm backward's dinp, kept for the next matmul_backward(db_sums=) (DinpSums)
        self.sum_part = self.zeros(max(cdiv(N, _CHUNK_ROWS), _LN_ONEPASS_BLOCKS) * C, np.float32)
        self._sums_serial = 0
        self.norm_part = self.zeros(_NORM_BLOCKS, np.float32)
        self.order = self.zeros(N, np.int32)        # encoder backward: positions sorted by token (stable)
        self.seg = self.zeros(N + 1, np.int32)      # segment starts into order, one per distinct token
        self.nseg = self.zeros(1, np.int32)
        # grow only: models planned on one backend (a batch decoder, then its prefill of a shorter prompt) share it
        if getattr(self, "_staging", None) is None or self._staging.n < N:
            self._staging = _Staging(self.cp, N)
        self._ids16 = shapes.vocab <= 65536
        return (self.colsum_part.nbytes + self.sum_part.nbytes + self.norm_part.nbytes + 4 * (2 * N + 2)
                + self.gemm.workspace.nbytes + (attention.nbytes if attention else 0))

    def set_tokens(self, dst, host, *, training=True):
        """Uploads (B, T) token ids asynchronously (through pinned staging buffers, so the host can prepare the
        next batch while the GPU works); for training also the sort the deterministic encoder backward uses."""
        slot = self._staging.take(dst.size)
        flat = slot.tok[:dst.size]
        np.copyto(flat, np.asarray(host).reshape(-1), casting="unsafe")
        self._upload(dst.reshape(-1), flat)
        if training:
            n = flat.size
            # stable sort by token: a radix sort on 16-bit keys (GPT-2's ids fit), positions kept in order
            order = slot.order[:n]
            order[...] = np.argsort(flat.astype(np.uint16) if self._ids16 else flat, kind="stable")
            s = flat[order]
            starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
            seg = slot.seg[:n + 1]
            seg[:starts.size] = starts
            seg[starts.size:] = n
            slot.nseg[0] = starts.size
            self._upload(self.order[:n], order)
            self._upload(self.seg[:n + 1], seg)
            self._upload(self.nseg, slot.nseg)
        slot.done.record(self.stream)

    def _upload(self, dst, src):
        self.cp.cuda.runtime.memcpyAsync(dst.data.ptr, src.ctypes.data, src.nbytes,
                                         self.cp.cuda.runtime.memcpyHostToDevice, self.stream.ptr)

    def upload(self, dst, host):
        """dst (device, contiguous) = host array, asynchronously through pinned memory kept alive until copied."""
        mem = self.cp.cuda.alloc_pinned_memory(max(host.nbytes, 1))
        h = np.frombuffer(mem, host.dtype, host.size)
        np.copyto(h, host.reshape(-1))
        self._upload(dst, h)
        ev = self.cp.cuda.Event(disable_timing=True)
        ev.record(self.stream)
        self._inflight = [(e, m) for e, m in getattr(self, "_inflight", []) if not e.done] + [(ev, mem)]

    def async_read(self, *arrays):
        """Starts device->host copies of small arrays; `.result()` waits for them only (not for later work)."""
        return _Readback(self, arrays)

    # ---- layers ---------------------------------------------------------------------------------------------
    def encoder_forward(self, out, tokens, wte, wpe):
        B, T, C = out.shape
        if wte.dtype != out.dtype:  # a packed model's bf16 embedding under --dtype fp32
            if (wte.dtype.itemsize != 2 or out.dtype != np.float32 or C % 8 or wte.data.ptr % 16
                    or (wpe is not None and wpe.dtype != np.float32)):
                raise TypeError(f"encoder_forward: wte {wte.dtype} into out {out.dtype} (C = {C})")
            self.k["encoder"].encoder_forward_widen((cdiv(B * T * C // 8, 256),), (256,), (
                out, tokens, wte, wpe if wpe is not None else np.uint64(0), np.int32(B * T), np.int32(T), np.int32(C)))
            return
        n = B * T * C // (16 // out.itemsize)
        wpe = wpe if wpe is not None else np.uint64(0)  # null: no position table
        self.k["encoder"].encoder_forward((cdiv(n, 256),), (256,), (out, tokens, wte, wpe, np.int32(B * T),
                                                                     np.int32(T), np.int32(C)))

    def encoder_backward(self, dwte, dwpe, dout, tokens):
        B, T, C = dout.shape
        k = self.k["encoder"]
        self._zero_if_fresh(dwte, dwpe)  # scatters: they add into a zeroed table
        if dwpe is not None:
            k.encoder_backward_wpe((cdiv(T * C, 256),), (256,), (dwpe, dout, np.int32(B), np.int32(T), np.int32(C)))
        k.encoder_backward_wte((B * T,), (min(1024, _round32(C)),), (dwte, dout, tokens, self.order, self.seg,
                                                                      self.nseg, np.int32(C)))

    def layernorm_forward(self, out, mean, rstd, inp, w, b, fp8_next=None):
        C = inp.shape[-1]
        rows = inp.size // C
        k = self.k["layernorm"]
        j = None if self.fp8 is None else self.fp8.norm_target(out, fp8_next)
        if j is not None:  # out written only as the FP8 copies of product j's input (cuda/fp8.py)
            (k.layernorm_forward_fp8_batched if rows <= ROWS_BATCHED else k.layernorm_forward_fp8)(
                (cdiv(rows, 8),), (256,), (self.fp8.buf_a, mean, rstd, np.uint64(0), inp, np.uint64(0), w, b,
                                           np.int32(rows), np.int32(C)) + self.fp8.norm_args(j))
            return self.fp8.norm_written(j, out)
        (k.layernorm_forward_batched if rows <= ROWS_BATCHED else k.layernorm_forward)(
            (cdiv(rows, 8),), (256,), (out, mean, rstd, inp, w, b, np.int32(rows), np.int32(C)))

    def fused_residual_layernorm_forward(self, residual, out, mean, rstd, inp1, inp2, w, b, fp8_next=None):
        C = inp1.shape[-1]
        rows = inp1.size // C
        k = self.k["layernorm"]
        j = None if self.fp8 is None else self.fp8.norm_target(out, fp8_next)
        if j is not None:  # out written only as the FP8 copies of product j's input (cuda/fp8.py)
            (k.layernorm_forward_fp8_batched if rows <= ROWS_BATCHED else k.layernorm_forward_fp8)(
                (cdiv(rows, 8),), (256,), (self.fp8.buf_a, mean, rstd, residual, inp1, inp2, w, b, np.int32(rows),
                                           np.int32(C)) + self.fp8.norm_args(j))
            return self.fp8.norm_written(j, out)
        (k.fused_residual_layernorm_forward_batched if rows <= ROWS_BATCHED else k.fused_residual_layernorm_forward)(
            (cdiv(rows, 8),), (256,), (residual, out, mean, rstd, inp1, inp2, w, b, np.int32(rows), np.int32(C)))

    def _ln_onepass(self, rows, C, itemsize):
        """(blocks, threads, rows a block) of LayerNorm's one-pass backward over (rows, C), or None where it does
        not apply (rows wider than 256 packs, or partials beyond the planned workspace): then the dinp kernel and
        the column-sum kernels run apart. Threads: G groups of P = C / N packs (G > 1 for rows of at most 128
        packs), so that a block has ~256 threads. (RMSNorm keeps its separate kernels: one pass was slower there,
        0.1063 vs 0.1033 ms on Llama 1B's rows, H200 2026-11-30.)"""
        P = C // (16 // itemsize)
        if P > 256 or rows < 1:
            return None
        G = min(32, 256 // P)
        R = _LN_ONEPASS_ROWS * cdiv(rows, _LN_ONEPASS_ROWS * _LN_ONEPASS_BLOCKS)
        nb = cdiv(rows, R)
        if nb * 2 * C > self.colsum_part.size or nb * C > self.sum_part.size:
            return None
        return nb, cdiv(G * P, 32) * 32, R

    def _new_sums(self, chunks, C):
        self._sums_serial += 1
        return DinpSums(self._sums_serial, C, chunks)

    def layernorm_backward(self, dinp, dw, db, dout, inp, w, mean, rstd, dinp_sums=False):
        C = inp.shape[-1]
        rows = inp.size // C
        k = self.k["layernorm"]
        add = int(not self._first_write(dw)) | int(not self._first_write(db)) << 1
        plan = self._ln_onepass(rows, C, inp.itemsize)
        if plan is not None:  # one pass: dinp, dw | db's partials and (dinp_sums) the updated dinp's
            nb, threads, R = plan
            k.layernorm_backward_onepass(
                (nb,), (threads,), (dinp, self.colsum_part, self.sum_part if dinp_sums else np.uint64(0), dout, inp,
                                    w, mean, rstd, np.int32(rows), np.int32(C), np.int32(R)))
            k.layernorm_backward_params_finalize8((cdiv(2 * C, 32),), (32, 8), (dw, db, self.colsum_part,
                                                                               np.int32(nb), np.int32(C),
                                                                               np.int32(add)))
            return self._new_sums(nb, C) if dinp_sums else None
        (k.layernorm_backward_dinp_batched if rows <= ROWS_BATCHED else k.layernorm_backward_dinp)(
            (cdiv(rows, 8),), (256,), (dinp, dout, inp, w, mean, rstd, np.int32(rows), np.int32(C)))
        chunks = cdiv(rows, _CHUNK_ROWS)
        self._check_colsum(chunks, 2 * C)
        k.layernorm_backward_params_partial(self._colsum_grid(inp, C, chunks), (32 * _COLSUM_WARPS,),
                                            (self.colsum_part, dout, inp, mean, rstd, np.int32(rows), np.int32(C),
                                             np.int32(_CHUNK_ROWS)))
        k.layernorm_backward_params_finalize((cdiv(2 * C, 128),), (128,),
                                             (dw, db, self.colsum_part, np.int32(chunks), np.int32(C), np.int32(add)))
        if not dinp_sums:
            return None
        if chunks * C > self.sum_part.size:
            raise ValueError(f"dinp_sums: {chunks} x {C} partials exceed the planned workspace ({self.sum_part.size})")
        self.k["matmul"].colsum_partial(self._colsum_grid(dinp, C, chunks), (32 * _COLSUM_WARPS,),
                                        (self.sum_part, dinp, np.int32(rows), np.int32(C), np.int32(_CHUNK_ROWS)))
        return self._new_sums(chunks, C)

    def rmsnorm_forward(self, out, rstd, inp, w, eps: float, fp8_next=None):
        C = inp.shape[-1]
        rows = inp.size // C
        j = None if self.fp8 is None else self.fp8.norm_target(out, fp8_next)
        if j is not None:  # out written only as the FP8 copies of product j's input (cuda/fp8.py)
            self.k["rmsnorm"].rmsnorm_forward_fp8(
                (cdiv(rows, 8),), (256,), (self.fp8.buf_a, rstd, np.uint64(0), inp, np.uint64(0), w, np.float32(eps),
                                           np.int32(rows), np.int32(C)) + self.fp8.norm_args(j))
            return self.fp8.norm_written(j, out)
        self.k["rmsnorm"].rmsnorm_forward((cdiv(rows, 8),), (256,), (out, rstd, inp, w, np.float32(eps),
                                                                     np.int32(rows), np.int32(C)))

    def fused_residual_rmsnorm_forward(self, residual, out, rstd, inp1, inp2, w, eps: float, fp8_next=None):
        C = inp1.shape[-1]
        rows = inp1.size // C
        j = None if self.fp8 is None else self.fp8.norm_target(out, fp8_next)
        if j is not None:  # out written only as the FP8 copies of product j's input (cuda/fp8.py)
            self.k["rmsnorm"].rmsnorm_forward_fp8(
                (cdiv(rows, 8),), (256,), (self.fp8.buf_a, rstd, residual, inp1, inp2, w, np.float32(eps),
                                           np.int32(rows), np.int32(C)) + self.fp8.norm_args(j))
            return self.fp8.norm_written(j, out)
        self.k["rmsnorm"].fused_residual_rmsnorm_forward(
            (cdiv(rows, 8),), (256,), (residual, out, rstd, inp1, inp2, w, np.float32(eps), np.int32(rows),
                                       np.int32(C)))

    def rmsnorm_backward(self, dinp, dw, dout, inp, w, rstd):
        C = inp.shape[-1]
        rows = inp.size // C
        k = self.k["rmsnorm"]
        (k.rmsnorm_backward_dinp_batched if rows <= ROWS_BATCHED else k.rmsnorm_backward_dinp)(
            (cdiv(rows, 8),), (256,), (dinp, dout, inp, w, rstd, np.int32(rows), np.int32(C)))
        chunks = cdiv(rows, _CHUNK_ROWS)
        self._check_colsum(chunks, C)
        k.rmsnorm_backward_weight_partial(self._colsum_grid(inp, C, chunks), (32 * _COLSUM_WARPS,),
                                          (self.colsum_part, dout, inp, rstd, np.int32(rows), np.int32(C),
                                           np.int32(_CHUNK_ROWS)))
        k.rmsnorm_backward_weight_finalize((cdiv(C, 128),), (128,), (dw, self.colsum_part, np.int32(chunks),
                                                                     np.int32(C), np.int32(not self._first_write(dw))))

    def _rope_args(self, x, table, num_heads, kv_heads, pos):
        """(grid, (BT, T, W, R, hs)) of a rope launch on x (B, T, (NH + 2K) hs), checked against table."""
        B, T, W = x.shape
        hs = W // (num_heads + 2 * kv_heads)
        npack = 16 // x.itemsize
        if (num_heads % kv_heads or W != (num_heads + 2 * kv_heads) * hs or hs % npack or x.data.ptr % 16
                or not x.flags.c_contiguous):
            raise ValueError(f"rope: qkv {x.shape} is not a contiguous, 16-byte aligned array of {num_heads} query "
                             f"and {kv_heads} key/value heads of a head size divisible by {npack}")
        if (table.dtype != np.float32 or table.ndim != 3 or table.shape[1:] != (hs // 2, 2)
                or table.shape[0] < pos + T or not table.flags.c_contiguous or table.data.ptr % 16):
            raise ValueError(f"rope: table {table.shape} {table.dtype} is not a contiguous fp32 (>= {pos + T}, "
                             f"{hs // 2}, 2) table")
        R = (num_heads + kv_heads) * hs  # the rotated channels of a row: q and k
        return (cdiv(B * T * R // npack, 256),), (np.int32(B * T), np.int32(T), np.int32(W), np.int32(R), np.int32(hs))

    def rope_forward(self, qkv, table, num_heads: int, kv_heads: int, pos: int = 0):
        grid, args = self._rope_args(qkv, table, num_heads, kv_heads, pos)
        self.k["rope"].rope_forward(grid, (256,), (qkv, table, *args, np.int32(pos)))

    def rope_backward(self, dqkv, table, num_heads: int, kv_heads: int):
        grid, args = self._rope_args(dqkv, table, num_heads, kv_heads, 0)
        self.k["rope"].rope_backward(grid, (256,), (dqkv, table, *args))

    def _swiglu_sizes(self, x, F):
        npack = 16 // x.itemsize
        if F % npack:
            raise UserError(f"the cuda SwiGLU kernels need a hidden size divisible by {npack} (got {F})")
        return np.int64(x.size // (2 * F) * F), (cdiv(x.size // (2 * F) * F // npack, 256),)

    def swiglu_forward(self, out, inp, fp8_next=None):
        F = out.shape[-1]
        if inp.shape[-1] != 2 * F or inp.size != 2 * out.size:
            raise ValueError(f"swiglu: inp {inp.shape} is not [up | gate] of out {out.shape}")
        if self.fp8 is not None and self.fp8.produce("swiglu", out, inp, fp8_next):
            return  # written as the FP8 copies of fp8_next's input (cuda/fp8.py)
        n, grid = self._swiglu_sizes(inp, F)
        self.k["swiglu"].swiglu_forward(grid, (256,), (out, inp, n, np.int32(F)))

    def swiglu_backward(self, dinp, inp, dout, redo=None, fp8_next=None):
        F = dout.shape[-1]
        if inp.shape[-1] != 2 * F or inp.size != 2 * dout.size or dinp.size != inp.size:
            raise ValueError(f"swiglu: inp {inp.shape}, dinp {dinp.shape} are not [up | gate] of dout {dout.shape}")
        if redo is not None and redo.size != dout.size:
            raise ValueError(f"swiglu: redo {redo.shape} is not the shape of dout {dout.shape}")
        if redo is None and self.fp8 is not None and self.fp8.produce_grad(dinp, inp, dout, fp8_next):
            return  # written as the FP8 copies of fp8_next's output gradient (cuda/fp8.py)
        n, grid = self._swiglu_sizes(inp, F)
        redo = redo if redo is not None else np.uint64(0)  # null: no recompute
        self.k["swiglu"].swiglu_backward(grid, (256,), (dinp, inp, dout, redo, n, np.int32(F)))

    def _fp8_new(self, weights, rows: int, head_rows: int):  # --dtype fp8's products (Fp8Ops), FP8 tensor cores
        from .fp8 import CudaFp8
        return CudaFp8(self, weights, rows, head_rows)

    def matmul_forward(self, out, inp, w, b, gelu_pre=None, fp8_next=None):
        OC, K = w.shape
        M = inp.size // K
        i = self._fp8_slot(w)
        if i is not None:
            self.fp8.forward(out, inp, b, gelu_pre, i, fp8_next)
        elif gelu_pre is None:
            self.gemm.mm(out, inp, w, M, OC, K, transy=True, bias=b)
        else:  # out = gelu(inp @ w.T + b), gelu_pre = inp @ w.T + b  (cuBLASLt GELU_AUX_BIAS epilogue)
            self.gemm.mm(out, inp, w, M, OC, K, transy=True, bias=b, epilogue="gelu", aux=gelu_pre)

    def matmul_backward(self, dinp, dw, db, dout, inp, w, gelu_pre=None, gelu_db=None, gelu_redo=False,
                        db_sums=None):
        OC, K = w.shape
        M = dout.size // OC
        if db_sums is not None and db is None:
            raise ValueError("db_sums needs db")
        if db is not None and db_sums is None and self.fp8 is not None and self.fp8.dout_unwritten(dout):
            raise ValueError("matmul_backward: dout was written only as FP8 copies (fp8_next): no column sums for db")
        if gelu_db is not None and (gelu_pre is None or dinp is None):
            raise ValueError("gelu_db needs gelu_pre and dinp")
        if gelu_redo and (gelu_pre is None or inp is None):
            raise ValueError("gelu_redo needs gelu_pre and inp")
        if gelu_redo and gelu_db is None:  # no fused kernel on this path: the recompute runs first
            self.gelu_forward(inp, gelu_pre)
        i = self._fp8_slot(w)
        if dinp is not None:  # dinp = dout @ w, then times gelu'(gelu_pre) in place (+ its column sums: gelu_db)
            if i is None:
                self.gemm.mm(dinp, dout, w, M, K, OC)
            else:
                self.fp8.backward_dinp(dinp, dout, i, dw_follows=dw is not None)
            if gelu_db is not None:
                chunks = cdiv(M, _CHUNK_ROWS)
                self._check_colsum(chunks, K)
                redo = inp if gelu_redo else np.uint64(0)  # the recomputed GELU output, written by the same kernel
                self.k["gelu"].gelu_backward_colsum(self._colsum_grid(dinp, K, chunks), (32 * _COLSUM_WARPS,),
                                                    (self.colsum_part, dinp, gelu_pre, redo, np.int32(M), np.int32(K),
                                                     np.int32(_CHUNK_ROWS)))
                self.k["matmul"].colsum_finalize((cdiv(K, 128),), (128,), (gelu_db, self.colsum_part,
                                                                          np.int32(chunks), np.int32(K), np.int32(K),
                                                                          np.int32(not self._first_write(gelu_db))))
            elif gelu_pre is not None:
                n = dinp.size
                self.k["gelu"].gelu_backward_inplace((cdiv(n // (16 // dinp.itemsize), 256),), (256,),
                                                     (dinp, gelu_pre, np.int64(n)))
        # dw += dout^T @ inp (=, beta 0, when dw counts as zero). (cuBLASLt's BGRADB epilogue, the bias gradient
        # formed by this product, was slower than the product and our column sums: d48's qkv 0.2088 vs 0.1905 ms on
        # an H200, 2026-11-30; docs/performance.md)
        if dw is not None and i is None:
            self.gemm.mm(dw, dout, inp, OC, K, M, transx=True, accumulate=not self._first_write(dw))
        elif dw is not None:
            self.fp8.backward_dw(dw, dout, inp, i, accumulate=not self._first_write(dw))
        if db_sums is not None:  # the partials a norm backward formed over this dout (layernorm_backward)
            nb = take_sums(db_sums, self._sums_serial, OC).data
            self.k["matmul"].colsum_finalize8((cdiv(OC, 32),), (32, 8), (db, self.sum_part, np.int32(nb),
                                                                        np.int32(OC), np.int32(OC),
                                                                        np.int32(not self._first_write(db))))
        elif db is not None:
            self._colsum_add(db, dout, M, OC)

    def _colsum_add(self, out, x, rows, C):
        chunks = cdiv(rows, _CHUNK_ROWS)
        self._check_colsum(chunks, C)
        e = self.k["matmul"]
        e.colsum_partial(self._colsum_grid(x, C, chunks), (32 * _COLSUM_WARPS,),
                         (self.colsum_part, x, np.int32(rows), np.int32(C), np.int32(_CHUNK_ROWS)))
        e.colsum_finalize((cdiv(C, 128),), (128,), (out, self.colsum_part, np.int32(chunks), np.int32(C), np.int32(C),
                                                     np.int32(not self._first_write(out))))

    @staticmethod
    def _colsum_grid(x, C, chunks):
        """The grid of a colsum_slab kernel (common.cuh) over rows of C elements of x: 16-byte packs of columns."""
        npack = 16 // x.itemsize
        if C % npack or x.data.ptr % 16:
            raise ValueError(f"column sums need rows of a multiple of {npack} elements, 16-byte aligned (got {C})")
        return (cdiv(C // npack, 32), chunks)

    def _check_colsum(self, chunks, width):
        # host-side only (nothing on a graph replay): a bias wider than OpShapes.bias_widths would overrun the buffer
        if chunks * width > self.colsum_part.size:
            raise ValueError(f"column sum of {chunks} x {width} partials exceeds the planned workspace "
                             f"({self.colsum_part.size}): list every bias width in OpShapes.bias_widths")

    # the MatMul-free LM's ops: mmfree.py
    def bitlinear_forward(self, out, rstd, inp, w, gamma, eps, w_rows=None):
        self.mmfree.bitlinear_forward(out, rstd, inp, w, gamma, eps, w_rows)

    def bitlinear_backward(self, dinp, dw, dgamma, dout, inp, w, gamma, rstd, w_rows=None):
        self._zero_if_fresh(dw, dgamma)
        self.mmfree.bitlinear_backward(dinp, dw, dgamma, dout, inp, w, gamma, rstd, w_rows)

    def bitlinear_packed_forward(self, out, rstd, inp, codes, scale, K, packing, gamma, eps):
        self.mmfree.bitlinear_packed_forward(out, rstd, inp, codes, scale, K, packing, gamma, eps)

    def bitlinear_packed_forward3(self, outs, rstd, inp, codes, scales, K, packing, gammas, eps):
        self.mmfree.bitlinear_packed_forward3(outs, rstd, inp, codes, scales, K, packing, gammas, eps)

    def bitlinear_packed_swiglu_forward(self, out, rstd, inp, codes, scale, K, packing, gamma, eps):
        self.mmfree.bitlinear_packed_swiglu_forward(out, rstd, inp, codes, scale, K, packing, gamma, eps)

    def mlgru_forward(self, o, h, rstd, ai, af, ag, lam, gamma, h0, eps):
        self.mmfree.mlgru_forward(o, h, rstd, ai, af, ag, lam, gamma, h0, eps)

    def mlgru_backward(self, dai, daf, dag, dlam, dgamma, do, ai, af, ag, lam, gamma, h, rstd):
        self._zero_if_fresh(dlam, dgamma)
        self.mmfree.mlgru_backward(dai, daf, dag, dlam, dgamma, do, ai, af, ag, lam, gamma, h, rstd)

    def lower_bounds_forward(self, lam, P):
        self.mmfree.lower_bounds_forward(lam, P)

    def lower_bounds_backward(self, dP, dlam, P):
        self._zero_if_fresh(dP)
        self.mmfree.lower_bounds_backward(dP, dlam, P)

    def gelu_forward(self, out, inp):
        n, npack = inp.size, 16 // inp.itemsize
        if inp.data.ptr % 16 or out.data.ptr % 16:
            raise ValueError("gelu_forward needs 16-byte aligned arrays")
        self.k["gelu"].gelu_forward((cdiv(n // npack + n % npack, 256),), (256,), (out, inp, np.int64(n)))

    def attention_forward(self, out, state, qkv, num_heads: int, kv_heads: int | None = None):
        self._attention_for(out, qkv, num_heads, kv_heads).forward(out, state, qkv)

    def attention_backward(self, dqkv, dout, qkv, state, num_heads: int, out=None, kv_heads: int | None = None):
        self._attention_for(dout, qkv, num_heads, kv_heads).backward(dqkv, dout, qkv, state, out)

    def attention_decode(self, out, qkv, k_cache, v_cache, pos: int, num_heads: int,
                         kv_heads: int | None = None) -> None:
        """One new position per sequence (inference, eager): qkv (B, 1, (NH + 2K) hs) = the new q | k | v; k, v go
        into k_cache, v_cache (B, K, maxT, hs) at pos; out (B, 1, C) = softmax(q k^T / sqrt(hs)) v over 0..pos,
        query head h reading kv head h // (NH/K)."""
        B, K, maxT, hs = k_cache.shape
        NH = num_heads
        C = NH * hs
        if (K != (kv_heads or NH) or NH % K or v_cache.shape != k_cache.shape
                or qkv.shape != (B, 1, (NH + 2 * K) * hs) or out.shape != (B, 1, C)):
            raise ValueError(f"attention_decode: out {out.shape}, qkv {qkv.shape}, caches {k_cache.shape} "
                             f"{v_cache.shape}, num_heads {num_heads}, kv_heads {kv_heads}")
        if any(x.dtype != self.act_dtype or not x.flags.c_contiguous for x in (out, qkv, k_cache, v_cache)):
            raise TypeError(f"attention_decode needs contiguous {self.act_dtype} arrays")
        if not 0 <= pos < maxT:
            raise ValueError(f"attention_decode: pos {pos} outside the cache's {maxT} positions")
        npack = 16 // k_cache.itemsize  # elements per 16-byte load along a cache row
        if hs % npack or hs // npack > _DECODE_THREADS or k_cache.data.ptr % 16 or v_cache.data.ptr % 16:
            raise ValueError(f"attention_decode needs 16-byte aligned cache rows of <= {_DECODE_THREADS} loads "
                             f"(head size {hs})")
        key = (B, NH, maxT)
        if key not in self._decode_scores:
            self._decode_scores[key] = self.zeros(B * NH * maxT, np.float32)
        groups = _DECODE_THREADS // (hs // npack)
        e = self.k["attention"]
        if K != NH:  # the query heads of a group share the new cache row: write it in a launch of its own first
            e.decode_kv_write((cdiv(B * K * hs, 256),), (256,), (k_cache, v_cache, qkv, np.int32(B), np.int32(NH),
                                                                 np.int32(K), np.int32(maxT), np.int32(hs),
                                                                 np.int32(pos)))
        e.attention_decode(
            (B * NH,), (_DECODE_THREADS,), (out, k_cache, v_cache, self._decode_scores[key], qkv, np.int32(NH),
                                            np.int32(K), np.int32(maxT), np.int32(hs), np.int32(pos),
                                            np.float32(1 / math.sqrt(hs))),
            shared_mem=4 * hs * (1 + groups))

    def kv_cache_write(self, k_cache, v_cache, qkv, pos: int, num_heads: int, kv_heads: int | None = None) -> None:
        """A decoding prefill's keys and values, qkv (B, n, (NH + 2K) hs) (a strided view), into the caches (B, K,
        capacity, hs) at pos..pos+n-1: CuPy strided copies of the bits (integers: CuPy has no bf16 arithmetic).
        Untested on a GPU."""
        B, K, cap, hs = k_cache.shape
        NH, n = num_heads, qkv.shape[1]
        if (K != (kv_heads or NH) or NH % K or v_cache.shape != k_cache.shape or qkv.shape != (B, n, (NH + 2 * K) * hs)
                or not 0 <= pos <= cap - n or qkv.dtype != k_cache.dtype or v_cache.dtype != k_cache.dtype):
            raise ValueError(f"kv_cache_write: qkv {qkv.shape} {qkv.dtype}, caches {k_cache.shape} {v_cache.shape}, "
                             f"pos {pos}, num_heads {num_heads}, kv_heads {kv_heads}")
        bits = np.dtype(f"u{k_cache.itemsize}")
        x = qkv.view(bits)
        for cache, first in ((k_cache, NH), (v_cache, NH + K)):
            part = x[:, :, first * hs:(first + K) * hs].reshape(B, n, K, hs).transpose(0, 2, 1, 3)
            cache.view(bits)[:, :, pos:pos + n] = part

    def fused_classifier(self, losses, logits, targets, vocab_size, dloss=None, fp8_next=None):
        Vp = logits.shape[-1]
        rows = logits.size // Vp
        # --dtype fp8 with the LM head registered: the head's fixed D scale set; with the fused copies the kernel
        # forms only the losses and row stats, and fp8_classifier_t writes dlogits as the head's Dq and DqT
        j = None if self.fp8 is None else self.fp8.head_target(fp8_next, dloss)
        stats = None if j is None else self.fp8.row_stats(rows)
        self.k["classifier"].fused_classifier((rows,), (1024,), (logits, losses, targets,
                                                                 np.float32(dloss or 0.0), np.int32(vocab_size),
                                                                 np.int32(Vp),
                                                                 np.int32(dloss is not None and stats is None),
                                                                 np.uint64(0) if stats is None else stats))
        if stats is not None:
            self.fp8.head_grad(logits, targets, dloss, vocab_size, j)

    def loss_accumulate(self, acc, losses, scale):
        self.k["classifier"].loss_accumulate((1,), (1024,), (acc, losses, np.int32(losses.size), np.float32(scale)))

    def mean_loss(self, losses) -> float:
        return float(self.to_numpy(losses).astype(np.float64).sum()) / losses.size

    # ---- optimizer ------------------------------------------------------------------------------------------
    def grad_sumsq(self, out, flat):
        """out[0] = sum of squares of flat, deterministic (fixed grid, fixed order; 16-byte loads)."""
        if flat.data.ptr % 16:
            raise ValueError("grad_sumsq needs a 16-byte aligned buffer")
        e = self.k["adamw"]
        e.sumsq_partial((_NORM_BLOCKS,), (512,), (self.norm_part, flat, np.int64(flat.size)))
        e.sum_partials((1,), (1024,), (out, self.norm_part, np.int32(_NORM_BLOCKS)))

    def norm_from_sumsq(self, out, sumsq, guard):
        """out[0] = sqrt(sumsq[0]), NaN when guard[0] (the step's loss) is not finite."""
        self.k["adamw"].norm_from_sumsq((1,), (1,), (out, sumsq, guard))

    def adamw(self, p, master, g, m, v, hp, norm, weight_decay, offset):
        """AdamW over one run (flat views); m and v fp32, or bf16 (stochastically rounded). Eight elements per
        thread, in 16-byte loads where every pointer allows it."""
        n = p.size
        bf16_moments = m.dtype != np.float32
        if v.dtype != m.dtype:
            raise ValueError("AdamW's moments must share a dtype")
        ptrs = [a.data.ptr for a in (p, g, m, v) + (() if master is None else (master,))]
        vec = int(all(x % 16 == 0 for x in ptrs))
        fn = self.k["adamw"].adamw_bf16_moments if bf16_moments else self.k["adamw"].adamw
        fn((cdiv(n, 8 * 256),), (256,), (p, master if master is not None else np.uint64(0), g, m, v, np.int64(n), hp,
                                         norm, np.float32(weight_decay), np.int64(offset), np.int32(vec)))

    # ---- CUDA graphs ----------------------------------------------------------------------------------------
    def capture(self, fn):
        """Records fn's launches into a CUDA graph (nothing runs now); returns a function that replays it. The graph
        keeps the addresses it was recorded with, so fn must not free what it allocates: a temporary's memory goes
        back to the pool, the next allocation takes it, and every replay writes into that. With
        LLMPY_CHECK_CAPTURE=1 (the test suite sets it) such a capture raises."""
        s = self.stream
        watch = _AllocationWatch(self.cp.get_default_memory_pool()) if os.environ.get("LLMPY_CHECK_CAPTURE") == "1" \
            else None
        self.capturing = True
        try:
            s.begin_capture()
            try:
                with self.cp.cuda.using_allocator(watch) if watch else contextlib.nullcontext():
                    fn()
            finally:
                graph = s.end_capture()
        finally:
            self.capturing = False
        if watch is not None:
            watch.check()
        return lambda: graph.launch(stream=s)


class _AllocationWatch:
    """An allocator for a graph capture: takes from `pool` and holds each allocation's memory object until check(),
    which raises if the watch is all that still holds one, i.e. its array was dropped inside the capture (a
    temporary of a captured op) and the pool would hand it out again while every replay writes it. Memory that the
    capture did not allocate (an old model collected meanwhile, say) is not counted."""

    def __init__(self, pool):
        self.pool, self.mems = pool, []

    def __call__(self, n):
        m = self.pool.malloc(n)
        self.mems.append(m.mem)  # the pointer's memory: freed when its last holder goes
        return m

    def check(self) -> None:
        mems, self.mems = self.mems, []
        # 2 references: the list's and getrefcount's argument; a live array holds a third through its pointer
        lost = [i for i in range(len(mems)) if sys.getrefcount(mems[i]) <= 2]
        nbytes = sum(mems[i].size for i in lost)
        del mems  # the lost memory goes back to the pool here
        if lost:
            raise RuntimeError(f"a CUDA graph capture dropped {len(lost)} of its allocations ({nbytes} bytes) before "
                               "it ended: the replays would write memory the pool hands out again (a temporary in a "
                               "captured op)")


class _Slot:
    def __init__(self, cp, n):
        def pinned(count):
            mem = cp.cuda.alloc_pinned_memory(4 * count)
            return np.frombuffer(mem, np.int32, count)
        self.tok, self.order, self.seg, self.nseg = pinned(n), pinned(n), pinned(n + 1), pinned(1)
        self.done = cp.cuda.Event(disable_timing=True)
        self.done.record()


class _Staging:
    """A ring of pinned host buffers for uploads; a slot is reused only after its last copy has run."""

    def __init__(self, cp, n, slots=8):
        self.n, self.slots, self.i = n, [_Slot(cp, n) for _ in range(slots)], 0

    def take(self, n):
        if n > self.n:
            raise ValueError(f"upload of {n} tokens exceeds the planned {self.n}")
        slot = self.slots[self.i]
        self.i = (self.i + 1) % len(self.slots)
        slot.done.synchronize()
        return slot


class _Readback:
    def __init__(self, be, arrays):
        cp = be.cp
        self.host = []
        for a in arrays:
            mem = cp.cuda.alloc_pinned_memory(a.nbytes)
            h = np.frombuffer(mem, a.dtype, a.size).reshape(a.shape)
            cp.cuda.runtime.memcpyAsync(h.ctypes.data, a.data.ptr, a.nbytes, cp.cuda.runtime.memcpyDeviceToHost,
                                        be.stream.ptr)
            self.host.append(h)
        self.event = cp.cuda.Event(disable_timing=True)
        self.event.record(be.stream)

    def result(self) -> list[np.ndarray]:
        self.event.synchronize()
        return [h.copy() for h in self.host]


def _round32(n: int) -> int:
    return (n + 31) // 32 * 32


def _check_heads(heads: int, kv_heads: int) -> None:
    if kv_heads < 1 or heads % kv_heads:
        raise UserError(f"{heads} query heads do not divide into {kv_heads} key/value heads")
