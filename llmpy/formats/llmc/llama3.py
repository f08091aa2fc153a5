"""llm.c's Llama 3 model file (its llama3 branch's layout; docs/llama3.md), with the float fields kept as
floats (llm.c master's writer rounds them into the int header: 1.3 -> 1).

int32[256]: [0] magic 20240803, [1] version (3 fp32, 5 bf16), [2] block size (maxT), [3] vocab, [4] layers,
[5] heads, [6] KV heads, [7] dim, [8] multiple_of, [9] use_scaled_rope, [10] major, [11] minor; float32[256]:
[0] ffn_dim_multiplier, [1] norm_eps, [2] rope_theta. Then wte, lm_head, ln1w, ln1b, qkvw ([wq; wk; wv], Meta's row
order), qkvb, attprojw, attprojb, ln2w, ln2b, fcw (per layer [W3; W1]), fcb, fcprojw, fcprojb, lnfw, lnfb: the
biases are zeros (Llama has none: read, they must be zero). The file holds no padded vocabulary (V rows) and always
an lm_head (a tied model's is the embedding again; one equal to the embedding is read as tied). The FFN size is not
stored: it is Meta's rule F = multiple_of * ceil(int(multiplier * int(8 dim / 3)) / multiple_of). The RoPE scaling
factor of use_scaled_rope follows the version: 3.1 -> 8, 3.2 -> 32.
"""
from __future__ import annotations

import math
import os

import numpy as np

from ...errors import UserError
from ...models.base import pad_vocab
from ...models.llama3 import LlamaConfig

MAGIC = 20240803
EXTRA_BYTES = 256 * 4  # the float header
_FACTOR = {(3, 1): 8.0, (3, 2): 32.0}


def ffn_hidden(dim: int, multiplier: float, multiple_of: int) -> int:
    return multiple_of * math.ceil(int(multiplier * int(8 * dim / 3)) / multiple_of)


def _multiplier(cfg: LlamaConfig) -> tuple[float, int]:
    """(ffn_dim_multiplier, multiple_of) that give back cfg's FFN size by Meta's rule."""
    for mult, m in ((1.3, 1024), (1.5, 256), (1.0, 256)):  # the published sizes' own settings first
        if ffn_hidden(cfg.channels, mult, m) == cfg.ffn_hidden:
            return mult, m
    base = int(8 * cfg.channels / 3)
    for m in (1024, 256, 128, 64, 32, 16, 8, 4, 2, 1):
        mult = np.float32(cfg.ffn_hidden / base)  # stored as float32: check the rule with that value
        for cand in (float(mult), float(np.nextafter(mult, np.float32(2))), float(np.nextafter(mult, np.float32(0)))):
            if ffn_hidden(cfg.channels, cand, m) == cfg.ffn_hidden:
                return cand, m
    raise UserError(f"the FFN size {cfg.ffn_hidden} cannot be written in llm.c's Llama 3 header (no multiple_of and "
                    f"multiplier reproduce it from dim {cfg.channels})")


def parse_header(path: str | os.PathLike, h: np.ndarray, extra: bytes, versions) -> tuple[LlamaConfig, int]:
    version = int(h[1])
    if version not in versions:
        raise UserError(f"{path}: unsupported llm.c Llama 3 model version {version} (want 3 = fp32 or 5 = bf16)")
    maxT, V, L, H, K, C, multiple_of, scaled, major, minor = (int(x) for x in h[2:12])
    f = np.frombuffer(extra, dtype="<f4")
    # each float32 field as the shortest decimal that rounds to it (1e-5 stays 1e-5, not 9.99999974e-06)
    multiplier, eps, theta = (float(str(x)) for x in f[:3])
    bad = [f"{k}={v}" for k, v in dict(maxT=maxT, V=V, L=L, H=H, K=K, C=C, multiple_of=multiple_of).items() if v <= 0]
    if bad:
        raise UserError(f"{path}: llm.c header has non-positive sizes: {', '.join(bad)}")
    if not (multiplier > 0 and eps > 0 and theta > 0):
        raise UserError(f"{path}: llm.c header has bad float fields: ffn_dim_multiplier {multiplier}, norm_eps {eps}, "
                        f"rope_theta {theta}")
    if scaled and (major, minor) not in _FACTOR:
        raise UserError(f"{path}: llm.c header asks for scaled RoPE of Llama {major}.{minor}, whose factor is unknown "
                        f"(known: {', '.join(f'{a}.{b}' for a, b in _FACTOR)})")
    try:
        cfg = LlamaConfig(max_seq_len=maxT, vocab_size=V, padded_vocab_size=pad_vocab(V), num_layers=L, channels=C,
                          num_heads=H, num_kv_heads=K, ffn_hidden=ffn_hidden(C, multiplier, multiple_of),
                          rope_theta=theta, rope_factor=_FACTOR[major, minor] if scaled else 1.0, norm_eps=eps)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    return cfg, version


