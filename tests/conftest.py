import os
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # lets tests import the PyTorch oracles from benchmarks/ and the probes from dev/
    sys.path.insert(0, str(ROOT))
# every CUDA graph capture checks that it frees nothing it allocated (CudaBackend.capture)
os.environ.setdefault("LLMPY_CHECK_CAPTURE", "1")


def pytest_collection_modifyitems(config, items):
    from llmpy.backends import cuda_available
    if cuda_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU with the [cuda] extras")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
