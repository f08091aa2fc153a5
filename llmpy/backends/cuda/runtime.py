"""CuPy import guard, kernel compilation (NVRTC, cached) and launch helpers.

Each kernels/<stem>.cu holds one kernel family, templated on the storage type T (float or bf16); the stem names its
NumPy twin in llmpy/layers/ (cast.cu is infrastructure, no twin). We inline kernels/common.cuh into the source (so
CuPy's on-disk kernel cache keys on everything the kernel sees) and compile with NVRTC for the device's
architecture.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

from ...errors import UserError

HERE = Path(__file__).resolve().parent
KERNELS = HERE / "kernels"


def import_cupy():
    try:
        import cupy
        import ml_dtypes  # noqa: F401  (bf16 arrays need it: fail here with the install hint)
    except ImportError as e:
        raise UserError(f"the cuda device needs the GPU extras: pip install -e '.[cuda]' ({e.name} is missing)") from None
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver, or no device
        raise UserError(f"no usable NVIDIA GPU: {e}") from None
    if n < 1:
        raise UserError("no NVIDIA GPU found: use --device cpu")
    return cupy


def bf16_dtype():
    import ml_dtypes
    import numpy as np
    return np.dtype(ml_dtypes.bfloat16)


CTYPE = {"fp32": "float", "bf16": "__nv_bfloat16"}


def _source(name: str) -> str:
    common = (KERNELS / "common.cuh").read_text()
    src = (KERNELS / f"{name}.cu").read_text()
    return src.replace('#include "common.cuh"', common.replace("#pragma once", ""))


_GLOBAL = r"__global__ void (?:__launch_bounds__\([^)]*\)\s*)?(\w+)\("  # a kernel's name, launch bounds or not


def kernel_names(src: str) -> tuple[list[str], list[str]]:
    """(the template <class T> kernels, the plain ones) a .cu source defines."""
    templated = re.findall(r"template <class T>\s*" + _GLOBAL, src)
    return templated, [k for k in re.findall(_GLOBAL, src) if k not in templated]


@functools.lru_cache(maxsize=None)
def module(name: str, dtype: str):
    """The kernels of kernels/`name`.cu compiled for `dtype` ('fp32' or 'bf16'), one attribute per kernel."""
    cupy = import_cupy()
    src = _source(name)
    templated, plain = kernel_names(src)
    exprs = [f"{k}<{CTYPE[dtype]}>" for k in templated]
    cc = cupy.cuda.Device().compute_capability
    mod = cupy.RawModule(code=src, options=("-std=c++17", f"-arch=sm_{cc}"), name_expressions=exprs + plain)
    return _Kernels(mod, dtype, templated, plain)


class _Kernels:
    def __init__(self, mod, dtype, templated, plain):
        self._fns = {k: mod.get_function(f"{k}<{CTYPE[dtype]}>") for k in templated}
        self._fns.update({k: mod.get_function(k) for k in plain})

    def __getattr__(self, name):
        try:
            return self._fns[name]
        except KeyError:
            raise AttributeError(name) from None


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b
