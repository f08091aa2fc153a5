"""Every kernels/*.cu family compiles with NVRTC for both storage types. Needs no GPU: runs wherever cuda-bindings'
NVRTC and the CUDA headers are installed, from a CUDA toolkit or from pip (`cuda-bindings`, `nvidia-cuda-nvrtc`,
`nvidia-cuda-runtime`, as .ci/run installs them); skipped otherwise. NVRTC runs in a child process: loaded into the
test process on a machine without a GPU it was seen to corrupt later, unrelated JSON parsing in threads."""
import glob
import json
import os
import subprocess
import sys

import pytest

from llmpy.backends.cuda.runtime import KERNELS

pytestmark = pytest.mark.slow  # NVRTC compiles every kernel family twice: ~10 s

def _include_dirs() -> list[str]:
    """CUDA header folders holding cuda_bf16.h: pip's nvidia-cuda-runtime (nvidia/cu*/include), then toolkits."""
    try:
        import nvidia
        pip_dirs = [d for p in nvidia.__path__ for d in sorted(glob.glob(os.path.join(p, "cu*", "include")))]
    except ImportError:
        pip_dirs = []
    return [d for d in pip_dirs + sorted(glob.glob("/usr/local/cuda*/include"))
            if os.path.exists(os.path.join(d, "cuda_bf16.h"))]


INCLUDES = _include_dirs()
FAMILIES = sorted(p.stem for p in KERNELS.glob("*.cu"))
DTYPES = ["fp32", "bf16"]

COMPILE_ALL = r"""
import json, re, sys
import cuda.bindings.nvrtc as nvrtc
from llmpy.backends.cuda.runtime import CTYPE, _source, kernel_names
include, families, dtypes = sys.argv[1], sys.argv[2].split(","), sys.argv[3].split(",")
out = {}
for family in families:
    src = _source(family)
    templated, plain = kernel_names(src)
    for dtype in dtypes:
        err, prog = nvrtc.nvrtcCreateProgram(src.encode(), f"{family}.cu".encode(), 0, [], [])
        for e in [f"{k}<{CTYPE[dtype]}>" for k in templated] + plain:
            nvrtc.nvrtcAddNameExpression(prog, e.encode())
        opts = [b"-std=c++17", b"-arch=sm_90", f"-I{include}".encode()]
        res = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)[0]
        _, n = nvrtc.nvrtcGetProgramLogSize(prog)
        log = b" " * n
        nvrtc.nvrtcGetProgramLog(prog, log)
        out[f"{family}:{dtype}"] = {"ok": res == nvrtc.nvrtcResult.NVRTC_SUCCESS,
                                    "log": log.decode(errors="replace"), "kernels": len(templated) + len(plain),
                                    "inlined": '#include "common.cuh"' not in src}
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled():
    required = os.environ.get("LLMPY_REQUIRE_NVRTC") == "1"  # CI sets it: a missing NVRTC fails, never skips
    try:
        import cuda.bindings.nvrtc  # noqa: F401
    except ImportError as e:
        (pytest.fail if required else pytest.skip)(f"NVRTC not installed: {e}")
    if not INCLUDES:
        (pytest.fail if required else pytest.skip)("no CUDA headers (cuda_bf16.h) found")
    p = subprocess.run([sys.executable, "-c", COMPILE_ALL, INCLUDES[0], ",".join(FAMILIES), ",".join(DTYPES)],
                       capture_output=True, text=True, timeout=600)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert p.returncode == 0 and line, p.stderr[-3000:]
    return json.loads(line[-1][7:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_nvrtc_compiles(compiled, family, dtype):
    r = compiled[f"{family}:{dtype}"]
    assert r["inlined"], "common.cuh was not inlined"
    assert r["kernels"] > 0, f"{family}.cu defines no kernel"
    assert r["ok"], r["log"]
