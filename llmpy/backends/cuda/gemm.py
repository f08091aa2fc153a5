"""Matrix products through cuBLASLt (nvmath-python's thin bindings), with bias / GELU epilogues; int8 x int8 ->
int32 for BitLinear's forward (mm_int8).

Our tensors are row-major; cuBLASLt is column-major, where a row-major (r, c) matrix reads as its transpose.
`mm(out, x, y)` computes out (M, N) = op(x) (M, K) @ op(y) (K, N) as the column-major product
out^T = op(y)^T op(x)^T, i.e. cuBLASLt's A = y, B = x. Descriptors, layouts and the heuristic's algorithm are
made once per shape and cached; the workspace is allocated once. Split-K reductions that use atomics
(REDUCTION_SCHEME_INPLACE) are excluded so every product is deterministic.

Algorithm choice: by default the heuristic's first algorithm (the same on every run: bitwise reproducible). With
`tune` on (--tune-gemm), the first product of each shape times the heuristic's top TUNE_CANDIDATES algorithms
on its own operands (an accumulating product's output is saved and restored) and keeps the fastest if it beats the
first by more than TUNE_MARGIN. Timing can choose differently on another day, so every choice is kept in `pins`
(shape -> index in the heuristic's list, exported with the cuBLASLt version and GPU): a checkpoint stores them and a
resume, or a run given them, replays the same kernels bitwise.
"""
from __future__ import annotations

import numpy as np

from ...errors import UserError

WORKSPACE_BYTES = 32 << 20
TUNE_CANDIDATES = 16   # algorithms asked of the heuristic when tuning
TUNE_MARGIN = 0.02     # a tuned algorithm must beat the heuristic's first by 2% (timing noise keeps the first)
_R32F, _R16BF, _R8I, _R32I = 0, 14, 3, 10   # cudaDataType_t
_R8F_E4M3, _R8F_E5M2 = 28, 29
_COMPUTE_32F, _COMPUTE_32I = 68, 72          # cublasComputeType_t


