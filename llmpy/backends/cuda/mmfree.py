"""The MatMul-free LM's ops on the GPU: BitLinear's exact quantized product and straight-through backward
(kernels/bitlinear.cu), the MLGRU recurrence and the lower bounds (kernels/mlgru.cu); the NumPy twins are
layers/bitlinear.py and layers/mlgru.py. CUDABackend's methods delegate here, one line each.

Dtypes, T = the backend's activation and parameter dtype (bf16 or fp32):
  bitlinear:    out, inp, gamma, dout, dinp, dw, dgamma T; rstd fp32; w T or fp32 (a bf16 model's fp32 master
                weights: q_w and s_w from them, as the reference quantizes its fp32 weights under autocast).
  mlgru:        o, ai, af, ag, gamma, do, dai, daf, dag, dgamma T; h, h0, rstd, lam, dlam fp32.
  lower bounds: P, dP T; lam, dlam fp32.
BitLinear's forward product: q_x and q_w in int8, multiplied by cuBLASLt on the int8 tensor cores into int32
(exact), then one rescale per output. The backward's products take T operands (dout is not an integer): q_w again
in T (exact) and yq = q_x / s_x, into fp32. Every int32 sum is below 128 K < 2^24 for K < 2^17, so its conversion
to fp32 is exact too, and the forward equals the exact product whatever the GEMM's order.

Scratch lives here rather than in plan_workspace, so models without these ops pay nothing: each buffer is allocated
on first use and grown, never shrunk, to the largest size seen, and only outside CUDA graph capture. The trainer's
first step runs eagerly and so sizes everything; a capture that needs more raises. A buffer replaced after a capture
used it is kept alive, since the captured graph still points at it.
"""
from __future__ import annotations

import functools

import numpy as np

from ...errors import UserError
from .runtime import cdiv, module

_WBLOCKS = 264       # grid of the weight scale's |W| partial sums: fixed, so the sum's order is fixed
_CHUNK_ROWS = 256    # rows per partial of dgamma's column sums
_MAX_K = 1 << 17     # |q_x q_w^T| <= 128 K must stay below 2^24 (exact in fp32)
_MAX_SMEM = 227 * 1024  # shared memory a block may opt in to on sm_90
_DECODE_THREADS = 256  # block of the packed decode kernel: a warp per output (its __launch_bounds__)
_DECODE_BLOCKS_PER_SM = 5  # its resident blocks an SM (__launch_bounds__(256, 5)): the grid's cap
_DECODE_ROWS = 4      # most rows the models route to it (the kernel takes up to 8: its registers hold 8 sums); more go
                      # through unpack + the int8 GEMM, which is faster at 8 rows (3.60 vs 4.54 ms of BitLinears a 1.3B
                      # step, slower at 4: 3.48 vs 2.30; H100, dev/mmfree_decode_kernels.py --rows)
_MD_THREADS = 512     # the persistent decode kernel's block (its __launch_bounds__(512, 1)): one block an SM
_MD_SLOTS = 3        # its ring of code slots (MD_SLOTS)
_SCAN_CHUNKS = 32    # most chunks of the MLGRU's scan over t (SCAN_MAX_CHUNKS in mlgru.cu): B d 32 threads
_SCAN_MIN_LEN = 8    # fewest steps a chunk gets (decoding, nt = 1: one chunk, the sequential scan)
F32 = np.dtype(np.float32)


class _Scratch:
    """Named device buffers that grow to the largest request, never during graph capture."""

    def __init__(self, be):
        self.be, self.bufs, self.kept, self.captured = be, {}, [], False

    def get(self, name: str, n: int, dtype):
        """The first n elements of buffer `name` (a contiguous 1-D array of dtype)."""
        n, key = int(n), (name, np.dtype(dtype).str)
        buf = self.bufs.get(key)
        if self.be.capturing:
            if buf is None or buf.size < n:
                raise RuntimeError(f"scratch {name!r} needs {n} elements inside a CUDA graph capture but holds "
                                   f"{0 if buf is None else buf.size}: run every shape eagerly once before capturing")
            self.captured = True
        elif buf is None or buf.size < n:
            if buf is not None and self.captured:
                self.kept.append(buf)  # a captured graph may still read or write it
            buf = self.bufs[key] = self.be.zeros(n, dtype)
        return buf[:n]


def _need(op: str, name: str, x, dtype, size: int, aligned: bool = True) -> None:
    """x is a contiguous array of `size` elements of dtype; aligned: 16-byte aligned too (vector loads)."""
    if x.dtype != dtype or x.size != size or not x.flags.c_contiguous or (aligned and x.data.ptr % 16):
        raise ValueError(f"{op}: {name} {tuple(x.shape)} {x.dtype} is not a contiguous{', 16-byte aligned' * aligned} "
                         f"array of {size} {np.dtype(dtype).name}")


