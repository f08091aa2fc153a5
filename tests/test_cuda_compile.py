"""Every .cu kernel family compiles with NVRTC for both storage types (needs no GPU: runs wherever
cuda-bindings' NVRTC and the CUDA headers are installed; skipped otherwise, e.g. in CI)."""
import glob
import os
import re

import pytest

nvrtc = pytest.importorskip("cuda.bindings.nvrtc")
from llmpy.backends.cuda.runtime import CTYPE, HERE, _source  # noqa: E402

INCLUDES = [d for d in glob.glob("/usr/local/cuda*/include") if os.path.exists(os.path.join(d, "cuda_bf16.h"))]
FAMILIES = sorted(p.stem for p in HERE.glob("*.cu"))


@pytest.mark.skipif(not INCLUDES, reason="no CUDA headers (cuda_bf16.h) found")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_nvrtc_compiles(family, dtype):
    src = _source(family)
    templated = re.findall(r"template <class T>\s*__global__ void (\w+)\(", src)
    plain = [k for k in re.findall(r"__global__ void (\w+)\(", src) if k not in templated]
    err, prog = nvrtc.nvrtcCreateProgram(src.encode(), f"{family}.cu".encode(), 0, [], [])
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS
    for e in [f"{k}<{CTYPE[dtype]}>" for k in templated] + plain:
        nvrtc.nvrtcAddNameExpression(prog, e.encode())
    opts = [b"-std=c++17", b"-arch=sm_90", f"-I{INCLUDES[0]}".encode()]
    res = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)[0]
    _, n = nvrtc.nvrtcGetProgramLogSize(prog)
    log = b" " * n
    nvrtc.nvrtcGetProgramLog(prog, log)
    assert res == nvrtc.nvrtcResult.NVRTC_SUCCESS, log.decode()
