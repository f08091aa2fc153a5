"""Backends supply the layer ops and the memory; a family's model code (models/<family>.py) is written once over
them, against the op set that ops.py declares.

`get_backend("cpu")` gives the NumPy reference; `get_backend("cuda")` the GPU one (imported only when asked for,
so the CPU path never touches CuPy)."""
from ..errors import UserError


def cuda_available() -> bool:
    try:
        import cupy  # noqa: F401
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise UserError(f"unknown device {device!r}: use cpu, cuda or auto")
    return device


def get_backend(device: str = "cpu", dtype: str = "fp32", device_id: int | None = None):
    """device_id: which GPU (data parallelism: the process's local rank). dtype "fp8": the GPU's bf16 backend (the
    CPU's fp32 one) whose registered block products run on FP8 operands (backends/fp8.py; the CPU emulates them)."""
    device = resolve_device(device)
    fp8 = dtype == "fp8"
    if device == "cpu":
        from .cpu import CPUBackend
        return CPUBackend("fp32" if fp8 else dtype, fp8=fp8)
    from .cuda import CUDABackend  # deferred: keeps CuPy off the CPU path
    return CUDABackend("bf16" if fp8 else dtype, device_id=device_id, fp8=fp8)
