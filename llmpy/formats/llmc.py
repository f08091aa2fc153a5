"""llm.c's model checkpoint (`gpt2_124M.bin`, `gpt2_124M_bf16.bin`), bit-compatible with llm.c.

Layout: 256 little-endian int32 header words, then the 16 parameter tensors of `param_shapes(cfg)` in that
order, contiguous, as float32 (version 3) or bf16 bits (version 5, every tensor including the LayerNorms).
Header: [0]=20240326 magic, [1]=version, [2]=maxT, [3]=V, [4]=L, [5]=NH, [6]=C, [7]=Vp, rest zero.
Version 1 was the same without a padded vocabulary (no header[7], wte of V rows); llm.c itself no longer reads
it and neither do we: we reject it rather than guess, as we reject a version 3/5 header whose Vp is 0.
"""
from __future__ import annotations

import math
import os

import numpy as np

from ..config import GPT2Config, param_shapes
from ..errors import UserError
from . import check_params
from .atomic import atomic_write
from .bf16 import bf16_bits_to_fp32, fp32_to_bf16_bits

MAGIC = 20240326
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
VERSIONS = {"fp32": 3, "bf16": 5}  # dtype name -> header version
_ITEMSIZE = {3: 4, 5: 2}


def is_llmc_model(path: str | os.PathLike) -> bool:
    """True if `path` is a readable file starting with llm.c's model magic (the rest is not checked)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return len(head) == 4 and int.from_bytes(head, "little", signed=True) == MAGIC


def read_llmc_model(path: str | os.PathLike) -> tuple[GPT2Config, dict[str, np.ndarray]]:
    """Read an llm.c model file. bf16 files are converted to float32. The returned tensors are views into one
    contiguous float32 buffer of `cfg.num_params()` elements, in llm.c order."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise UserError(f"{path} not found") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size < HEADER_BYTES:
            what = "is empty" if size == 0 else f"is too short ({size} bytes)"
            raise UserError(f"{path} {what}: not an llm.c model (its header alone is {HEADER_BYTES} bytes)")
        h = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4").astype(np.int64)
        cfg, version = _parse_header(path, h)
        itemsize = _ITEMSIZE[version]
        n = cfg.num_params()
        want = HEADER_BYTES + n * itemsize
        if size < want:
            raise UserError(f"{path} is truncated: {size} bytes, its header implies {want} "
                            f"({n} parameters of {itemsize} bytes)")
        if size > want:
            raise UserError(f"{path} has {size - want} trailing bytes after the parameters: not a valid llm.c model")
        raw = np.empty(n, dtype=np.float32 if itemsize == 4 else np.uint16)
        if f.readinto(raw.view(np.uint8)) != raw.nbytes:
            raise UserError(f"{path} is truncated (it changed while being read)")
    flat = raw if itemsize == 4 else bf16_bits_to_fp32(raw)
    params, off = {}, 0
    for name, shape in param_shapes(cfg):
        k = math.prod(shape)
        params[name] = flat[off:off + k].reshape(shape)
        off += k
    return cfg, params


def _parse_header(path: str | os.PathLike, h: np.ndarray) -> tuple[GPT2Config, int]:
    if h[0] != MAGIC:
        raise UserError(f"{path} is not an llm.c model: bad magic {h[0]} (want {MAGIC})")
    version = int(h[1])
    if version == 1:
        raise UserError(f"{path} is an llm.c model of version 1 (before the padded vocabulary), which llm.c no "
                        "longer reads either; re-export it with a current llm.c train_gpt2.py")
    if version not in _ITEMSIZE:
        raise UserError(f"{path}: unsupported llm.c model version {version} (want 3 = fp32 or 5 = bf16)")
    maxT, V, L, NH, C, Vp = (int(x) for x in h[2:8])
    sizes = {"maxT": maxT, "V": V, "L": L, "NH": NH, "C": C}
    bad = [f"{k}={v}" for k, v in sizes.items() if v <= 0]
    if bad:
        raise UserError(f"{path}: llm.c header has non-positive sizes: {', '.join(bad)}")
    if Vp == 0:
        raise UserError(f"{path}: llm.c header (version {version}) has padded vocab size 0; "
                        "files of this version always record it, so the file is damaged")
    if Vp < V:
        raise UserError(f"{path}: llm.c header has padded vocab size {Vp} < vocab size {V}")
    if C % NH:
        raise UserError(f"{path}: llm.c header has channels {C} not divisible by heads {NH}")
    cfg = GPT2Config(max_seq_len=maxT, vocab_size=V, padded_vocab_size=Vp, num_layers=L, num_heads=NH, channels=C)
    return cfg, version


def write_llmc_model(path: str | os.PathLike, cfg: GPT2Config, params: dict[str, np.ndarray],
                     dtype: str = "fp32") -> None:
    """Write `params` (float32, shapes from `cfg`) atomically as an llm.c model file; `dtype` "fp32" (version 3)
    or "bf16" (version 5, rounded to nearest even)."""
    if dtype not in VERSIONS:
        raise UserError(f"cannot write {path}: llm.c model dtype must be fp32 or bf16, not {dtype!r}")
    params = check_params(cfg, params, f"cannot write {path}")
    h = np.zeros(HEADER_INTS, dtype="<i4")
    h[:8] = [MAGIC, VERSIONS[dtype], cfg.max_seq_len, cfg.vocab_size, cfg.num_layers, cfg.num_heads,
             cfg.channels, cfg.padded_vocab_size]

    def write(f) -> None:
        f.write(h.tobytes())
        for name, _ in param_shapes(cfg):
            a = params[name] if dtype == "fp32" else fp32_to_bf16_bits(params[name])
            f.write(a.reshape(-1).view(np.uint8).data)

    atomic_write(path, write)
