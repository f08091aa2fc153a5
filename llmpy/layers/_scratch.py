import numpy as np


def buf(scratch, shape, dtype) -> np.ndarray:
    """A view of `scratch` (any contiguous array with enough elements) shaped `shape`, or a new array."""
    if scratch is None:
        return np.empty(shape, dtype)
    n = int(np.prod(shape))
    flat = scratch.reshape(-1)
    if flat.size < n or flat.dtype != dtype:
        raise ValueError(f"scratch of {flat.size} {flat.dtype} too small for {shape} {np.dtype(dtype)}")
    return flat[:n].reshape(shape)