def _key_str(key) -> str:
    """A plan's key as text (pins are saved as JSON): booleans as 0/1, the alignment tuple joined by '/'."""
    return ",".join("/".join(map(str, v)) if isinstance(v, tuple) else str(int(v)) for v in key)


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
        self.tune = False  # time the heuristic's top algorithms per shape (opt-in: --tune-gemm)
        self.pins = {}     # shape key -> index of the chosen algorithm in the heuristic's list (see load_pins)
        self.loaded = False  # pins came from another run (load_pins): replay them
        self.tuned = []    # one row per tuned shape: (key, candidates, index, ms of the first, ms of the chosen)

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
        fp8 = isinstance(dtype_ab, tuple)  # (A's type, B's type): FP8 operands, fp32 accumulation, bf16 out
        type_a, type_b = dtype_ab if fp8 else (dtype_ab, dtype_ab)
        desc = lt.matmul_desc_create(_COMPUTE_32I, _R32I) if integer else lt.matmul_desc_create(_COMPUTE_32F, _R32F)
        self._set(lt.matmul_desc_set_attribute, desc, D.TRANSA, int(transa), np.int32)
        self._set(lt.matmul_desc_set_attribute, desc, D.TRANSB, int(transb), np.int32)
        self._set(lt.matmul_desc_set_attribute, desc, D.EPILOGUE, int(epi), np.uint32)
        if fp8 and epi != int(self.E.DEFAULT):  # the bias (and GELU's aux) in the output's type
            self._set(lt.matmul_desc_set_attribute, desc, D.BIAS_DATA_TYPE, dtype_d, np.int32)

        def layout(rows, cols, ld, stride, dtype=type_b):
            lay = lt.matrix_layout_create(dtype, rows, cols, ld)
            if batch > 1:
                L = lt.MatrixLayoutAttribute
                self._set(lt.matrix_layout_set_attribute, lay, L.BATCH_COUNT, batch, np.int32)
                self._set(lt.matrix_layout_set_attribute, lay, L.STRIDED_BATCH_OFFSET, stride, np.int64)
            return lay

        la = layout(k if transa else m, m if transa else k, lda, sa, type_a)
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
        ks = _key_str(key)
        n = TUNE_CANDIDATES if self.pinning else 1  # a pinned index always counts in the same list
        res = np.zeros(n, dtype=lt.matmul_heuristic_result_dtype)
        count = np.zeros(1, np.int32)
        lt.matmul_algo_get_heuristic(self.handle, desc, la, lb, ld_, ld_, pref, n, res.ctypes.data, count.ctypes.data)
        lt.matmul_preference_destroy(pref)
        if count[0] < 1:
            raise RuntimeError(f"cuBLASLt has no algorithm for {key}")
        plan = [desc, la, lb, ld_, res[:count[0]].copy(), ks, None]  # [6]: the algorithm, once _choose has run
        self._plans[key] = plan
        return plan

    def _choose(self, plan, launch, out, accumulate, stream):
        """The algorithm for a new plan (see the module docstring): pinned, tuned, or the heuristic's first."""
        cands, ks = plan[4], plan[5]
        i = self.pins.get(ks)
        if i is not None and i >= len(cands):
            raise UserError(f"the pinned cuBLASLt algorithm {i} for product {ks} is not among the {len(cands)} the "
                            "heuristic offers now (a different cuBLASLt or GPU); run without the pinned algorithms")
        if i is None:
            i = 0
            capturing = getattr(stream, "is_capturing", lambda: False)()
            if self.tune and len(cands) > 1 and not capturing:
                i = self._time(cands, launch, out, accumulate, stream, ks)
            self.pins[ks] = i
        plan[6] = cands[i:i + 1].copy()
        return plan[6]

    def _time(self, cands, launch, out, accumulate, stream, ks) -> int:
        """Index of the fastest candidate (median of a few launches each, after one warm-up). The products run on
        the real operands: a plain product rewrites the same output each time; an accumulating one's output is
        saved first and restored after (the caller then runs the chosen algorithm once, as without tuning)."""
        cp = self.cupy
        ws = "workspace_size" if "workspace_size" in cands.dtype.names else "workspaceSize"
        cp.cuda.Device().synchronize()
        keep = out.copy() if accumulate else None
        cp.cuda.Device().synchronize()
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        times = []
        for j in range(len(cands)):
            algo = cands[j:j + 1].copy()
            if int(cands[j]["state"]) != 0 or int(cands[j][ws]) > WORKSPACE_BYTES:
                times.append(float("inf"))
                continue
            try:
                e0.record(stream)
                launch(algo)  # warm-up, and the size of one launch
                e1.record(stream)
                e1.synchronize()
                one = cp.cuda.get_elapsed_time(e0, e1)
                ts = []
                for _ in range(max(3, min(15, int(2.0 / max(one, 1e-3))))):
                    e0.record(stream)
                    launch(algo)
                    e1.record(stream)
                    e1.synchronize()
                    ts.append(cp.cuda.get_elapsed_time(e0, e1))
                times.append(float(np.median(ts)))
            except Exception:  # an algorithm the heuristic offers but cannot run here: skip it
                cp.cuda.Device().synchronize()
                times.append(float("inf"))
        if keep is not None:
            cp.copyto(out, keep)
            cp.cuda.Device().synchronize()
            del keep
            cp.get_default_memory_pool().free_all_blocks()  # the copy must not stay in the pool's peak
        best = int(np.argmin(times))
        i = best if times[best] < (1 - TUNE_MARGIN) * times[0] else 0
        self.tuned.append((ks, len(cands), i, times[0], times[i]))
        return i

    def tuning_summary(self) -> str:
        """One line: how many shapes were timed, how many changed algorithm, the first calls' time before/after."""
        if not self.tuned:
            return "tune-gemm: no product shape was timed (all pinned or single-candidate)"
        t0 = sum(r[3] for r in self.tuned)
        t1 = sum(r[4] for r in self.tuned)
        moved = sum(r[2] != 0 for r in self.tuned)
        return (f"tune-gemm: timed {len(self.tuned)} product shapes, {moved} use another algorithm than the "
                f"heuristic's first; one call of each: {t0:.2f} -> {t1:.2f} ms")

    def load_pins(self, pins: dict) -> None:
        """Replays the algorithm choices of another run ({"cublaslt": version, "gpu": name, "algos": {shape: index}}):
        a UserError if they were made with another cuBLASLt or GPU (their indices would name other kernels)."""
        have = self.pin_source()
        for k in ("cublaslt", "gpu"):
            if pins.get(k) != have[k]:
                raise UserError(f"the pinned cuBLASLt algorithms were chosen with {k} {pins.get(k)!r}, this is "
                                f"{have[k]!r}: they would name other kernels; drop them (a fresh run without --gemm-algos)")
        self.pins = {str(k): int(v) for k, v in pins.get("algos", {}).items()}
        self.loaded = True

    def adopt(self, choices: dict) -> None:
        """Takes another rank's choices ({shape: index}) for the products already planned here: with data
        parallelism every rank then runs rank 0's kernels (train/loop.py agrees on them before the first step)."""
        for plan in self._plans.values():
            ks = plan[5]
            if plan[6] is not None and ks in choices:
                i = int(choices[ks])
                if not 0 <= i < len(plan[4]):
                    raise UserError(f"rank 0 chose cuBLASLt algorithm {i} for product {ks}, which this rank's "
                                    f"heuristic does not offer ({len(plan[4])} candidates): the GPUs or libraries "
                                    "differ between ranks")
                plan[6] = plan[4][i:i + 1].copy()
                self.pins[ks] = i

    @property
    def pinning(self) -> bool:
        """Whether the choices are a run's own (tuned or replayed): then checkpoints keep them."""
        return self.tune or self.loaded

    def export_pins(self) -> dict:
        return {**self.pin_source(), "algos": dict(sorted(self.pins.items()))}

    def pin_source(self) -> dict:
        props = self.cupy.cuda.runtime.getDeviceProperties(self.cupy.cuda.Device().id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        return {"cublaslt": int(self.lt.get_version()), "gpu": name}

    def mm(self, out, x, y, M, N, K, *, transx=False, transy=False, ldx=None, ldy=None, ldo=None,
           bias=None, epilogue="default", aux=None, accumulate=False, batch=1, stride_x=0, stride_y=0,
           stride_o=0, stream=None, out_fp32=False):
        """out (M, N) [+]= op(x) @ op(y) (+ bias over N) with an optional epilogue:
        'gelu': out = gelu(. + bias), aux = the pre-GELU values (M, N). (cuBLASLt's DGELU epilogue for the
        backward is slower than a plain product and our GELU-backward kernel: 2.2 against 1.2 ms/layer on d12,
        2026-11-28; a d48 step 168.1 -> 181.9 ms even with --tune-gemm's choice, 2026-11-30, H200. Not used;
        docs/performance.md.)
        Leading dimensions default to the contiguous ones; batch > 1 runs strided batched products. out_fp32: out
        (and the accumulated C) is fp32 whatever the operands' dtype (bf16 x bf16 -> fp32: BitLinear's backward).
        Integer operands go through mm_int8."""
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
        self._launch(self._plan(key), out, x, y, accumulate, bias, aux, ldo, stream)

    def _launch(self, plan, out, x, y, accumulate, bias, aux, aux_ld, stream) -> None:
        """Runs a planned product out [+]= op(x) op(y) (cuBLASLt's A = y, B = x) with its epilogue's pointers."""
        lt = self.lt
        desc, la, lb, ld_ = plan[:4]
        D = lt.MatmulDescAttribute
        if bias is not None:
            self._set(lt.matmul_desc_set_attribute, desc, D.BIAS_POINTER, bias.data.ptr, np.int64)
        if aux is not None:
            self._set(lt.matmul_desc_set_attribute, desc, D.EPILOGUE_AUX_POINTER, aux.data.ptr, np.int64)
            self._set(lt.matmul_desc_set_attribute, desc, D.EPILOGUE_AUX_LD, aux_ld, np.int64)
        s = stream if stream is not None else self.cupy.cuda.get_current_stream()
        beta = self._one if accumulate else self._zero

        def launch(algo):
            lt.matmul(self.handle, desc, self._one.ctypes.data, y.data.ptr, la, x.data.ptr, lb, beta.ctypes.data,
                      out.data.ptr, ld_, out.data.ptr, ld_, algo.ctypes.data, self.workspace.data.ptr,
                      WORKSPACE_BYTES, s.ptr)
        launch(plan[6] if plan[6] is not None else self._choose(plan, launch, out, accumulate, s))

    def mm_fp8(self, out, x, y, M, N, K, x_inv, y_inv, *, x_e5m2=False, y_e5m2=False, bias=None, gelu_aux=None,
               accumulate=False, stream=None):
        """out (M, N) bf16 [+]= (x (M, K) @ y (N, K)^T) * x_inv * y_inv (+ bias (N,), bf16) on the FP8 tensor cores,
        fp32 accumulation. x, y: FP8 bytes (e4m3, or e5m2 where said; never both e5m2), both K-contiguous: the "TN"
        form Hopper's FP8 products take. x_inv, y_inv: one-element fp32 device arrays, the operands' dequantizing
        factors (1 / scale), read when the product runs (a CUDA graph replays the new scales). gelu_aux (M, N):
        out = gelu(. + bias) with the pre-GELU values saved there (cuBLASLt's GELU_AUX_BIAS epilogue). M, N, K and
        the pointers must be multiples of 16."""
        lt = self.lt
        E = self.E
        epi = E.DEFAULT if gelu_aux is None else E.GELU_AUX
        if bias is not None:
            epi = {E.DEFAULT: E.BIAS, E.GELU_AUX: E.GELU_AUX_BIAS}[epi]
        types = (_R8F_E5M2 if y_e5m2 else _R8F_E4M3, _R8F_E5M2 if x_e5m2 else _R8F_E4M3)
        align = (_align(y), _align(x), _align(out), _align(out))
        key = (True, False, N, M, K, K, K, N, int(epi), accumulate, 1, 0, 0, 0, align, self.dtype, types)
        plan = self._plan(key)
        D = lt.MatmulDescAttribute
        self._set(lt.matmul_desc_set_attribute, plan[0], D.A_SCALE_POINTER, y_inv.data.ptr, np.int64)
        self._set(lt.matmul_desc_set_attribute, plan[0], D.B_SCALE_POINTER, x_inv.data.ptr, np.int64)
        self._launch(plan, out, x, y, accumulate, bias, gelu_aux, N, stream)

    def mm_int8(self, out, x, y, M, N, K, stream=None):
        """out (M, N) int32 = x (M, K) int8 @ y (N, K)^T int8 on the int8 tensor cores, int32 accumulation: exact.
        This is the one form cuBLASLt's int8 kernels take on plain layouts ("TN": A = y transposed, B = x, both
        K-contiguous); K and N must be multiples of 4 (BitLinear checks 8) and the pointers 4-byte aligned."""
        lt = self.lt
        align = (_align(y), _align(x), _align(out), _align(out))
        key = (True, False, N, M, K, K, K, N, int(self.E.DEFAULT), False, 1, 0, 0, 0, align, _R32I, _R8I)
        plan = self._plan(key)
        desc, la, lb, ld_ = plan[:4]
        s = stream if stream is not None else self.cupy.cuda.get_current_stream()

        def launch(algo):
            lt.matmul(self.handle, desc, self._one_i.ctypes.data, y.data.ptr, la, x.data.ptr, lb,
                      self._zero_i.ctypes.data, out.data.ptr, ld_, out.data.ptr, ld_, algo.ctypes.data,
                      self.workspace.data.ptr, WORKSPACE_BYTES, s.ptr)
        launch(plan[6] if plan[6] is not None else self._choose(plan, launch, out, False, s))
