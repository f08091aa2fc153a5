"""The CUDA backend (imported only for --device cuda): CuPy arrays, our NVRTC kernels (one .cu per layer family
next to this package's wrappers), cuBLASLt matrix products, cuDNN flash attention."""
from .backend import CUDABackend

__all__ = ["CUDABackend"]
