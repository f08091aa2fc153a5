"""The safetensors format, read and written with our own code (no `safetensors` package, no pickle).

Layout: an 8-byte little-endian u64 N, then N bytes of UTF-8 JSON, then the data. The JSON maps each tensor
name to {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]} (byte offsets relative to the start of
the data) and may hold "__metadata__": {str: str}. Tensors are packed without gaps and cover the data exactly;
the header is padded with spaces so the data starts 8-byte aligned. All numbers are little-endian.

BF16 has no NumPy dtype, so it travels as uint16 bits (see `bf16.py`): write it with
`save_safetensors(path, tensors, bf16={"name": u16_bits})`; `load_safetensors` returns it as float32 by
default, or as the raw uint16 bits with `bf16_as_fp32=False`.

Integrity: files llmpy writes for itself carry `__metadata__["llmpy.crc32"]`, a JSON object mapping every tensor
name to the CRC-32 (8 hex digits) of its stored bytes, and "__metadata__" to the CRC-32 of the other metadata
entries (canonical JSON: sorted keys, no spaces). Readers verify what they read and report a mismatch as damage,
naming the tensor; the key is not returned with the metadata. CRC-32, not a cryptographic hash: it guards against
flipped or lost bits (disk, copy), not against tampering (whoever edits the data can edit the table beside it),
and zlib's runs at twice sha256's speed. Files without the key (older checkpoints, other tools' files) load
unverified. HF exports leave it out (`checksums=False`) so that they stay plain files for other tools.
"""
from __future__ import annotations

import json
import math
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable

import numpy as np

from ..errors import UserError
from ..paths import open_input
from . import crc32
from .atomic import atomic_write
from .bf16 import bf16_bits_to_fp32

MAX_HEADER_BYTES = 100_000_000  # the reference implementation's limit: anything larger is not a real header
CHECKSUMS = "llmpy.crc32"        # the metadata key of the checksum table
_META = "__metadata__"           # its entry for the other metadata
_WORKERS = min(8, os.cpu_count() or 1)  # threads computing CRCs (zlib releases the GIL)

# safetensors dtype name -> little-endian NumPy dtype of the stored bytes (BF16 as its uint16 bits)
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
# NumPy kind+itemsize -> safetensors name, for writing (uint16 means U16; BF16 goes through `bf16=`)
_NAME_OF = {(d.kind, d.itemsize): n for n, d in DTYPES.items() if n != "BF16"}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str              # safetensors dtype name, e.g. "F32"
    shape: tuple[int, ...]
    begin: int              # byte offsets relative to the start of the data
    end: int


