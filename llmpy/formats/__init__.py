"""File formats, all read without running code (no pickle) and written atomically:

- `llmc`        llm.c model checkpoint (`gpt2_124M.bin`, fp32 version 3 / bf16 version 5)
- `safetensors` our own reader/writer of the safetensors format
- `hf`          Hugging Face GPT-2 weights (`model.safetensors` + `config.json`), from/to local files
- `checkpoint`  our training state (weights, AdamW moments, step/loader/RNG state) in one safetensors file,
                and `load_weights`, which recognizes all three weight formats
- `bf16`, `atomic`  helpers: bfloat16 bits <-> float32, atomic file replacement
"""
from __future__ import annotations

import numpy as np

from ..config import GPT2Config, param_shapes
from ..errors import UserError


def check_params(cfg: GPT2Config, params: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """The parameters as C-contiguous float32 in `param_shapes(cfg)` order; UserError (mentioning `where`)
    if a tensor is missing, unexpected, not floating point, or of the wrong shape."""
    shapes = dict(param_shapes(cfg))
    missing = [n for n in shapes if n not in params]
    extra = [n for n in params if n not in shapes]
    if missing or extra:
        raise UserError(f"{where}: parameters do not match the config"
                        + (f"; missing {', '.join(missing)}" if missing else "")
                        + (f"; unexpected {', '.join(map(str, extra))}" if extra else ""))
    out = {}
    for name, shape in shapes.items():
        a = np.asarray(params[name])
        if a.shape != shape:
            raise UserError(f"{where}: parameter {name} has shape {a.shape}, the config implies {shape}")
        if a.dtype.kind != "f":
            raise UserError(f"{where}: parameter {name} has dtype {a.dtype}, want float32")
        out[name] = np.ascontiguousarray(a, dtype=np.float32)
    return out
