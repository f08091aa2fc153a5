"""Model configurations and the parameter list: the one source of truth for tensor names, shapes and order.

GPT-2 as published (Radford et al. 2019): learned position embeddings, pre-LayerNorm blocks, tanh-GELU MLP of
width 4C, final LayerNorm, LM head tied to the token embedding. The vocabulary is padded to a multiple of 128
(50257 -> 50304) so matrix products tile well; padded rows stay zero and never receive probability.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, asdict

from .errors import UserError

GPT2_VOCAB = 50257
EOT_TOKEN = 50256

# depth -> (channels, heads) for the published GPT-2 sizes; other depths use C = 64*L, H = L (head size 64).
_PUBLISHED = {12: (768, 12), 24: (1024, 16), 36: (1280, 20), 48: (1600, 25)}


def pad_vocab(v: int, multiple: int = 128) -> int:
    return ((v + multiple - 1) // multiple) * multiple


@dataclass(frozen=True)
class GPT2Config:
    max_seq_len: int = 1024      # maxT: rows of the position embedding
    vocab_size: int = GPT2_VOCAB  # V: real tokens
    padded_vocab_size: int = 50304  # Vp: rows of wte (multiple of 128)
    num_layers: int = 12         # L
    num_heads: int = 12          # NH
    channels: int = 768          # C

    def __post_init__(self):
        if min(self.max_seq_len, self.vocab_size, self.num_layers, self.num_heads, self.channels) < 1:
            raise UserError(f"model config has a non-positive size: {self}")
        if self.channels % self.num_heads:
            raise UserError(f"channels ({self.channels}) must be a multiple of heads ({self.num_heads})")
        if self.padded_vocab_size < self.vocab_size:
            raise UserError(f"padded vocab {self.padded_vocab_size} < vocab {self.vocab_size}")

    @property
    def head_size(self) -> int:
        return self.channels // self.num_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPT2Config":
        keys = cls.__dataclass_fields__.keys()
        missing = [k for k in keys if k not in d]
        if missing:
            raise UserError(f"model config is missing {', '.join(missing)}")
        return cls(**{k: int(d[k]) for k in keys})

    def num_params(self) -> int:
        return sum(math.prod(s) for _, s in param_shapes(self))


def param_shapes(cfg: GPT2Config) -> list[tuple[str, tuple[int, ...]]]:
    """The 16 parameter tensors in llm.c's order (checkpoint files and the flat buffers follow it).
    Linear weights are (out, in): y = x @ W.T + b, as in llm.c and unlike HF's Conv1D."""
    Vp, T, L, C = cfg.padded_vocab_size, cfg.max_seq_len, cfg.num_layers, cfg.channels
    return [
        ("wte", (Vp, C)), ("wpe", (T, C)),
        ("ln1w", (L, C)), ("ln1b", (L, C)),
        ("qkvw", (L, 3 * C, C)), ("qkvb", (L, 3 * C)),
        ("attprojw", (L, C, C)), ("attprojb", (L, C)),
        ("ln2w", (L, C)), ("ln2b", (L, C)),
        ("fcw", (L, 4 * C, C)), ("fcb", (L, 4 * C)),
        ("fcprojw", (L, C, 4 * C)), ("fcprojb", (L, C)),
        ("lnfw", (C,)), ("lnfb", (C,)),
    ]


# Matrices (2-D per layer) get decoupled weight decay by default; biases and LayerNorm gains do not.
DECAYED = frozenset({"wte", "wpe", "qkvw", "attprojw", "fcw", "fcprojw"})
# Residual-stream output projections get init std 0.02/sqrt(2L) (GPT-2 paper, section 2.3).
RESIDUAL_PROJ = frozenset({"attprojw", "fcprojw"})

_SPEC = re.compile(r"^(?:l(?P<l>\d+))?(?:h(?P<h>\d+))?(?:c(?P<c>\d+))?(?:t(?P<t>\d+))?(?:v(?P<v>\d+))?$")


def config_from_name(name: str) -> GPT2Config:
    """`d12` (GPT-2 124M), `d24` (350M), `d36` (774M), `d48` (1558M), any `dN` (C=64N, H=N), or an explicit
    spec such as `l4h4c256` / `l4h4c256t512` (L layers, H heads, C channels, T max seq len, V vocab)."""
    s = name.strip().lower().replace("-", "").replace("_", "")
    m = re.fullmatch(r"d(\d+)", s)
    if m:
        depth = int(m.group(1))
        if depth < 1:
            raise UserError(f"bad model depth in {name!r}")
        c, h = _PUBLISHED.get(depth, (64 * depth, depth))
        return GPT2Config(num_layers=depth, num_heads=h, channels=c)
    m = _SPEC.fullmatch(s)
    if s and m and m.group("l") and m.group("h") and m.group("c"):
        v = int(m.group("v") or GPT2_VOCAB)
        return GPT2Config(num_layers=int(m.group("l")), num_heads=int(m.group("h")), channels=int(m.group("c")),
                          max_seq_len=int(m.group("t") or 1024), vocab_size=v, padded_vocab_size=pad_vocab(v))
    raise UserError(f"unknown model config {name!r}: use d2..d48 (e.g. d12) or a spec like l4h4c256[t512][v50257]")