def save_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray],
                     metadata: dict[str, str] | None = None, *, bf16: dict[str, np.ndarray] | None = None,
                     checksums: bool = True) -> None:
    """Write `tensors` (and BF16 tensors given as uint16 bits in `bf16`) atomically to `path`, with the CRC-32
    table in the metadata unless `checksums` is False."""
    entries: list[tuple[str, str, np.ndarray]] = []  # (name, safetensors dtype, little-endian contiguous array)
    for name, a in tensors.items():
        a = np.asarray(a)
        st = _NAME_OF.get((a.dtype.kind, a.dtype.itemsize))
        if st is None:
            raise UserError(f"cannot write {path}: tensor {name!r} has unsupported dtype {a.dtype}")
        entries.append((name, st, a))
    for name, a in (bf16 or {}).items():
        a = np.asarray(a)
        if a.dtype != np.uint16:
            raise UserError(f"cannot write {path}: BF16 tensor {name!r} must be given as uint16 bits, got {a.dtype}")
        if name in tensors:
            raise UserError(f"cannot write {path}: tensor {name!r} given both as a tensor and as BF16")
        entries.append((name, "BF16", a))
    for name, _, _ in entries:
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise UserError(f"cannot write {path}: bad tensor name {name!r}")
    if metadata and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise UserError(f"cannot write {path}: metadata keys and values must all be strings")
    if metadata and CHECKSUMS in metadata:
        raise UserError(f"cannot write {path}: the metadata key {CHECKSUMS!r} is reserved for the checksums")

    # Widest dtypes first: every tensor's size is a multiple of its itemsize, so each one starts aligned.
    entries.sort(key=lambda e: -DTYPES[e[1]].itemsize)
    # not ascontiguousarray: it makes 0-d arrays 1-d
    arrays = [np.require(a, dtype=DTYPES[st], requirements="C") for _, st, a in entries]
    meta = dict(metadata or {})
    if checksums:
        crcs = {name: f"{c:08x}" for (name, _, _), c in zip(entries, _crc32_all(arrays))}
        meta[CHECKSUMS] = json.dumps(crcs | {_META: _meta_crc(meta)}, separators=(",", ":"))
    header: dict = {"__metadata__": meta} if meta else {}
    offset = 0
    for (name, st, _), a in zip(entries, arrays):
        header[name] = {"dtype": st, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    hbytes = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    hbytes += b" " * (-len(hbytes) % 8)

    def write(f: BinaryIO) -> None:
        f.write(len(hbytes).to_bytes(8, "little"))
        f.write(hbytes)
        for a in arrays:
            f.write(a.reshape(-1).view(np.uint8).data)

    atomic_write(path, write)


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate the header only (cheap: reads no tensor data). Returns (tensors, metadata)."""
    with _open(path) as f:
        infos, meta, _, _ = _read_header(f, Path(path))
    return infos, meta


def load_safetensors(path: str | os.PathLike, *, bf16_as_fp32: bool = True, names: Iterable[str] | None = None
                     ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a safetensors file into fresh (writable, non-aliasing) arrays. Returns (tensors, metadata).

    BF16 tensors come back as float32 (or their uint16 bits if `bf16_as_fp32=False`). `names` restricts
    loading to those tensors (each must exist)."""
    path = Path(path)
    with _open(path) as f, ThreadPoolExecutor(_WORKERS) as pool:
        infos, meta, data_start, crcs = _read_header(f, path)
        wanted = list(infos) if names is None else list(names)
        for n in wanted:
            if n not in infos:
                raise UserError(f"{path} has no tensor {n!r}")
        out: dict[str, np.ndarray] = {}
        pending = []  # (name, its chunks' CRCs): each chunk is checksummed on the pool while the next is read
        for n in sorted(wanted, key=lambda n: infos[n].begin):  # sequential reads
            info = infos[n]
            raw = DTYPES[info.dtype]
            try:
                a = np.empty(info.shape, dtype=np.uint8 if info.dtype == "BOOL" else raw)
            except ValueError:  # an empty tensor with an absurd dimension, e.g. (0, 2**62)
                raise UserError(f"{path}: tensor {n!r} has an absurd shape {info.shape}") from None
            f.seek(data_start + info.begin)
            buf, parts = a.reshape(-1).view(np.uint8), []
            for i in range(0, buf.nbytes, crc32.CHUNK):
                piece = buf[i:i + crc32.CHUNK]
                if f.readinto(piece) != piece.nbytes:
                    raise UserError(f"{path} is truncated: tensor {n!r} ends past the end of the file")
                if crcs is not None:
                    parts += crc32.chunks(pool, piece)
            pending.append((n, parts))
            if info.dtype == "BOOL":
                if a.size and a.max() > 1:
                    raise UserError(f"{path}: BOOL tensor {n!r} holds bytes other than 0 and 1")
                a = a.view(np.bool_)
            elif info.dtype == "BF16" and bf16_as_fp32:
                a = bf16_bits_to_fp32(a)
            out[n] = a
        for n, parts in pending if crcs is not None else []:
            if f"{crc32.join(parts):08x}" != crcs[n]:
                raise UserError(f"{path} is damaged: tensor {n!r} fails its CRC-32 check (its bytes changed "
                                "after the file was written); use another copy")
    return out, meta


def _open(path: str | os.PathLike) -> BinaryIO:
    return open_input(path)


def _read_header(f: BinaryIO, path: Path):
    """Validate everything the header claims against itself and the file size (and the metadata against its
    checksum). Returns (infos, meta, data_start, the tensors' stored CRC-32s or None when the file has none)."""
    size = os.fstat(f.fileno()).st_size
    if size < 8:
        raise UserError(f"{path} is not a safetensors file: only {size} bytes, too short for the 8-byte header size")
    n = int.from_bytes(f.read(8), "little")
    if n > MAX_HEADER_BYTES or n > size - 8:
        raise UserError(f"{path} is not a safetensors file: header size {n} is absurd for a {size}-byte file")
    try:
        header = json.loads(f.read(n).decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path} is not a safetensors file: header is not valid JSON ({e})") from None
    except RecursionError:
        raise UserError(f"{path} is not a safetensors file: header JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise UserError(f"{path} is not a safetensors file: header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise UserError(f"{path}: __metadata__ must map strings to strings")
    infos = {name: _parse_entry(path, name, e) for name, e in header.items()}

    data_len = size - 8 - n
    pos = 0
    for name, info in sorted(infos.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if info.begin < pos:
            raise UserError(f"{path}: tensor {name!r} overlaps the previous tensor (offset {info.begin} < {pos})")
        if info.begin > pos:
            raise UserError(f"{path}: gap before tensor {name!r} (offset {info.begin}, expected {pos})")
        pos = info.end
    if pos > data_len:
        raise UserError(f"{path} is truncated: tensors need {pos} data bytes, the file has {data_len}")
    if pos < data_len:
        raise UserError(f"{path} has {data_len - pos} trailing bytes after the last tensor")
    return infos, meta, 8 + n, _checksums(path, meta, infos)


def _checksums(path: Path, meta: dict[str, str], infos: dict[str, TensorInfo]) -> dict[str, str] | None:
    """Pops the checksum table from `meta`, checks its form and the metadata's CRC; the tensors' CRCs or None."""
    if CHECKSUMS not in meta:
        return None
    damaged = f"{path} is damaged: its checksum table"
    try:
        table = json.loads(meta.pop(CHECKSUMS))
    except (ValueError, RecursionError):
        raise UserError(f"{damaged} is not valid JSON") from None
    if not (isinstance(table, dict) and all(isinstance(v, str) and len(v) == 8 for v in table.values())):
        raise UserError(f"{damaged} is not a JSON object of 8-digit hex strings")
    if set(table) != set(infos) | {_META}:
        odd = sorted(set(table) ^ (set(infos) | {_META}))
        raise UserError(f"{damaged} does not list the file's tensors (differs in {', '.join(map(repr, odd[:3]))})")
    if table.pop(_META) != _meta_crc(meta):
        raise UserError(f"{path} is damaged: its metadata fails its CRC-32 check (changed after the file was "
                        "written); use another copy")
    return table


def _crc32_all(arrays: list[np.ndarray]) -> list[int]:
    with ThreadPoolExecutor(_WORKERS) as pool:
        parts = [crc32.chunks(pool, a.reshape(-1).view(np.uint8)) for a in arrays]
        return [crc32.join(p) for p in parts]


def _meta_crc(meta: dict[str, str]) -> str:
    text = json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return f"{zlib.crc32(text.encode('utf-8')):08x}"



def _parse_entry(path: Path, name: str, e: object) -> TensorInfo:
    def bad(why: str) -> UserError:
        return UserError(f"{path}: tensor {name!r} {why}")

    if not isinstance(e, dict):
        raise bad("has a header entry that is not a JSON object")
    dtype, shape, offs = e.get("dtype"), e.get("shape"), e.get("data_offsets")
    if dtype not in DTYPES:
        raise bad(f"has unknown or unsupported dtype {dtype!r} (supported: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise bad(f"has a bad shape {shape!r} (want a list of non-negative integers)")
    if not (isinstance(offs, list) and len(offs) == 2 and all(_is_uint(o) for o in offs) and offs[0] <= offs[1]):
        raise bad(f"has bad data_offsets {offs!r} (want [begin, end] with 0 <= begin <= end)")
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if offs[1] - offs[0] != nbytes:
        raise bad(f"spans {offs[1] - offs[0]} bytes but {dtype} {tuple(shape)} needs {nbytes}")
    return TensorInfo(dtype, tuple(shape), offs[0], offs[1])


def _is_uint(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    """`object_pairs_hook` for json.loads: a key given twice is an error (which one counts would be a guess)."""
    d = dict(pairs)
    if len(d) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {dup!r}")
    return d