def header(cfg: LlamaConfig, version: int) -> tuple[list[int], bytes]:
    multiplier, multiple_of = _multiplier(cfg)
    factor = {v: k for k, v in _FACTOR.items()}
    if cfg.rope_factor != 1.0 and cfg.rope_factor not in factor:
        raise UserError(f"llm.c's Llama 3 header cannot record a RoPE scaling factor of {cfg.rope_factor:g} "
                        f"(only {', '.join(f'{v:g}' for v in factor)})")
    major, minor = factor.get(cfg.rope_factor, (3, 0))
    words = [MAGIC, version, cfg.max_seq_len, cfg.vocab_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads,
             cfg.channels, multiple_of, int(cfg.rope_factor != 1.0), major, minor]
    f = np.zeros(256, "<f4")
    f[:3] = [multiplier, cfg.norm_eps, cfg.rope_theta]
    return words, f.tobytes()


def layout(cfg: LlamaConfig) -> list[tuple[str, tuple[int, ...]]]:
    """The file's tensors in order (names ending in 'b' are the zero biases)."""
    L, C, V, F, W = cfg.num_layers, cfg.channels, cfg.vocab_size, cfg.ffn_hidden, cfg.qkv_width
    return [("wte", (V, C)), ("lm_head", (V, C)), ("ln1w", (L, C)), ("ln1b", (L, C)), ("qkvw", (L, W, C)),
            ("qkvb", (L, W)), ("attprojw", (L, C, C)), ("attprojb", (L, C)), ("ln2w", (L, C)), ("ln2b", (L, C)),
            ("fcw", (L, 2 * F, C)), ("fcb", (L, 2 * F)), ("fcprojw", (L, C, F)), ("fcprojb", (L, C)), ("lnfw", (C,)),
            ("lnfb", (C,))]


def to_file(cfg: LlamaConfig, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    V = cfg.vocab_size
    out = {}
    for name, shape in layout(cfg):
        if name in ("wte", "lm_head"):
            out[name] = params["wte" if name == "lm_head" and cfg.tied else name][:V]
        elif name in params:
            out[name] = params[name]
        else:
            out[name] = np.zeros(shape, np.float32)
    return out


def from_file(path, cfg: LlamaConfig, t: dict[str, np.ndarray]) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    for name, a in t.items():
        if name.endswith("b") and a.any():
            raise UserError(f"{path}: the Llama 3 bias {name} is not zero (Llama has no biases)")
    tied = bool(np.array_equal(t["lm_head"], t["wte"]))
    if tied:
        cfg = LlamaConfig(**{**cfg.to_dict(), "tied": True})
    params = {}
    for name in ("wte", "lm_head"):
        if name == "lm_head" and tied:
            continue
        padded = np.zeros((cfg.padded_vocab_size, cfg.channels), np.float32)
        padded[:cfg.vocab_size] = t[name]
        params[name] = padded
    params |= {n: t[n] for n in ("ln1w", "qkvw", "attprojw", "ln2w", "fcw", "fcprojw", "lnfw")}
    return cfg, params
