"""Matrix products through cuBLASLt (nvmath-python's thin bindings), with bias / GELU epilogues; int8 x int8 ->
int32 for BitLinear's forward (mm_int8).

Our tensors are row-major; cuBLASLt is column-major, where a row-major (r, c) matrix reads as its transpose.
`mm(out, x, y)` computes out (M, N) = op(x) (M, K) @ op(y) (K, N) as the column-major product
out^T = op(y)^T op(x)^T, i.e. cuBLASLt's A = y, B = x. Descriptors, layouts and the heuristic's algorithm are
made once per shape and cached; the workspace is allocated once. Split-K reductions that use atomics
(REDUCTION_SCHEME_INPLACE) are excluded so every product is deterministic.
"""
from __future__ import annotations

import numpy as np

from ...errors import UserError

WORKSPACE_BYTES = 32 << 20
_R32F, _R16BF, _R8I, _R32I = 0, 14, 3, 10   # cudaDataType_t
_COMPUTE_32F, _COMPUTE_32I = 68, 72          # cublasComputeType_t


def _align(a) -> int:
    """The largest power of two (<= 256) dividing the array's address."""
    p = a.data.ptr
    return min(256, p & -p) if p else 256


class Gemm:
    def __init__(self, cupy, dtype: str):
        try:
            import nvmath.bindings.cublasLt as lt
        except ImportError:
            raise UserError("the cuda device needs nvmath-python for cuBLASLt: pip install -e '.[cuda]'") from None
        self.lt, self.cupy = lt, cupy
        self.dtype = _R16BF if dtype == "bf16" else _R32F
        self.handle = lt.create()
        self.workspace = cupy.empty(WORKSPACE_BYTES, dtype=cupy.uint8)
        self._plans = {}
        self._one = np.ones(1, np.float32)
        self._zero = np.zeros(1, np.float32)
        self._one_i, self._zero_i = np.ones(1, np.int32), np.zeros(1, np.int32)
        self.E = lt.Epilogue

    def _set(self, fn, obj, attr, value, dtype):
        buf = np.array([value], dtype=dtype)
        fn(obj, attr, buf.ctypes.data, buf.itemsize)

    def _plan(self, key):
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        lt = self.lt
        (transa, transb, m, n, k, lda, ldb, ldd, epi, accumulate, batch, sa, sb, sd, align, dtype_d, dtype_ab) = key
        D = lt.MatmulDescAttribute
        integer = dtype_ab == _R8I  # int8 x int8 -> int32: int32 accumulation, int32 alpha and beta
        desc = lt.matmul_desc_create(_COMPUTE_32I, _R32I) if integer else lt.matmul_desc_create(_COMPUTE_32F, _R32F)
        self._set(lt.matmul_desc_set_attribute, desc, D.TRANSA, int(transa), np.int32)
        self._set(lt.matmul_desc_set_attribute, desc, D.TRANSB, int(transb), np.int32)
        self._set(lt.matmul_desc_set_attribute, desc, D.EPILOGUE, int(epi), np.uint32)

        def layout(rows, cols, ld, stride, dtype=dtype_ab):
            lay = lt.matrix_layout_create(dtype, rows, cols, ld)
            if batch > 1:
                L = lt.MatrixLayoutAttribute
                self._set(lt.matrix_layout_set_attribute, lay, L.BATCH_COUNT, batch, np.int32)
                self._set(lt.matrix_layout_set_attribute, lay, L.STRIDED_BATCH_OFFSET, stride, np.int64)
            return lay

        la = layout(k if transa else m, m if transa else k, lda, sa)
        lb = layout(n if transb else k, k if transb else n, ldb, sb)
        ld_ = layout(m, n, ldd, sd, dtype_d)
        pref = lt.matmul_preference_create()
        P = lt.MatmulPreferenceAttribute
        self._set(lt.matmul_preference_set_attribute, pref, P.MAX_WORKSPACE_BYTES, WORKSPACE_BYTES, np.uint64)
        allowed = int(lt.ReductionScheme.COMPUTE_TYPE) | int(lt.ReductionScheme.OUTPUT_TYPE)  # no atomics
        self._set(lt.matmul_preference_set_attribute, pref, P.REDUCTION_SCHEME_MASK, allowed, np.uint32)
        for attr, a in zip((P.MIN_ALIGNMENT_A_BYTES, P.MIN_ALIGNMENT_B_BYTES, P.MIN_ALIGNMENT_C_BYTES,
                            P.MIN_ALIGNMENT_D_BYTES), align):  # the heuristic may only pick what our pointers allow
            self._set(lt.matmul_preference_set_attribute, pref, attr, a, np.uint32)
        res = np.zeros(1, dtype=lt.matmul_heuristic_result_dtype)
        count = np.zeros(1, np.int32)
        lt.matmul_algo_get_heuristic(self.handle, desc, la, lb, ld_, ld_, pref, 1, res.ctypes.data, count.ctypes.data)
        lt.matmul_preference_destroy(pref)
        if count[0] < 1:
            raise RuntimeError(f"cuBLASLt has no algorithm for {key}")
        plan = (desc, la, lb, ld_, res)
        self._plans[key] = plan
        return plan

    def mm(self, out, x, y, M, N, K, *, transx=False, transy=False, ldx=None, ldy=None, ldo=None,
           bias=None, epilogue="default", aux=None, accumulate=False, batch=1, stride_x=0, stride_y=0,
           stride_o=0, stream=None, out_fp32=False):
        """out (M, N) [+]= op(x) @ op(y) (+ bias over N) with an optional epilogue:
        'gelu': out = gelu(. + bias), aux = the pre-GELU values (M, N). (The DGELU epilogue for the backward
        measured 2.2 ms/layer on d12 against 1.2 for a plain product and our GELU-backward kernel: not used.)
        Leading dimensions default to the contiguous ones; batch > 1 runs strided batched products. out_fp32: out
        (and the accumulated C) is fp32 whatever the operands' dtype (bf16 x bf16 -> fp32: BitLinear's backward).
        Integer operands go through mm_int8."""
        lt = self.lt
        ldx = ldx or (M if transx else K)
        ldy = ldy or (K if transy else N)
        ldo = ldo or N
        E = self.E
        epi = {"default": E.DEFAULT, "gelu": E.GELU_AUX}[epilogue]
        if bias is not None:
            epi = {E.DEFAULT: E.BIAS, E.GELU_AUX: E.GELU_AUX_BIAS}[epi]
        align = (_align(y), _align(x), _align(out), _align(out))
        key = (transy, transx, N, M, K, ldy, ldx, ldo, int(epi), accumulate, batch, stride_y, stride_x, stride_o,
               align, _R32F if out_fp32 else self.dtype, self.dtype)
        desc, la, lb, ld_, res = self._plan(key)
        D = lt.MatmulDescAttribute
        if bias is not None:
            self._set(lt.matmul_desc_set_attribute, desc, D.BIAS_POINTER, bias.data.ptr, np.int64)
        if aux is not None:
            self._set(lt.matmul_desc_set_attribute, desc, D.EPILOGUE_AUX_POINTER, aux.data.ptr, np.int64)
            self._set(lt.matmul_desc_set_attribute, desc, D.EPILOGUE_AUX_LD, ldo, np.int64)
        s = stream if stream is not None else self.cupy.cuda.get_current_stream()
        beta = self._one if accumulate else self._zero
        lt.matmul(self.handle, desc, self._one.ctypes.data, y.data.ptr, la, x.data.ptr, lb, beta.ctypes.data,
                  out.data.ptr, ld_, out.data.ptr, ld_, res.ctypes.data, self.workspace.data.ptr, WORKSPACE_BYTES,
                  s.ptr)

    def mm_int8(self, out, x, y, M, N, K, stream=None):
        """out (M, N) int32 = x (M, K) int8 @ y (N, K)^T int8 on the int8 tensor cores, int32 accumulation: exact.
        This is the one form cuBLASLt's int8 kernels take on plain layouts ("TN": A = y transposed, B = x, both
        K-contiguous); K and N must be multiples of 4 (BitLinear checks 8) and the pointers 4-byte aligned."""
        lt = self.lt
        align = (_align(y), _align(x), _align(out), _align(out))
        key = (True, False, N, M, K, K, K, N, int(self.E.DEFAULT), False, 1, 0, 0, 0, align, _R32I, _R8I)
        desc, la, lb, ld_, res = self._plan(key)
        s = stream if stream is not None else self.cupy.cuda.get_current_stream()
        lt.matmul(self.handle, desc, self._one_i.ctypes.data, y.data.ptr, la, x.data.ptr, lb, self._zero_i.ctypes.data,
                  out.data.ptr, ld_, out.data.ptr, ld_, res.ctypes.data, self.workspace.data.ptr, WORKSPACE_BYTES,
                  s.ptr)
