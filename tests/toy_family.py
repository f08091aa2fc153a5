"""A model family written outside the package, as a new family is: one file with its config, spec, activation plan,
forward, backward and decode state, registered by name. It checks the seam (registry, spec-driven layout, init,
weight decay, checkpoints, the training loop, decoding) with what GPT-2 lacks: an untied LM head and no attention.

The model: x = wte[tok] + wpe[t]; L blocks of x += W2 gelu(W1 layernorm(x) + b1) + b2; logits = layernorm(x) @
lm_head.T (untied). Tokens do not mix, so decoding needs no cache: its state is only the position."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from llmpy.backends.ops import OpShapes
from llmpy.errors import UserError
from llmpy.models.base import Family, Model, ModelConfig, pad_vocab
from llmpy.models.params import ParamSpec


@dataclass(frozen=True)
class ToyConfig(ModelConfig):
    family = "toy"
    max_seq_len: int = 64
    vocab_size: int = 50257
    padded_vocab_size: int = 50304
    num_layers: int = 2
    channels: int = 16

    def describe(self) -> str:
        return f"toy L={self.num_layers} C={self.channels}"

    def flops_per_token(self, T: int) -> int:
        return 6 * sum(math.prod(s.shape) for s in spec(self))


def spec(cfg: ToyConfig) -> list[ParamSpec]:
    L, C, Vp = cfg.num_layers, cfg.channels, cfg.padded_vocab_size

    def layer(name, shape, **kw):
        return ParamSpec(name, (L, *shape), per_layer=True, **kw)

    return [
        ParamSpec("wte", (Vp, C), decay=True, init="normal", std=0.02, vocab_rows=cfg.vocab_size),
        ParamSpec("wpe", (cfg.max_seq_len, C), decay=True, init="normal", std=0.02),
        layer("lnw", (C,), init="ones"), layer("lnb", (C,)),
        layer("w1", (4 * C, C), decay=True, init="normal", std=0.02), layer("b1", (4 * C,)),
        layer("w2", (C, 4 * C), decay=True, init="normal", std=0.02 / math.sqrt(2 * L)), layer("b2", (C,)),
        ParamSpec("lnfw", (C,), init="ones"), ParamSpec("lnfb", (C,)),
        ParamSpec("lm_head", (Vp, C), decay=True, init="normal", std=0.02, vocab_rows=cfg.vocab_size),
    ]


def parse(prefix: str, name: str) -> ToyConfig:
    m = re.fullmatch(r"l(\d+)c(\d+)(?:v(\d+))?", name.strip())
    if not m:
        raise UserError(f"unknown model config {name!r} for toy: use lLcC[vV]")
    v = int(m.group(3) or 50257)
    return ToyConfig(num_layers=int(m.group(1)), channels=int(m.group(2)), vocab_size=v, padded_vocab_size=pad_vocab(v))


@dataclass
class Position:
    capacity: int
    pos: int = 0
    span: int = 1


class Toy(Model):
    HEAD_WEIGHT = "lm_head"  # untied

    def plan(self):
        B, T, L, C = self.B, self.T, self.cfg.num_layers, self.cfg.channels
        acts = [("x", (L + 1, B, T, C)), ("ln", (L, B, T, C)), ("pre", (L, B, T, 4 * C)),
                ("h", (L, B, T, 4 * C)), ("out", (B, T, C)), ("lnf", (B, T, C))]
        grads = [("dx", (B, T, C)), ("dln", (B, T, C)), ("dh", (B, T, 4 * C))]
        stats = [("mean", (L, B, T)), ("rstd", (L, B, T)), ("fmean", (B, T)), ("frstd", (B, T))]
        return acts, grads, stats

    def op_shapes(self) -> OpShapes:
        C = self.cfg.channels
        return OpShapes(self.B, self.T, C, 0, 0, 0, self.cfg.vocab_size, self.Vl,  # no attention
                        linears=((4 * C, C), (C, 4 * C), (self.Vl, C)), bias_widths=(4 * C, C))

    def forward(self, tokens=None, targets=None, grad_scale=None, *, return_loss=True, state=None):
        be, a, s, p, L = self.be, self.acts, self.stats, self.params, self.cfg.num_layers
        if tokens is not None:
            self.set_batch(tokens, targets)
        pos = 0 if state is None else state.pos
        be.encoder_forward(a["x"][0], self.tokens, p["wte"], p["wpe"][pos:])
        for l in range(L):
            be.layernorm_forward(a["ln"][l], s["mean"][l], s["rstd"][l], a["x"][l], p["lnw"][l], p["lnb"][l])
            be.matmul_forward(a["h"][l], a["ln"][l], p["w1"][l], p["b1"][l], gelu_pre=a["pre"][l])
            be.matmul_forward(a["out"], a["h"][l], p["w2"][l], p["b2"][l])
            be.fused_residual_layernorm_forward(a["x"][l + 1], a["lnf"], s["fmean"], s["frstd"], a["x"][l],
                                                a["out"], p["lnfw"], p["lnfb"])
        return self.lm_head(a["lnf"], a["dln"] if self.training else None, grad_scale, return_loss, state)

    def backward(self, hooks=None):
        be, a, s, p, g, L = self.be, self.acts, self.stats, self.params, self.grads, self.cfg.num_layers
        be.fill_zero(a["dx"])
        be.layernorm_backward(a["dx"], g["lnfw"], g["lnfb"], a["dln"], a["x"][L], p["lnfw"], s["fmean"], s["frstd"])
        for l in reversed(range(L)):
            if hooks is not None:
                hooks.before_layer(l)
            be.matmul_backward(a["dh"], g["w2"][l], g["b2"][l], a["dx"], a["h"][l], p["w2"][l], gelu_pre=a["pre"][l])
            be.matmul_backward(a["dln"], g["w1"][l], g["b1"][l], a["dh"], a["ln"][l], p["w1"][l])
            be.layernorm_backward(a["dx"], g["lnw"][l], g["lnb"][l], a["dln"], a["x"][l], p["lnw"][l], s["mean"][l],
                                  s["rstd"][l])
            if hooks is not None:
                hooks.after_layer(l)
        be.encoder_backward(g["wte"], g["wpe"], a["dx"], self.tokens)
        if hooks is not None:
            hooks.done()

    def new_decode_state(self, length):
        return Position(min(length, self.cfg.max_seq_len))


FAMILY = Family(name="toy", title="toy", config=ToyConfig, model=Toy, spec=spec, parse=parse, names="lLcC[vV]")
