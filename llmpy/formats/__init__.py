"""File formats, all read without running code (no pickle) and written atomically:

- `llmc/`       llm.c model checkpoints (`gpt2_124M.bin`, fp32 version 3 / bf16 version 5); a header codec per family
- `hf/`         Hugging Face weights (`model.safetensors` or a sharded index + `config.json`), from/to local files
                (an export also gets the tokenizer and generation config); a codec per family
- `hub`         Hugging Face Hub downloads into the cache (`gpt2`, `hf:owner/name`): resumable, sha256-checked
- `safetensors` our own reader/writer of the safetensors format, with per-tensor CRC-32s in the files we write
- `checkpoint`  our training state (weights, AdamW moments, step/loader/RNG state) in one safetensors file,
                and `load_weights`, which recognizes all three weight formats and Hub names
- `bf16`, `atomic`  helpers: bfloat16 bits <-> float32, atomic file replacement

Tensor names, shapes and order come from the family's parameter spec (models/<family>.py); nothing here lists them.
"""
from __future__ import annotations

import numpy as np

from ..config import family_of
from ..errors import UserError


def check_params(cfg, params: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """The parameters as C-contiguous float32 in the spec's order; UserError (mentioning `where`) if a tensor is
    missing, unexpected, not floating point, or of the wrong shape."""
    shapes = {s.name: tuple(s.shape) for s in family_of(cfg).spec(cfg)}
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
