"""--dtype fp8 on the GPU: the registered block products on Hopper's FP8 tensor cores (cuBLASLt, fp32 accumulation,
bf16 out) with the quantizing kernels of kernels/fp8.cu; the recipe is layers/fp8.py's, the bookkeeping
backends/fp8.py's.

cuBLASLt's FP8 products take both operands K-contiguous, so each product needs its operands in two layouts:
forward  out (N, OC) = Xq (N, K) . Wq (OC, K)^T
dX       dX (N, K)   = Dq (N, OC) . WqT (K, OC)^T
dW       dW (OC, K) (+)= DqT (OC, N) . XqT (K, N)^T
The weights' two copies (Wq, WqT) are made once per step, after AdamW, from one read. X is quantized into both
layouts in the forward, from one read: Xq into scratch buffer A, XqT into the product's own slot of `xqT`, kept for
the backward's dW (what the backward would quantize again: the same tensor under the same scale). Where the model
names the product that reads a GELU's or SwiGLU's output (`fp8_next`), that producer writes Xq, XqT and the amax
itself (kernels/fp8.cu fp8_gelu_t, fp8_swiglu_t) and not its bf16 output, which nobody reads then; a norm's output
likewise, Xq and the amax from the norm's row kernel (rmsnorm_forward_fp8, layernorm_forward_fp8), XqT by a byte
transpose of Xq (fp8_transpose: a row kernel cannot write the transposed layout coalesced); the calibrating
step (no history, so no scale before the tensor exists) keeps the separate pass. dY is quantized where the backward
reads it, Dq into buffer C with DqT into A from one read, or by its producer: SwiGLU's backward writes the gate/up
product's Dq and DqT (fp8_swiglu_backward_t) and not its bf16 gradient; the classifier the LM head's (it forms the
losses and each row's max and sum, fp8_classifier_t the dlogits' Dq and DqT under the head's fixed scale).
"""
from __future__ import annotations

import numpy as np

from ...errors import UserError
from ...layers import fp8 as F
from ..fp8 import Fp8Products
from .runtime import cdiv, module

_THREADS = 256


