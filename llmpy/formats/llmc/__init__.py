"""llm.c's model checkpoint files (`gpt2_124M.bin`, `gpt2_124M_bf16.bin`), bit-compatible with llm.c.

Layout: 256 little-endian int32 header words (a magic number that names the family, a version, the family's
sizes), the family's extra header bytes if any (Llama 3's float32 fields), then the file's tensors, contiguous, as
float32 (version 3) or bf16 bits (version 5, every tensor including the norms). The family's codec
(formats/llmc/<family>.py) parses and makes the header and may give the file its own tensor list (`layout`,
`to_file`, `from_file`: Llama 3's files carry zero biases and no vocabulary padding); by default the file holds
the spec's tensors in spec order.
"""
from __future__ import annotations

import importlib
import math
import os

import numpy as np

from ...config import family_of
from ...errors import UserError
from ...paths import open_input
from .. import check_params
from ..atomic import atomic_write
from ..bf16 import bf16_bits_to_fp32, fp32_to_bf16_bits

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
VERSIONS = {"fp32": 3, "bf16": 5}  # dtype name -> header version
_ITEMSIZE = {3: 4, 5: 2}
CODECS = {20240326: "gpt2", 20240803: "llama3"}  # magic -> the family whose codec is formats/llmc/<family>.py


def _codec(family: str):
    if family not in CODECS.values():
        raise UserError(f"llm.c has no model file format for the {family} family")
    return importlib.import_module(f"{__name__}.{family}")


def is_llmc_model(path: str | os.PathLike) -> bool:
    """True if `path` is a readable file starting with one of llm.c's model magics (the rest is not checked)."""
    try:
        with open_input(path) as f:
            head = f.read(4)
    except (UserError, OSError):
        return False
    return len(head) == 4 and int.from_bytes(head, "little", signed=True) in CODECS


def read_llmc_model(path: str | os.PathLike):
    """Read an llm.c model file: (config, params). bf16 files are converted to float32. The returned tensors are
    views into one contiguous float32 buffer, in the family's spec order."""
    with open_input(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size < HEADER_BYTES:
            what = "is empty" if size == 0 else f"is too short ({size} bytes)"
            raise UserError(f"{path} {what}: not an llm.c model (its header alone is {HEADER_BYTES} bytes)")
        h = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4").astype(np.int64)
        if int(h[0]) not in CODECS:
            raise UserError(f"{path} is not an llm.c model: bad magic {h[0]} (want one of "
                            f"{', '.join(map(str, CODECS))})")
        codec = _codec(CODECS[int(h[0])])
        extra_bytes = getattr(codec, "EXTRA_BYTES", 0)
        extra = f.read(extra_bytes)
        if len(extra) < extra_bytes:
            raise UserError(f"{path} is too short ({size} bytes) for its {HEADER_BYTES + extra_bytes}-byte header")
        cfg, version = codec.parse_header(path, h, extra, _ITEMSIZE)
        tensors = _layout(codec, cfg)
        itemsize = _ITEMSIZE[version]
        n = sum(math.prod(shape) for _, shape in tensors)
        want = HEADER_BYTES + extra_bytes + n * itemsize
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
    for name, shape in tensors:
        k = math.prod(shape)
        params[name] = flat[off:off + k].reshape(shape)
        off += k
    if hasattr(codec, "from_file"):
        cfg, params = codec.from_file(path, cfg, params)
        params = check_params(cfg, params, str(path))
    return cfg, params


def _layout(codec, cfg) -> list[tuple[str, tuple[int, ...]]]:
    """The file's tensors in order: the codec's own list, or the spec's."""
    if hasattr(codec, "layout"):
        return codec.layout(cfg)
    return [(s.name, tuple(s.shape)) for s in family_of(cfg).spec(cfg)]


def write_llmc_model(path: str | os.PathLike, cfg, params: dict[str, np.ndarray], dtype: str = "fp32") -> None:
    """Write `params` (float32, shapes from `cfg`) atomically as an llm.c model file; `dtype` "fp32" (version 3)
    or "bf16" (version 5, rounded to nearest even)."""
    if dtype not in VERSIONS:
        raise UserError(f"cannot write {path}: llm.c model dtype must be fp32 or bf16, not {dtype!r}")
    codec = _codec(type(cfg).family)
    params = check_params(cfg, params, f"cannot write {path}")
    if hasattr(codec, "to_file"):
        params = codec.to_file(cfg, params)
    words, extra = codec.header(cfg, VERSIONS[dtype])
    h = np.zeros(HEADER_INTS, dtype="<i4")
    h[:len(words)] = words
    tensors = [np.ascontiguousarray(params[name], np.float32) for name, _ in _layout(codec, cfg)]

    def write(f) -> None:
        f.write(h.tobytes())
        f.write(extra)
        for a in tensors:
            a = a if dtype == "fp32" else fp32_to_bf16_bits(a)
            f.write(a.reshape(-1).view(np.uint8).data)

    atomic_write(path, write)