class MMFree:
    """BitLinear, MLGRU and the lower bounds on one CUDABackend (its stream, GEMMs, capture flag) with their scratch."""

    def __init__(self, be):
        self.be = be
        self.scratch = _Scratch(be)
        self._sms = None  # the GPU's SM count (the decode kernel's grid cap), read on first use
        self.decode_fields = True  # the persistent decode kernel reads 2-bit codes by fields (base 3 transcoded)
        self._codes2 = {}          # base-3 codes' 2-bit transcriptions for it, by the source's address

    @functools.cached_property
    def kb(self):  # compiled on first use: families without these ops never build them
        return module("bitlinear", self.be.dtype_name)

    @functools.cached_property
    def km(self):
        return module("mlgru", self.be.dtype_name)

    # ---- BitLinear -------------------------------------------------------------------------------------------
    def _bitlinear_sizes(self, op, inp, w, w_rows):
        if w.ndim != 2:
            raise ValueError(f"{op}: weight {tuple(w.shape)} is not (N, K)")
        N, K = w.shape
        if K >= _MAX_K:
            raise ValueError(f"{op}: K = {K} inputs per output; the exact fp32 sums of int8 x ternary products need "
                             f"K < {_MAX_K} (|sum| <= 128 K < 2^24)")
        if K % 8 or N % 8:
            raise UserError(f"the cuda BitLinear kernels need in and out features divisible by 8 (got {K}, {N})")
        if inp.size % K or inp.size == 0:
            raise ValueError(f"{op}: input {tuple(inp.shape)} is not rows of K = {K}")
        if w_rows is not None and not 0 < w_rows <= N:
            raise ValueError(f"{op}: w_rows = {w_rows} outside 1..{N}")
        return N, K, inp.size // K

    def _weight(self, w, N, K, w_rows, int8=False):
        """(q_w (N, K), s_w (1,) fp32) of w, recomputed on every call (forward and backward see one w); q_w in int8
        (the forward's GEMM) or in T (the backward's), in one scratch either way; the mean |w| is over the leading
        w_rows rows (None: all N; the rest are an LM head's zero padding)."""
        T, s, k = self.be.act_dtype, self.scratch, self.kb
        n = N * K
        count = n if w_rows is None else w_rows * K
        qw, sw, part = s.get("bl_qw", n, T), s.get("bl_sw", 1, F32), s.get("bl_wpart", _WBLOCKS, F32)
        f32 = w.dtype == F32 and T != F32  # the fp32 master weights of a bf16 model
        (k.bitlinear_absmean_partial_f32 if f32 else k.bitlinear_absmean_partial)((_WBLOCKS,), (512,),
                                                                                  (part, w, np.int64(n)))
        k.bitlinear_weight_scale((1,), (1024,), (sw, part, np.int32(_WBLOCKS), np.int64(count)))
        if int8:
            qw = qw.view(np.int8)[:n]
            ternary = k.bitlinear_ternary_f32_i8 if f32 else k.bitlinear_ternary_i8
        else:
            ternary = k.bitlinear_ternary_f32 if f32 else k.bitlinear_ternary
        ternary((cdiv(n // _pack(w.dtype), 256),), (256,), (qw, w, sw, np.int64(n)))
        return qw, sw

    def bitlinear_forward(self, out, rstd, inp, w, gamma, eps, w_rows=None):
        op, T = "bitlinear_forward", self.be.act_dtype
        N, K, M = self._bitlinear_sizes(op, inp, w, w_rows)
        for name, x, dt, size in (("out", out, T, M * N), ("inp", inp, T, M * K), ("w", w, _wdtype(w, T), N * K),
                                  ("gamma", gamma, T, K)):
            _need(op, name, x, dt, size)
        _need(op, "rstd", rstd, F32, M, aligned=False)
        s = self.scratch
        qx, sx = s.get("bl_x", M * K, T).view(np.int8)[:M * K], s.get("bl_sx", M, F32)
        acc = s.get("bl_acc", M * N, F32).view(np.int32)
        qw, sw = self._weight(w, N, K, w_rows, int8=True)
        # q_x (M, K) int8, s_x (M,), rstd (M,) written
        self.kb.bitlinear_quantize_i8((cdiv(M, 8),), (256,), (qx, sx, rstd, inp, gamma, np.float32(eps), np.int32(M),
                                                               np.int32(K)))
        self.be.gemm.mm_int8(acc, qx, qw, M, N, K)  # acc (M, N) int32 = q_x q_w^T on the int8 tensor cores, exact
        self.kb.bitlinear_rescale_i32((cdiv(M * N // _pack(T), 256),), (256,), (out, acc, sx, sw, np.int32(M),
                                                                                 np.int32(N)))

    def bitlinear_backward(self, dinp, dw, dgamma, dout, inp, w, gamma, rstd, w_rows=None):
        op, T = "bitlinear_backward", self.be.act_dtype
        N, K, M = self._bitlinear_sizes(op, inp, w, w_rows)
        for name, x, dt, size in (("dinp", dinp, T, M * K), ("dw", dw, T, N * K), ("dout", dout, T, M * N),
                                  ("inp", inp, T, M * K), ("w", w, _wdtype(w, T), N * K), ("gamma", gamma, T, K)):
            _need(op, name, x, dt, size)
        _need(op, "dgamma", dgamma, T, K, aligned=False)
        _need(op, "rstd", rstd, F32, M, aligned=False)
        chunks = cdiv(M, _CHUNK_ROWS)
        s, k = self.scratch, self.kb
        yq, sx, graw = s.get("bl_x", M * K, T), s.get("bl_sx", M, F32), s.get("bl_acc", M * K, F32)
        part = s.get("bl_gpart", chunks * K, F32)
        qw, sw = self._weight(w, N, K, w_rows)
        # yq = q_x / s_x (M, K) in T, recomputed from inp with the saved rstd (eps unused)
        k.bitlinear_quantize((cdiv(M, 8),), (256,), (yq, sx, rstd, inp, gamma, np.float32(0.0), np.int32(1),
                                                     np.int32(1), np.int32(M), np.int32(K)))
        self.be.gemm.mm(dw, dout, yq, N, K, M, transx=True, accumulate=True)  # dw (N, K) += dout^T yq
        self.be.gemm.mm(graw, dout, qw, M, K, N, out_fp32=True)               # graw (M, K) = dout q_w = s_w dyq
        k.bitlinear_backward_dinp((cdiv(M, 8),), (256,), (dinp, graw, inp, gamma, rstd, sw, np.int32(M),
                                                          np.int32(K)))
        k.bitlinear_backward_dgamma_partial((cdiv(K, 128), chunks), (128,), (part, graw, inp, rstd, sw, np.int32(M),
                                                                            np.int32(K), np.int32(_CHUNK_ROWS)))
        k.bitlinear_backward_dgamma_finalize((cdiv(K, 128),), (128,), (dgamma, part, np.int32(chunks), np.int32(K)))

    def bitlinear_packed_forward(self, out, rstd, inp, codes, scale, K, packing, gamma, eps):
        """Packed inference: for up to _DECODE_ROWS rows (decoding) one kernel, bitlinear_packed_decode, quantizes
        the rows as bitlinear_forward does and reads the codes as they are (int8 dot products of q_x with each code
        byte's trits, int32 sums); else q_x as in bitlinear_forward, the codes unpacked into int8 and the same exact
        GEMM and rescale as the latent path. Both give the same out, rstd and s_x bit for bit."""
        op, T = "bitlinear_packed_forward", self.be.act_dtype
        N, nb = codes.shape
        per = {"base3": 5, "2bit": 4}[packing]
        if nb != -(-K // per) or codes.dtype != np.uint8 or not codes.flags.c_contiguous:
            raise ValueError(f"{op}: codes {tuple(codes.shape)} {codes.dtype} are not contiguous uint8 rows of "
                             f"ceil({K} / {per}) bytes")
        if K % 8 or N % 8 or K >= _MAX_K:
            raise UserError(f"the cuda BitLinear kernels need in and out features divisible by 8 (got {K}, {N})")
        M = inp.size // K
        for name, x, dt, size in (("out", out, T, M * N), ("inp", inp, T, M * K), ("gamma", gamma, T, K)):
            _need(op, name, x, dt, size)
        _need(op, "rstd", rstd, F32, M, aligned=False)
        s, k = self.scratch, self.kb
        sx = s.get("bl_sx", M, F32)
        if self._decode(((out, codes, scale, gamma),), rstd, sx, inp, M, N, K, nb, per, eps):
            return
        qx = s.get("bl_x", M * K, T).view(np.int8)[:M * K]
        k.bitlinear_quantize_i8((cdiv(M, 8),), (256,), (qx, sx, rstd, inp, gamma, np.float32(eps), np.int32(M),
                                                        np.int32(K)))
        qw, sw = s.get("bl_qw", N * K, T).view(np.int8)[:N * K], s.get("bl_sw", 1, F32)
        acc = s.get("bl_acc", M * N, F32).view(np.int32)
        k.bitlinear_unpack((cdiv(N * K // 8, 256),), (256,), (qw, sw, codes, np.float32(scale), np.int32(N),
                                                               np.int32(K), np.int32(nb), np.int32(per)))
        self.be.gemm.mm_int8(acc, qx, qw, M, N, K)
        k.bitlinear_rescale_i32((cdiv(M * N // _pack(T), 256),), (256,), (out, acc, sx, sw, np.int32(M),
                                                                          np.int32(N)))

    def bitlinear_packed_forward3(self, outs, rstd, inp, codes, scales, K, packing, gammas, eps):
        """Three packed BitLinears of one input (the MLGRU's i, f, g), each as bitlinear_packed_forward; for up to
        _DECODE_ROWS rows one launch of bitlinear_packed_decode (grid y = the weight), else three calls."""
        N, nb = codes[0].shape
        per = {"base3": 5, "2bit": 4}[packing]
        M = inp.size // K
        if all(c.shape == (N, nb) and _codes_fit(c, K, per) for c in codes) and N % 8 == 0:
            op, T = "bitlinear_packed_forward3", self.be.act_dtype
            for i in range(3):
                _need(op, f"outs[{i}]", outs[i], T, M * N)
                _need(op, f"gammas[{i}]", gammas[i], T, K)
            _need(op, "inp", inp, T, M * K)
            _need(op, "rstd", rstd, F32, M, aligned=False)
            sx = self.scratch.get("bl_sx", 3 * M, F32)
            if self._decode(tuple(zip(outs, codes, scales, gammas)), rstd, sx, inp, M, N, K, nb, per, eps):
                return
        for o, c, sc, g in zip(outs, codes, scales, gammas):
            self.bitlinear_packed_forward(o, rstd, inp, c, sc, K, packing, g, eps)

    def bitlinear_packed_swiglu_forward(self, out, rstd, inp, codes, scale, K, packing, gamma, eps):
        """A GLU's packed gate/up projection straight to its SwiGLU: out (M, F) = up * silu(gate) of the (M, 2F)
        product [up | gate] of codes (2F, nb). For up to _DECODE_ROWS rows one launch
        (bitlinear_packed_decode_swiglu), else the product into scratch and swiglu_forward; the same bits either way."""
        op, T = "bitlinear_packed_swiglu_forward", self.be.act_dtype
        N, nb = codes.shape
        per = {"base3": 5, "2bit": 4}[packing]
        M = inp.size // K
        if N % 16 or out.size != M * N // 2:
            raise ValueError(f"{op}: out {tuple(out.shape)} is not (M, {N} / 2) for codes of {N} rows")
        if M <= _DECODE_ROWS and _codes_fit(codes, K, per):
            for name, x, dt, size in (("out", out, T, M * N // 2), ("inp", inp, T, M * K), ("gamma", gamma, T, K)):
                _need(op, name, x, dt, size)
            _need(op, "rstd", rstd, F32, M, aligned=False)
            sx = self.scratch.get("bl_sx", M, F32)
            if self._decode(((out, codes, scale, gamma),), rstd, sx, inp, M, N, K, nb, per, eps, swiglu=True):
                return
        fc = self.scratch.get("bl_fc", M * N, T).reshape(M, N)
        self.bitlinear_packed_forward(fc, rstd, inp, codes, scale, K, packing, gamma, eps)
        self.be.swiglu_forward(out.reshape(M, N // 2), fc)

    def _decode(self, mats, rstd, sx, inp, M, N, K, nb, per, eps, swiglu=False) -> bool:
        """bitlinear_packed_decode for 1 or 3 weights (mats: (out, codes, scale, gamma) each) of one input of M
        rows, when M <= _DECODE_ROWS (the kernel takes up to 8) and its shared memory fits (the staged rows and gamma
        when they fit too); False if not. swiglu: one weight of 2F rows, out (M, F) its SwiGLU
        (bitlinear_packed_decode_swiglu)."""
        if M > _DECODE_ROWS or any(c.data.ptr % 4 for _, c, _, _ in mats):  # its row copies read aligned words
            return False
        isz = np.dtype(self.be.act_dtype).itemsize
        smem = decode_smem(M, nb, per, K, isz, staged=True)
        staged = smem + 96 <= _MAX_SMEM  # + its 96 B of static shared memory
        if not staged:
            smem = decode_smem(M, nb, per, K, isz, staged=False)
            if smem + 96 > _MAX_SMEM:
                return False
        kern = self.kb.bitlinear_packed_decode_swiglu if swiglu else self.kb.bitlinear_packed_decode
        if smem > 48 * 1024 - 96 and kern.max_dynamic_shared_size_bytes < smem:
            kern.max_dynamic_shared_size_bytes = smem  # the opt-in above 48 KB
        full = (tuple(mats) * 3)[:3]  # one weight: the same one in all three slots (grid y = 1 uses the first)
        outs, codes, scales, gammas = zip(*full)
        if self._sms is None:
            self._sms = self.be.cp.cuda.Device().attributes["MultiProcessorCount"]
        cap = max(1, _DECODE_BLOCKS_PER_SM * self._sms // len(mats))  # one wave; more outputs loop in the warps
        outputs = N // 2 if swiglu else N
        kern((min(cdiv(outputs, _DECODE_THREADS // 32), cap), len(mats)), (_DECODE_THREADS,), (
            *outs, rstd, sx, inp, *gammas, np.float32(eps), *codes, *(np.float32(x) for x in scales), np.int32(M),
            np.int32(N), np.int32(K), np.int32(nb), np.int32(per), np.int32(staged)), shared_mem=smem)
        return True

    # ---- one decode step in one kernel (kernels/mmfree_decode.cu) ----------------------------------------------
    @functools.cached_property
    def kd(self):
        return module("mmfree_decode", self.be.dtype_name)

    def decode_step_plan(self, dims: dict, arrays: dict, scales, head_scale: float, eps: float):
        """The persistent decode kernel's launch for one model and recurrent state (batch 1), or None where it does
        not apply (then the per-op kernels decode; self.decode_step_why says why): dims L, d, I, Vl, per; arrays:
        the model's device arrays by their mmfree_decode.cu role (enc, h, ln1, ln2, gnorm, lnf, headn, gains (6),
        codes (7), logits); scales (L, 6) s_w of i, f, g, o, gate, down. The plan holds the kernel's own scratch
        rows and lam (L, d) fp32 (16-byte aligned: its staging copies 16-byte words; the caller fills it, e.g. by
        lower_bounds_forward). Uploads its argument tables: call it outside graph capture, then decode_step_run(plan)
        any number of times (captured or not)."""
        T, cp = self.be.act_dtype, self.be.cp
        L, d, I, Vl, per = (int(dims[k]) for k in ("L", "d", "I", "Vl", "per"))
        fields = self.decode_fields and d % 16 == 0 and I % 16 == 0 and not self.be.capturing
        if fields and per == 5:  # the table-free inner loop reads 2-bit fields: base 3 transcribed once
            arrays = dict(arrays, codes=tuple(self._two_bit(c, K) for c, K in zip(
                arrays["codes"], (d, d, d, d, d, I, d))))
            per = 4
        dims = dict(dims, per=per)
        nbd, nbi = -(-d // per), -(-I // per)
        if self._sms is None:
            self._sms = cp.cuda.Device().attributes["MultiProcessorCount"]
        G, isz = self._sms, np.dtype(T).itemsize
        fixed = decode_step_smem(d, I, nbd, nbi, per, isz, 0)
        S = (_MAX_SMEM - fixed) // _MD_SLOTS // 32 * 32
        why = self.decode_step_why = _decode_step_unfit(T, L, d, I, Vl, nbd, nbi, G, S, arrays, self.be.capturing)
        if why:
            return None
        smem = fixed + _MD_SLOTS * S
        kern = self.kd.mmfree_decode_step
        if kern.max_dynamic_shared_size_bytes < smem:
            kern.max_dynamic_shared_size_bytes = smem
        try:  # every block must be resident at once (the grid barrier): one an SM
            fn = getattr(kern, "kernel", kern)  # a RawKernel's CUfunction
            resident = cp.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(fn.ptr, _MD_THREADS, smem)
        except Exception:  # noqa: BLE001  (no occupancy query in this CuPy: the launch bounds promise one)
            resident = 1
        if resident < 1:
            self.decode_step_why = f"{smem} bytes of shared memory and {_MD_THREADS} threads do not fit an SM"
            return None
        scratch = {k: self.be.zeros(n, T) for k, n in (("r1", d), ("r2", d), ("po", d), ("pd", d), ("ai", d),
                                                         ("af", d), ("ag", d), ("sw", I))}
        lam = self.be.zeros(L * d, F32)
        A, F = decode_step_tables(dims, arrays, scratch, lam, S, scales, head_scale, eps, fields)
        return {"kern": kern, "grid": G, "smem": smem, "A": self.be.asarray(A), "F": self.be.asarray(F),
                "bar": self.be.zeros(1, np.uint32), "lam": lam.reshape(L, d), "scratch": scratch, "arrays": arrays}

    def _two_bit(self, codes, K: int):
        """codes (base 3) as 2-bit codes of the same trits, made once per source array and kept."""
        key = codes.data.ptr
        if key not in self._codes2 or self._codes2[key][0] is not codes:
            self._codes2[key] = (codes, base3_to_2bit(codes, K, self.be.cp))
        return self._codes2[key][1]

    def decode_step_profile(self, plan, buf) -> None:
        """Block 0 records its phase timestamps into buf (int64 (4 L + 1, 4), or None: off) on the steps that follow
        (captured ones too: the kernel reads the setting from its argument table)."""
        plan["A"][38] = 0 if buf is None else buf.data.ptr

    def decode_step_run(self, plan) -> None:
        """One decode step: the barrier counter zeroed, then the persistent kernel (both captured into a graph)."""
        self.be.fill_zero(plan["bar"])
        plan["kern"]((plan["grid"],), (_MD_THREADS,), (plan["A"], plan["F"], plan["bar"]), shared_mem=plan["smem"])

    def quantized(self, M: int, N: int, K: int):
        """(q_x (M, K) int8, s_x (M,), q_w (N, K) int8, s_w (1,)) of the last bitlinear_forward at these sizes:
        device views of the scratch (the tests read them; a bitlinear_backward since has overwritten them)."""
        s = self.scratch
        return (s.get("bl_x", M * K, self.be.act_dtype).view(np.int8)[:M * K].reshape(M, K), s.get("bl_sx", M, F32),
                s.get("bl_qw", N * K, self.be.act_dtype).view(np.int8)[:N * K].reshape(N, K), s.get("bl_sw", 1, F32))

    # ---- MLGRU -------------------------------------------------------------------------------------------------
    def _mlgru_sizes(self, op, ai):
        if ai.ndim != 3:
            raise ValueError(f"{op}: ai {tuple(ai.shape)} is not (B, T, d)")
        B, nt, d = ai.shape
        if d % 8:
            raise UserError(f"the cuda MLGRU kernels need a hidden size divisible by 8 (got {d})")
        return B, nt, d

    def mlgru_forward(self, o, h, rstd, ai, af, ag, lam, gamma, h0, eps):
        op, T = "mlgru_forward", self.be.act_dtype
        B, nt, d = self._mlgru_sizes(op, ai)
        n = B * nt * d
        for name, x, dt, size, aligned in (
                ("o", o, T, n, True), ("h", h, F32, n, True), ("ai", ai, T, n, True), ("af", af, T, n, True),
                ("ag", ag, T, n, True), ("rstd", rstd, F32, B * nt, False), ("lam", lam, F32, d, False),
                ("gamma", gamma, T, d, False)) + ((("h0", h0, F32, B * d, False),) if h0 is not None else ()):
            _need(op, name, x, dt, size, aligned)
        k = self.km
        own = nt == 1  # decoding: the scan kernel (one warp a block) computes the gate's rstd itself
        if not own:
            k.mlgru_gate_rstd((cdiv(B * nt, 8),), (256,), (rstd, ag, np.float32(eps), np.int32(B * nt), np.int32(d)))
        k.mlgru_forward(*_scan_grid(B, nt, d), (
            o, h, ai, af, ag, lam, gamma, rstd, np.uint64(0) if h0 is None else h0, np.int32(B), np.int32(nt),
            np.int32(d), np.int32(own), np.float32(eps)))

    def mlgru_backward(self, dai, daf, dag, dlam, dgamma, do, ai, af, ag, lam, gamma, h, rstd):
        op, T = "mlgru_backward", self.be.act_dtype
        B, nt, d = self._mlgru_sizes(op, ai)
        n = B * nt * d
        for name, x, dt, size, aligned in (
                ("dai", dai, T, n, True), ("daf", daf, T, n, True), ("dag", dag, T, n, True), ("do", do, T, n, True),
                ("ai", ai, T, n, True), ("af", af, T, n, True), ("ag", ag, T, n, True), ("h", h, F32, n, True),
                ("rstd", rstd, F32, B * nt, False), ("lam", lam, F32, d, False), ("dlam", dlam, F32, d, False),
                ("gamma", gamma, T, d, True), ("dgamma", dgamma, T, d, False)):
            _need(op, name, x, dt, size, aligned)
        part = self.scratch.get("mg_part", 2 * B * d, F32)  # (2, B, d): dlam's and dgamma's per-sequence sums
        k = self.km
        k.mlgru_backward_scan(*_scan_grid(B, nt, d), (
            dai, daf, part, do, ai, af, ag, lam, gamma, h, rstd, np.int32(B), np.int32(nt), np.int32(d)))
        k.mlgru_backward_dag((cdiv(B * nt, 8),), (256,), (dag, do, ag, gamma, h, rstd, np.int32(B * nt), np.int32(d)))
        k.mlgru_backward_params_finalize((cdiv(d, 128),), (128,), (dlam, dgamma, part, np.int32(B), np.int32(d)))

    # ---- lower bounds --------------------------------------------------------------------------------------------
    def _lower_bounds_sizes(self, op, P):
        if P.ndim != 2:
            raise ValueError(f"{op}: P {tuple(P.shape)} is not (L, d)")
        _need(op, "P", P, self.be.act_dtype, P.size, aligned=False)
        return P.shape

    def lower_bounds_forward(self, lam, P):
        op = "lower_bounds_forward"
        L, d = self._lower_bounds_sizes(op, P)
        _need(op, "lam", lam, F32, L * d, aligned=False)
        self.km.lower_bounds_forward((cdiv(d, 128),), (128,), (lam, P, np.int32(L), np.int32(d)))

    def lower_bounds_backward(self, dP, dlam, P):
        op = "lower_bounds_backward"
        L, d = self._lower_bounds_sizes(op, P)
        _need(op, "dP", dP, self.be.act_dtype, L * d, aligned=False)
        _need(op, "dlam", dlam, F32, L * d, aligned=False)
        self.km.lower_bounds_backward((cdiv(d, 128),), (128,), (dP, dlam, P, np.int32(L), np.int32(d)))


def _codes_fit(codes, K: int, per: int) -> bool:
    """Whether codes are contiguous uint8 rows of ceil(K / per) bytes for a K the kernels take (bitlinear_packed_forward
    says what is wrong when not)."""
    return (codes.dtype == np.uint8 and codes.flags.c_contiguous and codes.shape[-1] == -(-K // per)
            and K % 8 == 0 and K < _MAX_K)


def decode_smem(M: int, nb: int, per: int, K: int, itemsize: int, staged: bool) -> int:
    """Dynamic shared memory of bitlinear_packed_decode: the code table (base 3: 2048 bytes, 2-bit: 1024), q_x of M
    rows at 8 (base 3) or 4 (2-bit) bytes per code byte, rounded up to 16; when staged the M rows and gamma in T; and
    two code-row buffers per warp (its row_buffer_bytes). 1.3B, K = 5632, one bf16 row, base 3: 2048 + 9024 + 22528
    + 16 x 1136 bytes."""
    xs = -(-(8 * M * nb if per == 5 else 4 * M * nb) // 16) * 16
    rb = ((nb + 6) // 4 * 4 + 15) // 16 * 16
    return ((2048 if per == 5 else 1024) + xs + ((M + 1) * K * itemsize if staged else 0)
            + 2 * (_DECODE_THREADS // 32) * rb)


def _decode_step_unfit(T, L, d, I, Vl, nbd, nbi, G, S, arrays, capturing) -> str:
    """Why mmfree_decode_step cannot run on these arrays ("" if it can)."""
    if capturing:
        return "its plan uploads tables: made outside graph capture"
    if d % 8 or I % 8 or max(d, I) >= _MAX_K:
        return f"d = {d}, I = {I}: multiples of 8 below {_MAX_K} only"
    if G < 3:
        return f"{G} SMs: i, f and g take a third of the grid each"
    if S - 16 < nbi or S // 2 - 16 < nbd:
        return f"a ring slot of {S} bytes holds no row of {nbi} code bytes (gate/up: two of {nbd})"
    for k, x, dt, n in (("enc", arrays["enc"], T, d), ("logits", arrays["logits"], T, Vl),
                        ("h", arrays["h"], F32, L * d), ("lnf", arrays["lnf"], T, d), ("headn", arrays["headn"], T, d)):
        if x.dtype != dt or x.size < n or not x.flags.c_contiguous or x.data.ptr % 16:
            return f"{k} {tuple(x.shape)} {x.dtype}: not a 16-byte aligned contiguous {np.dtype(dt).name} array of {n}"
    ps = _layer_stride(arrays)
    layered = [("ln1", arrays["ln1"], d), ("ln2", arrays["ln2"], d), ("gnorm", arrays["gnorm"], d)]
    layered += [(f"gains[{i}]", g, K) for i, (g, K) in enumerate(zip(arrays["gains"], (d,) * 5 + (I,)))]
    for k, x, K in layered:  # (L, K) rows of one layer stride, each row contiguous and 16-byte aligned
        isz = x.dtype.itemsize
        if (x.dtype != T or x.shape != (L, K) or x.strides != (ps * isz, isz) or x.data.ptr % 16
                or ps * isz % 16):
            return f"{k} {tuple(x.shape)} {x.dtype} strides {x.strides}: not (L, K) rows of {np.dtype(T).name}, " \
                   f"{ps} elements apart, 16-byte aligned"
    for i, (c, (rows, nb)) in enumerate(zip(arrays["codes"], ((d, nbd),) * 4 + ((2 * I, nbd), (d, nbi), (Vl, nbd)))):
        head = i == 6 and c.ndim == 2 and c.shape[1] == nb and c.shape[0] >= rows  # the head: >= Vl rows
        if c.dtype != np.uint8 or not c.flags.c_contiguous or c.data.ptr % 16 or not (c.shape == (L, rows, nb) or head):
            return f"codes[{i}] {tuple(c.shape)} {c.dtype}: not 16-byte aligned contiguous uint8 rows as wanted"
    return ""


def decode_step_tables(dims: dict, arrays: dict, scratch: dict, lam, slot: int, scales, head_scale: float,
                       eps: float, fields: bool = False):
    """mmfree_decode_step's argument tables (host arrays): A int64 (its MD_* entries: sizes, then the device
    addresses of the arrays, scratch rows and lam, the timestamp buffer (none), the gains' layer stride, whether the
    2-bit codes are read by fields), F fp32 (eps, the head's s_w, then s_w of i, f, g, o, gate, down of each
    layer)."""
    L, d, I, Vl, per = (int(dims[k]) for k in ("L", "d", "I", "Vl", "per"))
    ptr = lambda x: x.data.ptr  # noqa: E731
    A = [L, d, I, Vl, -(-d // per), -(-I // per), per, slot, ptr(arrays["enc"]),
         *(ptr(scratch[k]) for k in ("r1", "r2", "po", "pd", "ai", "af", "ag", "sw")), ptr(arrays["logits"]),
         ptr(arrays["h"]), ptr(lam), *(ptr(arrays[k]) for k in ("ln1", "ln2", "gnorm", "lnf", "headn")),
         *(ptr(g) for g in arrays["gains"]), *(ptr(c) for c in arrays["codes"]), 0, _layer_stride(arrays),
         int(fields)]
    F = np.concatenate([np.float32([eps, head_scale]), np.asarray(scales, np.float32).reshape(-1)])
    return np.asarray(A, np.int64), F


def base3_to_2bit(codes, K: int, xp):
    """2-bit codes (..., ceil(K / 4)) holding the trits of base-3 codes (..., ceil(K / 5)) (formats/ternary.py: digit
    d of a base-3 byte is the trit d - 1; a 2-bit field is the trit & 3), by xp (numpy or cupy), some rows at a time."""
    *lead, nb3 = codes.shape
    nb2 = -(-K // 4)
    flat = codes.reshape(-1, nb3)
    out = xp.zeros((flat.shape[0], nb2 * 4), xp.uint8)  # one field a byte, then packed 4 to a byte
    step = max(1, (1 << 22) // nb3)
    for r0 in range(0, flat.shape[0], step):
        c = flat[r0:r0 + step].astype(xp.int16)
        t = xp.empty((*c.shape, 5), xp.int16)
        for j in range(5):
            t[..., j] = c % 3
            c = c // 3
        out[r0:r0 + step, :K] = ((t - 1) & 3).reshape(t.shape[0], -1)[:, :K].astype(xp.uint8)
    f = out.reshape(-1, nb2, 4)
    return (f[..., 0] | f[..., 1] << 2 | f[..., 2] << 4 | f[..., 3] << 6).astype(xp.uint8).reshape(*lead, nb2)


def _layer_stride(arrays) -> int:
    """Elements between consecutive layers' rows of the per-layer gains (the parameters are stored layer-major)."""
    x = arrays["ln1"]
    return x.strides[0] // x.dtype.itemsize


def decode_step_smem(d: int, I: int, nbd: int, nbi: int, per: int, itemsize: int, slot: int) -> int:
    """Dynamic shared memory of mmfree_decode_step (its md_layout): the code table, q_x per code byte (8 bytes
    base 3, 4 2-bit), the staged row and a gain (max(d, I) in T each), three rows of d in T (a norm gain, ai, af),
    three fp32 (the old and new state, lam), 256 bytes of reduction scratch, and 3 ring slots of `slot` bytes."""
    r16 = lambda n: -(-n // 16) * 16  # noqa: E731
    return (2048 + r16(max(nbd, nbi) * (8 if per == 5 else 4)) + 2 * r16(max(d, I) * itemsize)
            + 3 * r16(d * itemsize) + 3 * r16(d * 4) + 256 + _MD_SLOTS * slot)


def _scan_grid(B: int, nt: int, d: int):
    """(grid, block) of the chunked MLGRU scans: 32 channels x nch chunks of t per block; a fixed function of the
    shape, so every run sums in the same order."""
    nch = max(1, min(_SCAN_CHUNKS, nt // _SCAN_MIN_LEN))
    return (cdiv(d, 32), B), (32, nch)


def _wdtype(w, T):
    """A BitLinear weight is in T, or fp32 (the master weights a bf16 model quantizes)."""
    return F32 if w.dtype == F32 else T


def _pack(dtype) -> int:
    """Elements per 16-byte load."""
    return 16 // np.dtype(dtype).itemsize