class CudaFp8(Fp8Products):
    def __init__(self, be, weights, rows: int, head_rows: int = 0):
        # weights: the block products' (run on `rows` rows), then the LM head's where head_rows > 0 (a chunk of rows)
        super().__init__(be, weights, head=head_rows > 0)
        # the producers write the FP8 copies and XqT is kept (the backend's fp8_fused, fixed before a model plans its
        # buffers by it); False: the separate passes, which the tests compare with
        self.fused = be.fp8_fused
        cp = be.cp
        P = len(self.weights)
        # the dequantizing factors 1 / scale that cuBLASLt reads through its scale pointers, one 16-byte slot each
        # (a pointer into a packed fp32 array is refused when the product runs: CUBLAS_STATUS_NOT_SUPPORTED)
        self.inv = be.zeros(P * 3 * 4, np.float32).reshape(P, 3, 4)
        self.inv[...] = 1.0
        self._cal = be.zeros(1, np.float32)  # a calibrating quantization's own amax
        self._discard = be.zeros(1, np.float32)  # the pending amax of an operand whose scale is fixed (not kept)
        bad = [w.shape for w in self.weights if w.shape[0] % 16 or w.shape[1] % 16]
        if rows % 16 or head_rows % 16 or bad:
            raise UserError(f"--dtype fp8 needs B*T, the logits chunk and every product's sizes divisible by 16 (B*T "
                            f"= {rows}" + (f", chunk {head_rows}" if head_rows else "")
                            + (f"; weights {bad[0]}" if bad else "") + ")")
        # each product's most rows: the LM head's a chunk's
        self.rows = [rows] * P
        if self.head is not None:
            self.rows[self.head] = head_rows
        self.k = module("fp8", be.dtype_name)
        self._blocks = 4 * cp.cuda.Device().attributes["MultiProcessorCount"]  # the grid of the grid-stride kernels
        sizes = [int(np.prod(w.shape)) for w in self.weights]
        self._wbuf = cp.zeros(2 * sum(sizes) + 16 * len(sizes), dtype=cp.uint8)  # Wq and WqT of every weight
        self.wq, self.wqT, o = [], [], 0
        for w, n in zip(self.weights, sizes):
            self.wq.append(self._wbuf[o:o + n].reshape(w.shape))
            self.wqT.append(self._wbuf[o + n:o + 2 * n].reshape(w.shape[::-1]))
            o += 2 * n
        self.buf_a = cp.zeros(max(n * max(w.shape) for n, w in zip(self.rows, self.weights)), dtype=cp.uint8)
        self.buf_c = cp.zeros(max(n * w.shape[0] for n, w in zip(self.rows, self.weights)), dtype=cp.uint8)
        # XqT (K, rows) of every product, from its last forward, for its dW (1 byte an element of the inputs);
        # without `fused` the backward quantizes XqT again right before its dW, so one scratch serves every product
        xs = [n * w.shape[1] for n, w in zip(self.rows, self.weights)]
        if self.fused:
            self._xbuf = cp.zeros(sum(xs), dtype=cp.uint8)
            offs = np.cumsum([0] + xs)
            self.xqT = [self._xbuf[offs[j]:offs[j + 1]] for j in range(P)]
        else:
            self._xbuf = cp.zeros(max(xs), dtype=cp.uint8)
            self.xqT = [self._xbuf[:n] for n in xs]
        # the classifier's per-row (max, 1 / sum exp) for the LM head's fused output gradient (head_grad)
        self._row_stats = be.zeros(2 * (head_rows or 1), np.float32)
        self._x_of = [None] * P   # the address of the tensor each xqT holds (its last forward's input)
        self._xq_ready = None     # (product, address): a producer has just written that product's Xq (A) and XqT
        self._dq_ready = None     # (product, address): a producer has just written its Dq (C) and DqT (A)
        self.nbytes = (self._wbuf.nbytes + self.buf_a.nbytes + self._xbuf.nbytes + self.buf_c.nbytes
                       + 4 * self.hist.size + self._row_stats.nbytes)

    # ---- one scalar of the state as a one-element array (a kernel argument, a cuBLASLt scale pointer) ----------
    def _at(self, a, i: int, role: int):
        k = (3 * i + role) * (a.size // (3 * a.shape[0]))  # (inv holds 4 floats a slot)
        return a.reshape(-1)[k:k + 1]

    def _pending(self, i: int, role: int):
        """Where a quantization of product i's operand `role` records its amax: nowhere that counts for a fixed
        scale."""
        return self._discard if self.fixed(i, role) else self._at(self.pending, i, role)

    def _launch_grid(self, n: int) -> tuple[int]:
        return (max(1, min(cdiv(n // 8, _THREADS), self._blocks)),)

    def _calibrate(self, x, n: int, i: int, role: int) -> None:
        """The calibrating step: the operand's scale from its own amax (pending takes the amax too); a fixed scale
        stays."""
        if self.fixed(i, role):
            return
        self.be.fill_zero(self._cal)
        self.k.fp8_amax(self._launch_grid(n), (_THREADS,), (self._cal, x, np.int64(n)))
        self.k.fp8_calibrate((1,), (1,), (self._at(self.scale, i, role), self._at(self.inv, i, role),
                                          self._at(self.pending, i, role), self._cal, np.int32(role == F.D)))

    def quantize(self, q, x, i: int, role: int, count: bool = True) -> None:
        """q (x.size bytes) = x quantized as product i's operand `role`."""
        n = x.size
        if self.calibrate:
            self._calibrate(x, n, i, role)
        clamped = self.overflows if count else np.uint64(0)
        self.k.fp8_quantize(self._launch_grid(n), (_THREADS,), (q, x, np.int64(n), self._at(self.scale, i, role),
                                                                 self._pending(i, role), clamped,
                                                                 np.int32(role == F.D)))

    def quantize_t(self, qT, x, rows: int, cols: int, i: int, role: int, q=None) -> None:
        """qT (cols, rows) = x (rows, cols) quantized and transposed (scale already set: not calibrated again); q:
        also x quantized in its own layout, from the same read (its clamped values counted)."""
        null = np.uint64(0)
        self.k.fp8_quantize_t((cdiv(cols, 64), cdiv(rows, 64)), (_THREADS,),
                              (qT, null if q is None else q, x, np.int32(rows), np.int32(cols),
                               self._at(self.scale, i, role), self._pending(i, role),
                               null if q is None else self.overflows, np.int32(role == F.D)))

    # ---- the step's bookkeeping -----------------------------------------------------------------------------
    def begin_step(self) -> None:
        n = self.pending.shape[0]
        self.k.fp8_begin((cdiv(n, _THREADS),), (_THREADS,), (self.pending, self.overflows, np.int32(n)))

    def end_step(self) -> None:
        n = self.hist.shape[0] * 3
        self.k.fp8_fold((cdiv(n, _THREADS),), (_THREADS,), (self.hist, self.pending, self.scale, self.inv,
                                                             np.int32(n), np.int32(F.HISTORY)))
        self.calibrate = False
        self.quantize_weights()

    def quantize_weights(self) -> None:
        for i, w in enumerate(self.weights):  # Wq and WqT from one read of W
            OC, K = w.shape
            if self.calibrate:
                self._calibrate(w, OC * K, i, F.W)
            self.quantize_t(self.wqT[i], w, OC, K, i, F.W, q=self.wq[i])

    def load_state(self, state: dict) -> None:
        super().load_state(state)  # the scales, then the weights quantized with them
        host = np.asarray(self.be.to_numpy(self.scale), np.float32)
        self.be.upload(self.inv, np.repeat((1.0 / host)[..., None], 4, axis=-1).astype(np.float32))

    # ---- the products ---------------------------------------------------------------------------------------
    def forward(self, out, inp, b, gelu_pre, i: int, fp8_next=None) -> None:
        """out (M, OC) = inp (M, K) @ W^T (+ b): Xq (A) and XqT (kept for dW) from one read of inp, unless the
        producer of inp has just written them. gelu_pre: the product goes there and out = gelu(gelu_pre), written
        as the FP8 copies of product fp8_next's input where that weight is registered (see produce)."""
        be, w = self.be, self.weights[i]
        OC, K = w.shape
        M = inp.size // K
        xq = self.buf_a[:M * K]
        if not self.fused or M % 16:
            # the separate pass of Xq alone, the backward quantizing XqT again (the tiles take multiples of 16 rows,
            # as a training batch's B*T is)
            self.quantize(xq, inp, i, F.X)
            self._x_of[i] = None
        elif self._xq_ready != (i, inp.data.ptr):
            if self.calibrate:
                self._calibrate(inp, M * K, i, F.X)
            self.quantize_t(self.xqT[i][:K * M], inp, M, K, i, F.X, q=xq)
            self._x_of[i] = inp.data.ptr
        self._xq_ready = self._dq_ready = None
        x_inv, w_inv = self._at(self.inv, i, F.X), self._at(self.inv, i, F.W)
        if gelu_pre is None:
            be.gemm.mm_fp8(out, xq, self.wq[i], M, OC, K, x_inv, w_inv, bias=b)
            return
        # the product, then our GELU kernel: the one the backward's recompute runs (cuBLASLt's FP8 GELU epilogue
        # rounds differently, and --recompute must not change the numbers)
        be.gemm.mm_fp8(gelu_pre, xq, self.wq[i], M, OC, K, x_inv, w_inv, bias=b)  # the product, then our GELU
        if not self.produce("gelu", out, gelu_pre, fp8_next):
            be.gelu_forward(out, gelu_pre)

    def _target(self, fp8_next) -> int | None:
        """The product whose FP8 copies a producer may write in place of its output: fp8_next's, where that weight
        is registered, the step is not calibrating (the scale comes from the finished tensor) and `fused` is on."""
        j = self.slot(fp8_next) if fp8_next is not None else None
        return None if self.calibrate or not self.fused else j

    def _x_written(self, j: int, out) -> None:
        """A producer has just written product j's Xq (A) and XqT for its input `out`: its forward and dW use them."""
        self._x_of[j] = out.data.ptr
        self._xq_ready, self._dq_ready = (j, out.data.ptr), None

    def produce(self, kind: str, out, inp, fp8_next) -> bool:
        """out = gelu(inp) ("gelu", same shapes) or swiglu(inp) ("swiglu", inp (M, 2F), out (M, F)) written
        straight as the FP8 copies (Xq into A, XqT into its slot) and amax of the input of fp8_next's product, the
        next registered product to run; out itself is not written (the product and its dW read the copies).
        False, having done nothing, where fp8_next is not a registered weight, while calibrating (the scale comes
        from the finished tensor) or without `fused`: then the caller runs its own kernel."""
        j = self._target(fp8_next)
        if j is None:
            return False
        K = self.weights[j].shape[1]
        if out.shape[-1] != K or inp.size != out.size * (2 if kind == "swiglu" else 1):
            raise ValueError(f"fp8_next: {kind} of inp {inp.shape} into out {out.shape} is not the input of a "
                             f"{self.weights[j].shape} product")
        M = out.size // K
        if M % 16:  # (the tiles take multiples of 16 rows)
            return False
        fn = self.k.fp8_gelu_t if kind == "gelu" else self.k.fp8_swiglu_t
        fn((cdiv(K, 64), cdiv(M, 64)), (_THREADS,), (self.xqT[j], self.buf_a, np.uint64(0), inp, np.int32(M),
                                                     np.int32(K), self._at(self.scale, j, F.X),
                                                     self._at(self.pending, j, F.X), self.overflows))
        self._x_written(j, out)
        return True

    def norm_target(self, out, fp8_next) -> int | None:
        """The product (fp8_next's) whose input out, a norm's output, is written as only (the norm kernel writes
        Xq into A with the amax, norm_args; then norm_written); None, as produce's False, where it is not."""
        j = self._target(fp8_next)
        if j is None:
            return None
        if out.shape[-1] != self.weights[j].shape[1]:
            raise ValueError(f"fp8_next: a norm's output {out.shape} is not the input of a {self.weights[j].shape} "
                             "product")
        return None if (out.size // out.shape[-1]) % 16 else j  # (the transpose's tiles take multiples of 16 rows)

    def norm_args(self, j: int) -> tuple:
        """The fused norm kernel's last arguments: product j's X scale, its pending amax, the clamp count."""
        return self._at(self.scale, j, F.X), self._at(self.pending, j, F.X), self.overflows

    def norm_written(self, j: int, out) -> None:
        """After the fused norm kernel: XqT from its Xq (a byte transpose), both ready for product j."""
        K = self.weights[j].shape[1]
        M = out.size // K
        self.k.fp8_transpose((cdiv(K, 64), cdiv(M, 64)), (_THREADS,), (self.xqT[j], self.buf_a, np.int32(M),
                                                                        np.int32(K)))
        self._x_written(j, out)

    def produce_grad(self, dinp, inp, dout, fp8_next) -> bool:
        """SwiGLU's backward, dinp (M, 2F) = [dup | dgate] of inp (M, 2F) and dout (M, F), written straight as the
        Dq (C) and DqT (A) and amax of fp8_next's product, whose matmul_backward takes dinp as its dout next; dinp
        itself is not written. False, having done nothing, as produce."""
        j = self._target(fp8_next)
        if j is None:
            return False
        OC = self.weights[j].shape[0]
        Fh = OC // 2
        if dinp.shape[-1] != OC or inp.size != dinp.size or dout.size * 2 != dinp.size or Fh % 8:
            raise ValueError(f"fp8_next: swiglu_backward into dinp {dinp.shape} is not the output gradient of a "
                             f"{self.weights[j].shape} product with a hidden size divisible by 8")
        M = dinp.size // OC
        if M % 16:  # (the tiles take multiples of 16 rows)
            return False
        self.k.fp8_swiglu_backward_t((cdiv(Fh, 64), cdiv(M, 64)), (_THREADS,),
                                     (self.buf_a, self.buf_c, np.uint64(0), inp, dout, np.int32(M), np.int32(Fh),
                                      self._at(self.scale, j, F.D), self._at(self.pending, j, F.D), self.overflows))
        self._xq_ready, self._dq_ready = None, (j, dinp.data.ptr)
        return True

    def set_scale(self, i: int, role: int, s: float) -> None:
        """A fixed scale s (the LM head's D), set on the device."""
        self.k.fp8_set_scale((1,), (1,), (self._at(self.scale, i, role), self._at(self.inv, i, role), np.float32(s)))

    def head_grad(self, logits, targets, dloss: float, V: int, j: int) -> None:
        """The LM head's output gradient, the dlogits of logits (M, Vp), written as product j's Dq (C) and DqT (A)
        (fp8_classifier_t) from the row stats fused_classifier has just formed into row_stats(M) (called only
        where that is not None; elsewhere the classifier writes dlogits and the backward quantizes them under the
        same fixed scale); logits keep their values."""
        Vp = logits.shape[-1]
        M = logits.size // Vp
        self.k.fp8_classifier_t((cdiv(Vp, 64), cdiv(M, 64)), (_THREADS,),
                                (self.buf_a, self.buf_c, logits, self._row_stats, targets, np.float32(dloss),
                                 np.int32(V), np.int32(M), np.int32(Vp), self._at(self.scale, j, F.D), self._discard,
                                 self.overflows))
        self._xq_ready, self._dq_ready = None, (j, logits.data.ptr)

    def row_stats(self, rows: int):
        """fused_classifier's per-row stats output for head_grad, or None where the fused copies are off or `rows`
        is not a multiple of 16 (the tiles') or more than the chunk planned."""
        return self._row_stats if self.fused and rows % 16 == 0 and 2 * rows <= self._row_stats.size else None

    def dout_unwritten(self, dout) -> bool:
        """Whether dout is a gradient a producer has just written only as FP8 copies (produce_grad)."""
        return self._dq_ready is not None and self._dq_ready[1] == dout.data.ptr

    def backward_dinp(self, dinp, dout, i: int, dw_follows: bool) -> None:
        """dinp (M, K) = dout (M, OC) @ W. dout is quantized (e5m2) once: Dq into buffer C, and with dw_follows
        DqT too (buffer A, from the same read), for the backward_dw that comes next; unless its producer has just
        written both (produce_grad)."""
        OC, K = self.weights[i].shape
        M = dout.size // OC
        ready, self._xq_ready, self._dq_ready = self._dq_ready == (i, dout.data.ptr), None, None
        dq = self.buf_c[:M * OC]
        if not ready:  # (else its producer wrote Dq and DqT: produce_grad)
            if self.calibrate:
                self._calibrate(dout, M * OC, i, F.D)
            if dw_follows:
                self.quantize_t(self.buf_a[:OC * M], dout, M, OC, i, F.D, q=dq)
            else:
                self.quantize(dq, dout, i, F.D)
        self._dqT_of = (i, dout.data.ptr) if dw_follows else None
        self.be.gemm.mm_fp8(dinp, dq, self.wqT[i], M, K, OC, self._at(self.inv, i, F.D),
                            self._at(self.inv, i, F.W), x_e5m2=True)

    def backward_dw(self, dw, dout, inp, i: int, accumulate: bool) -> None:
        """dw (OC, K) (+)= dout^T @ inp: DqT (buffer A; quantized here unless backward_dinp did) and XqT (kept by
        the forward whose input inp was; quantized again into the product's slot otherwise, or without `fused`)."""
        OC, K = self.weights[i].shape
        M = dout.size // OC
        ready, self._xq_ready, self._dq_ready = self._dq_ready == (i, dout.data.ptr), None, None
        dqT, xqT = self.buf_a[:OC * M], self.xqT[i][:K * M]
        if getattr(self, "_dqT_of", None) != (i, dout.data.ptr) and not ready:
            if self.calibrate:
                self._calibrate(dout, M * OC, i, F.D)
            self.quantize_t(dqT, dout, M, OC, i, F.D)
        self._dqT_of = None
        if self._x_of[i] != inp.data.ptr or not self.fused:
            if self.calibrate:  # as the CPU's emulation does (the scale the forward took for the same inp)
                self._calibrate(inp, M * K, i, F.X)
            self.quantize_t(xqT, inp, M, K, i, F.X)
            self._x_of[i] = inp.data.ptr
        self.be.gemm.mm_fp8(dw, dqT, xqT, OC, K, M, self._at(self.inv, i, F.D), self._at(self.inv, i, F.X),
                            x_e5m2=True, accumulate=accumulate)
