"""Packed ternary models (`llmpy convert --to ternary`): a MatMul-free LM for inference, each BitLinear weight stored
as the ternary codes it computes with plus its one scale, quantized once from the latent weights and never again
(re-quantizing a dequantized Wq shrinks it: the reference's users hit this, matmulfreellm#18).

File: our safetensors (CRC-32 per tensor), metadata {"format": "llmpy-ternary", "version", "family", "config",
"packing"}. For each ternary weight `X` of shape (..., N, K) (per-layer ones stacked: (L, N, K)):
  X.codes  uint8 (..., N, ceil(K / per_byte)): the codes of q_w in {-1, 0, 1} along K, little end first;
           packing "base3": 5 per byte, byte = sum_j (q_j + 1) 3^j (<= 242); "2bit": 4 per byte, 2 bits each,
           0 -> 0, 1 -> +1, 3 -> -1 (2 is invalid); the padding at the end of a row codes 0
  X.scale  float32 (...,): s_w, so that Wq = q_w / s_w (the product is (q_x q_w^T) / (s_x s_w))
An LM head keeps only the real vocabulary's rows. The token embedding is stored as bf16 (the released checkpoints'
precision; the one lossy step for fp32-trained weights), every other tensor (norm gains, lower bounds) as float32.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from ..config import config_from_dict, family_of
from ..errors import UserError
from ..layers.bitlinear import CODES, PER_BYTE, unpack_codes
from .bf16 import fp32_to_bf16_bits
from .safetensors import load_safetensors, save_safetensors

FORMAT = "llmpy-ternary"
VERSION = 1
_POW3 = 3 ** np.arange(5, dtype=np.int32)
INVALID = {k: (v == 2).any(axis=1) for k, v in CODES.items()}  # bytes that are no packing's codes
# the scales quantize_weight can give: s_w = 1 / max(mean |w|, 1e-5) is at most 1e5; at least 1e-3 is a mean |w| of
# 1000, far past any trained latent weight (they start at 0.02); outside this range a file is damaged, and its
# products overflow into garbage text
SCALES = (1e-3, 1e5)


@dataclass
class PackedTernary:
    """One ternary weight, packed: codes uint8 (..., N, nbytes), scale float32 (...,) = s_w, K its columns."""
    codes: np.ndarray
    scale: np.ndarray
    K: int
    packing: str

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.codes.shape[:-1], self.K)

    def unpack(self) -> np.ndarray:
        """q_w as int8 (..., N, K)."""
        return unpack_codes(self.codes, self.K, self.packing)


def pack(q: np.ndarray, packing: str = "base3") -> np.ndarray:
    """Codes uint8 (..., ceil(K / per_byte)) of q (..., K) in {-1, 0, 1}."""
    if packing not in PER_BYTE:
        raise UserError(f"unknown ternary packing {packing!r}: choose base3 (5 per byte) or 2bit (4 per byte)")
    n = PER_BYTE[packing]
    K = q.shape[-1]
    pad = np.zeros((*q.shape[:-1], -K % n), np.int32)
    d = np.concatenate([q.astype(np.int32), pad], axis=-1).reshape(*q.shape[:-1], -1, n)
    if packing == "2bit":
        return ((d & 3) << (2 * np.arange(4))).sum(-1).astype(np.uint8)
    return ((d + 1) * _POW3).sum(-1).astype(np.uint8)


def quantize(w: np.ndarray, rows: int | None = None) -> tuple[np.ndarray, np.float32]:
    """(q_w int8, s_w as float32) of one latent weight, as BitLinear computes them (layers/bitlinear.py)."""
    from ..layers.bitlinear import quantize_weight
    q, s = quantize_weight(np.asarray(w, np.float32), rows)
    return q.astype(np.int8), np.float32(s)


def write_ternary(path: str | os.PathLike, cfg, params: dict[str, np.ndarray], packing: str = "base3") -> dict:
    """Packs a MatMul-free model's latent weights into `path` (atomic). Returns {"bytes": the tensors' bytes,
    "fp32_bytes": the same weights' in fp32, vocabulary padding left out}."""
    from .. import formats
    fam = family_of(cfg)
    ternary = getattr(fam.model, "TERNARY", ())
    if not ternary:
        raise UserError(f"the {fam.title} has no ternary weights to pack (--to ternary is for the MatMul-free LM)")
    if packing not in PER_BYTE:
        raise UserError(f"unknown ternary packing {packing!r}: choose base3 (5 per byte) or 2bit (4 per byte)")
    params = formats.check_params(cfg, params, f"cannot write {path}")
    specs = {s.name: s for s in fam.spec(cfg)}
    tensors, bf16, fp32 = {}, {}, 0
    for name, a in params.items():
        s = specs[name]
        if s.vocab_rows is not None:
            a = a[:s.vocab_rows]
        fp32 += a.nbytes
        if name in ternary:
            ws = a if s.per_layer else a[None]
            qs = [quantize(w) for w in ws]
            codes = np.stack([pack(q, packing) for q, _ in qs])
            scale = np.array([sc for _, sc in qs], np.float32)
            tensors[name + ".codes"], tensors[name + ".scale"] = (codes, scale) if s.per_layer else (codes[0],
                                                                                                     scale)
        elif s.vocab_rows is not None:  # the token embedding
            bf16[name] = fp32_to_bf16_bits(a)
        else:
            tensors[name] = a
    meta = {"format": FORMAT, "version": str(VERSION), "family": fam.name,
            "config": json.dumps(cfg.to_dict(), allow_nan=False),
            "packing": packing}
    save_safetensors(path, tensors, meta, bf16=bf16)
    n = sum(t.nbytes for t in tensors.values()) + sum(t.nbytes for t in bf16.values())
    return {"bytes": n, "fp32_bytes": fp32}


