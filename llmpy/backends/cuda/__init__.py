"""The CUDA backend (imported only for --device cuda): CuPy arrays, our NVRTC kernels (kernels/<stem>.cu, one per
layer family, the stem that of its NumPy twin in llmpy/layers/), cuBLASLt matrix products, cuDNN flash attention."""
from .backend import CUDABackend

__all__ = ["CUDABackend"]