def packed_size(cfg, packing: str = "base3") -> dict:
    """Bytes of the packed file's tensors for `cfg`, without building it: {"bytes", "fp32_bytes" (the same model's
    fp32 weights, vocabulary padding left out), "embedding_bytes" (the bf16 embedding's share of "bytes")}."""
    fam = family_of(cfg)
    ternary, n, fp32 = getattr(fam.model, "TERNARY", ()), 0, 0
    for s in fam.spec(cfg):
        shape = (*s.shape[:-2], s.vocab_rows, s.shape[-1]) if s.vocab_rows is not None and len(s.shape) == 2 \
            else s.shape
        count = int(np.prod(shape))
        fp32 += 4 * count
        if s.name in ternary:
            n += int(np.prod(shape[:-1])) * -(-shape[-1] // PER_BYTE[packing]) + 4 * (s.shape[0] if s.per_layer
                                                                                     else 1)
        else:
            n += (2 if s.vocab_rows is not None else 4) * count  # the embedding in bf16
    return {"bytes": n, "fp32_bytes": fp32, "embedding_bytes": 2 * cfg.vocab_size * cfg.channels}


def read_ternary(path: str | os.PathLike):
    """(config, params): PackedTernary for each ternary weight (checked: every code valid, every scale finite and
    positive), float32 arrays for the rest (vocabulary rows padded with zeros, as in our layout)."""
    t, meta = load_safetensors(path)
    if meta.get("format") != FORMAT:
        raise UserError(f"{path} is not a packed ternary model")
    if meta.get("version") != str(VERSION) or meta.get("packing") not in PER_BYTE:
        raise UserError(f"{path}: packed ternary version {meta.get('version')!r} / packing "
                        f"{meta.get('packing')!r} is not one this llmpy reads (version {VERSION}, base3 or 2bit)")
    try:
        cfg = config_from_dict(meta["family"], json.loads(meta["config"]))
    except (KeyError, ValueError, RecursionError):
        raise UserError(f"{path}: missing or bad config in the metadata") from None
    except UserError as e:
        raise UserError(f"{path}: bad config in the metadata ({e})") from None
    fam, packing = family_of(cfg), meta["packing"]
    ternary = getattr(fam.model, "TERNARY", ())
    out = {}
    for s in fam.spec(cfg):
        rows = s.vocab_rows
        if s.name in ternary:
            codes, scale = t.pop(s.name + ".codes", None), t.pop(s.name + ".scale", None)
            if codes is None or scale is None:
                raise UserError(f"{path} is missing the codes or the scale of {s.name}")
            N, K = s.shape[-2], s.shape[-1]
            want = (*s.shape[:-2], rows or N, -(-K // PER_BYTE[packing]))
            if codes.dtype != np.uint8 or codes.shape != want:
                raise UserError(f"{path}: {s.name}.codes is {codes.dtype} {codes.shape}, want uint8 {want}")
            if scale.dtype != np.float32 or scale.shape != (s.shape[0] if s.per_layer else 1,):
                raise UserError(f"{path}: {s.name}.scale is {scale.dtype} {scale.shape}, want float32 "
                                f"({s.shape[0] if s.per_layer else 1},)")
            if not np.all(np.isfinite(scale) & (scale > 0)):
                raise UserError(f"{path}: {s.name}.scale holds a non-finite or non-positive scale")
            if not np.all((scale >= SCALES[0]) & (scale <= SCALES[1])):
                bad = scale[(scale < SCALES[0]) | (scale > SCALES[1])].flat[0]
                raise UserError(f"{path}: {s.name}.scale holds {bad:g}, outside the {SCALES[0]:g}..{SCALES[1]:g} that "
                                "quantizing a weight gives (1 / mean |w|, with mean |w| floored at 1e-5): the file is "
                                "damaged")
            if np.bincount(codes.reshape(-1), minlength=256)[INVALID[packing]].any():
                raise UserError(f"{path}: {s.name}.codes holds bytes that are not {packing} ternary codes")
            if rows is not None and rows < N:  # the vocabulary padding rows: zero codes
                pad = np.full((N - rows, codes.shape[-1]), pack(np.zeros((1, K)), packing)[0, 0], np.uint8)
                codes = np.concatenate([codes, pad])
            out[s.name] = PackedTernary(codes, scale if s.per_layer else scale.reshape(()), K, packing)
            continue
        a = t.pop(s.name, None)
        if a is None:
            raise UserError(f"{path} is missing the tensor {s.name}")
        want = (rows, *s.shape[1:]) if rows is not None else s.shape
        if a.shape != tuple(want) or a.dtype.kind != "f":
            raise UserError(f"{path}: {s.name} is {a.dtype} {a.shape}, want float {tuple(want)}")
        a = np.asarray(a, np.float32)
        if rows is not None:
            a = np.concatenate([a, np.zeros((s.shape[0] - rows, *s.shape[1:]), np.float32)])
        out[s.name] = a
    if t:
        raise UserError(f"{path}: unexpected tensors {', '.join(sorted(t)[:5])}")
    return cfg, out
