"""GPT-2 (Radford et al. 2019): its config, its parameter spec, its activation plan, forward and backward, written
once over a backend's declared ops (backends/ops.py).

Learned position embeddings, pre-LayerNorm blocks, tanh-GELU MLP of width 4C, final LayerNorm, LM head tied to the
token embedding. The vocabulary is padded to a multiple of 128 (50257 -> 50304) so matrix products tile well;
padded rows stay zero and never receive probability. `forward` and `backward` are straight-line walks over the
layers (llm.c's structure, with the residual add fused into the following LayerNorm).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass


from ..backends.ops import OpShapes
from ..errors import UserError
from .base import Family, Model, ModelConfig, pad_vocab
from .decode import KVCache
from .params import ParamSpec

GPT2_VOCAB = 50257
# depth -> (channels, heads) for the published GPT-2 sizes; other depths use C = 64*L, H = L (head size 64).
_PUBLISHED = {12: (768, 12), 24: (1024, 16), 36: (1280, 20), 48: (1600, 25)}
NAMES = ("gpt2:d2..gpt2:d48 (d12 = 124M, d24 = 350M, d36 = 774M, d48 = 1558M) or gpt2:lLhHcC[tT][vV] such as "
         "gpt2:l4h4c256t256")


@dataclass(frozen=True)
class GPT2Config(ModelConfig):
    family = "gpt2"
    max_seq_len: int = 1024         # maxT: rows of the position embedding
    vocab_size: int = GPT2_VOCAB    # V: real tokens
    padded_vocab_size: int = 50304  # Vp: rows of wte (multiple of 128)
    num_layers: int = 12            # L
    num_heads: int = 12             # NH
    channels: int = 768             # C

    def __post_init__(self):
        self.check_fields()
        if min(self.max_seq_len, self.vocab_size, self.num_layers, self.num_heads, self.channels) < 1:
            raise UserError(f"model config has a non-positive size: {self}")
        if self.channels % self.num_heads:
            raise UserError(f"channels ({self.channels}) must be a multiple of heads ({self.num_heads})")
        if self.padded_vocab_size < self.vocab_size:
            raise UserError(f"padded vocab {self.padded_vocab_size} < vocab {self.vocab_size}")

    @property
    def head_size(self) -> int:
        return self.channels // self.num_heads

    def num_params(self) -> int:
        return sum(math.prod(s.shape) for s in spec(self))

    def flops_per_token(self, T: int) -> int:
        """Training FLOPs per token at sequence length T, llm.c's convention (for MFU): 6N + 6 L C T."""
        return 6 * self.num_params() + 6 * self.num_layers * self.channels * T

    def describe(self) -> str:
        return (f"GPT-2 L={self.num_layers} H={self.num_heads} C={self.channels} maxT={self.max_seq_len} "
                f"V={self.vocab_size}")


def spec(cfg: GPT2Config) -> list[ParamSpec]:
    """The 16 tensors in llm.c's order (its files and our checkpoints follow it). Linear weights are (out, in): y =
    x @ W.T + b, as in llm.c and unlike HF's Conv1D (stored transposed there). Init: N(0, 0.02) matrices, residual
    projections N(0, 0.02/sqrt(2L)) (GPT-2 paper, section 2.3), zero biases, unit LayerNorm gains. Weight decay on
    the matrices and embeddings, not on biases and gains."""
    Vp, T, L, C = cfg.padded_vocab_size, cfg.max_seq_len, cfg.num_layers, cfg.channels
    std, res = 0.02, 0.02 / math.sqrt(2 * L)

    def layer(name, shape, hf, **kw):
        return ParamSpec(name, (L, *shape), per_layer=True, hf=f"h.{{l}}.{hf}", **kw)

    return [
        ParamSpec("wte", (Vp, C), decay=True, init="normal", std=std, vocab_rows=cfg.vocab_size, hf="wte.weight"),
        ParamSpec("wpe", (T, C), decay=True, init="normal", std=std, hf="wpe.weight"),
        layer("ln1w", (C,), "ln_1.weight", init="ones"), layer("ln1b", (C,), "ln_1.bias"),
        layer("qkvw", (3 * C, C), "attn.c_attn.weight", decay=True, init="normal", std=std,
              hf_transposed=True, fp8=True),
        layer("qkvb", (3 * C,), "attn.c_attn.bias"),
        layer("attprojw", (C, C), "attn.c_proj.weight", decay=True, init="normal", std=res,
              hf_transposed=True, fp8=True),
        layer("attprojb", (C,), "attn.c_proj.bias"),
        layer("ln2w", (C,), "ln_2.weight", init="ones"), layer("ln2b", (C,), "ln_2.bias"),
        layer("fcw", (4 * C, C), "mlp.c_fc.weight", decay=True, init="normal", std=std,
              hf_transposed=True, fp8=True),
        layer("fcb", (4 * C,), "mlp.c_fc.bias"),
        layer("fcprojw", (C, 4 * C), "mlp.c_proj.weight", decay=True, init="normal", std=res,
              hf_transposed=True, fp8=True),
        layer("fcprojb", (C,), "mlp.c_proj.bias"),
        ParamSpec("lnfw", (C,), init="ones", hf="ln_f.weight"), ParamSpec("lnfb", (C,), hf="ln_f.bias"),
    ]


_SPEC = re.compile(r"^(?:l(?P<l>\d+))?(?:h(?P<h>\d+))?(?:c(?P<c>\d+))?(?:t(?P<t>\d+))?(?:v(?P<v>\d+))?$")


def config_from_name(name: str) -> GPT2Config:
    """`d12` (GPT-2 124M), `d24` (350M), `d36` (774M), `d48` (1558M), any `dN` (C=64N, H=N), or an explicit
    spec such as `l4h4c256` / `l4h4c256t512` (L layers, H heads, C channels, T max seq len, V vocab)."""
    if re.search(r"-\s*\d", name):  # "-" is a separator ("gpt2-d12"), never a sign: "d-1" is no depth
        raise UserError(f"bad model config {name!r}: sizes are positive integers")
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
    raise UserError(f"unknown model config {name!r} for GPT-2: use {NAMES}")


class GPT2(Model):
    """recompute: 0 keeps every activation; 1 recomputes the GELU output in backward; 2 also the two LayerNorm
    outputs of each block (from the saved mean/rstd): less memory for more compute."""
    HEAD_WEIGHT = "wte"  # tied
    RECOMPUTE = (0, 1, 2)

    # ---- memory plan ----------------------------------------------------------------------------------------
    def plan(self):
        cfg, be, B, T = self.cfg, self.be, self.B, self.T
        L, C, NH = cfg.num_layers, cfg.channels, cfg.num_heads
        att_shape, att_kind = be.attention_state(B, T, NH, NH, cfg.head_size)
        # a recomputed activation lives in one (B, T, .) slot shared by the recomputing layers (rc_rows), as do the
        # norms' and GELU's outputs where the FP8 products keep their copies (fp8_rows)
        Lg, Lln = self.fp8_rows(1), self.fp8_rows(2)
        acts = [
            ("encoded", (B, T, C)),
            ("ln1", (Lln, B, T, C)), ("qkv", (L, B, T, 3 * C)), ("atty", (L, B, T, C)),
            ("residual2", (L, B, T, C)), ("ln2", (Lln, B, T, C)),
            ("fch", (L, B, T, 4 * C)), ("fch_gelu", (Lg, B, T, 4 * C)),
            ("residual3", (L, B, T, C)), ("lnf", (B, T, C)),
            ("proj", (B, T, C)),                     # attproj / fcproj outputs: consumed at once, reused
        ]
        stats = [(n, (L, B, T)) for n in ("ln1_mean", "ln1_rstd", "ln2_mean", "ln2_rstd")]
        stats += [("lnf_mean", (B, T)), ("lnf_rstd", (B, T))]
        (acts if att_kind == "act" else stats).append(("att", (L,) + tuple(att_shape)))
        grads = [("dresidual", (B, T, C)), ("dbtc", (B, T, C)), ("dbt4c", (B, T, 4 * C)), ("dqkv", (B, T, 3 * C))]
        return acts, grads, stats

    def op_shapes(self) -> OpShapes:
        cfg, C = self.cfg, self.cfg.channels
        return OpShapes(self.B, self.T, C, cfg.num_heads, cfg.num_heads, cfg.head_size, cfg.vocab_size, self.Vl,
                        linears=((3 * C, C), (C, C), (4 * C, C), (C, 4 * C), (self.Vl, C)),
                        bias_widths=(3 * C, C, 4 * C))

    def _ln1(self, l):
        return self.acts["ln1"][self.fp8_slot(2, l)]

    def _ln2(self, l):
        return self.acts["ln2"][self.fp8_slot(2, l)]

    def _fch_gelu(self, l):
        return self.acts["fch_gelu"][self.fp8_slot(1, l)]

    # ---- forward --------------------------------------------------------------------------------------------
    def forward(self, tokens=None, targets=None, grad_scale: float | None = None, *, return_loss: bool = True,
                state: KVCache | None = None) -> float | None:
        """Runs the model on (B, T) token ids: host arrays given here are copied in first (else the buffers
        `set_batch` filled are used). With targets, the per-token losses are computed and their mean returned
        (None while a CUDA graph is being captured: nothing runs then); with grad_scale (= d total loss / d
        each token's loss, e.g. 1/(B*T*grad_accum)) the LM head also leaves dlnf in dbtc for backward. Without
        targets only the logits are computed (in the `logits` activation) and None is returned.
        return_loss=False skips reading the loss back (on a GPU that read waits for the device). state: decoding;
        T = 1: the token sits at position state.pos and attends over state's KV cache; T > 1: a prefill from
        position 0 (base.Model.forward), whose first state.span positions' keys and values fill the cache."""
        be, cfg, a, s, p = self.be, self.cfg, self.acts, self.stats, self.params
        L, NH = cfg.num_layers, cfg.num_heads
        if tokens is not None:
            self.set_batch(tokens, targets)
        pos = 0 if state is None else state.pos
        be.encoder_forward(a["encoded"], self.tokens, p["wte"], p["wpe"][pos:])
        be.layernorm_forward(self._ln1(0), s["ln1_mean"][0], s["ln1_rstd"][0], a["encoded"], p["ln1w"][0],
                             p["ln1b"][0], fp8_next=p["qkvw"][0])
        for l in range(L):
            residual = a["encoded"] if l == 0 else a["residual3"][l - 1]
            be.matmul_forward(a["qkv"][l], self._ln1(l), p["qkvw"][l], p["qkvb"][l])
            if state is None or self.T > 1:
                be.attention_forward(a["atty"][l], self.saved("att")[l], a["qkv"][l], NH)
                if state is not None:  # a prefill: its keys and values fill the cache from position 0
                    be.kv_cache_write(state.k[l], state.v[l], a["qkv"][l][:, :state.span], 0, NH)
            else:
                be.attention_decode(a["atty"][l], a["qkv"][l], state.k[l], state.v[l], pos, NH)
            be.matmul_forward(a["proj"], a["atty"][l], p["attprojw"][l], p["attprojb"][l])
            be.fused_residual_layernorm_forward(a["residual2"][l], self._ln2(l), s["ln2_mean"][l],
                                                s["ln2_rstd"][l], residual, a["proj"], p["ln2w"][l], p["ln2b"][l],
                                                fp8_next=p["fcw"][l])
            be.matmul_forward(self._fch_gelu(l), self._ln2(l), p["fcw"][l], p["fcb"][l], gelu_pre=a["fch"][l],
                              fp8_next=p["fcprojw"][l])
            be.matmul_forward(a["proj"], self._fch_gelu(l), p["fcprojw"][l], p["fcprojb"][l])
            if l + 1 < L:  # this block's residual add, fused with the next block's first LayerNorm
                be.fused_residual_layernorm_forward(a["residual3"][l], self._ln1(l + 1), s["ln1_mean"][l + 1],
                                                    s["ln1_rstd"][l + 1], a["residual2"][l], a["proj"],
                                                    p["ln1w"][l + 1], p["ln1b"][l + 1], fp8_next=p["qkvw"][l + 1])
            else:
                be.fused_residual_layernorm_forward(a["residual3"][l], a["lnf"], s["lnf_mean"], s["lnf_rstd"],
                                                    a["residual2"][l], a["proj"], p["lnfw"], p["lnfb"])
        return self.lm_head(a["lnf"], a["dbtc"] if self.training else None, grad_scale, return_loss, state)

    # ---- backward -------------------------------------------------------------------------------------------
    def backward(self, hooks=None) -> None:
        """Accumulates parameter gradients (+=), starting from the dlnf that forward(grad_scale=...) left in dbtc
        (the LM head's own backward ran chunk by chunk inside that forward). `hooks` (data parallelism) hears
        before_layer(l) / after_layer(l) around each layer's backward and done() at the end: layer l's
        gradients are complete at after_layer(l), the head's (wte, wpe, lnf) at done()."""
        be, cfg, a, s, p, g = self.be, self.cfg, self.acts, self.stats, self.params, self.grads
        L, NH = cfg.num_layers, cfg.num_heads
        dres, dbtc, dbt4c, dqkv = a["dresidual"], a["dbtc"], a["dbt4c"], a["dqkv"]
        be.fill_zero(dres)
        # each norm backward also sums the residual gradient it updates: the bias gradient of the product whose
        # output that stream is (fcproj below the final / first norm, attproj below the second), taken by that
        # product's matmul_backward (db_sums; one pass over the rows on a GPU)
        sums = be.layernorm_backward(dres, g["lnfw"], g["lnfb"], dbtc, a["residual3"][L - 1], p["lnfw"],
                                     s["lnf_mean"], s["lnf_rstd"], dinp_sums=True)
        for l in reversed(range(L)):
            if hooks is not None:
                hooks.before_layer(l)
            residual = a["encoded"] if l == 0 else a["residual3"][l - 1]
            if self.fp8_redo(2, l):
                be.layernorm_forward(self._ln2(l), s["ln2_mean"][l], s["ln2_rstd"][l], a["residual2"][l],
                                     p["ln2w"][l], p["ln2b"][l])
            # MLP: dres flows unchanged into fcproj's output (the residual add)
            # (fc's bias gradient is summed with the GELU backward, while dbt4c is in hand: gelu_db; recompute 1
            # reforms the GELU output there too, before fcproj's weight gradient reads it: gelu_redo)
            be.matmul_backward(dbt4c, g["fcprojw"][l], g["fcprojb"][l], dres, self._fch_gelu(l), p["fcprojw"][l],
                               gelu_pre=a["fch"][l], gelu_db=g["fcb"][l], gelu_redo=self.fp8_redo(1, l),
                               db_sums=sums)
            be.matmul_backward(dbtc, g["fcw"][l], None, dbt4c, self._ln2(l), p["fcw"][l])
            sums = be.layernorm_backward(dres, g["ln2w"][l], g["ln2b"][l], dbtc, a["residual2"][l], p["ln2w"][l],
                                         s["ln2_mean"][l], s["ln2_rstd"][l], dinp_sums=True)
            # attention
            be.matmul_backward(dbtc, g["attprojw"][l], g["attprojb"][l], dres, a["atty"][l], p["attprojw"][l],
                               db_sums=sums)
            be.attention_backward(dqkv, dbtc, a["qkv"][l], self.saved("att")[l], NH, out=a["atty"][l])
            if self.fp8_redo(2, l):
                be.layernorm_forward(self._ln1(l), s["ln1_mean"][l], s["ln1_rstd"][l], residual, p["ln1w"][l],
                                     p["ln1b"][l])
            be.matmul_backward(dbtc, g["qkvw"][l], g["qkvb"][l], dqkv, self._ln1(l), p["qkvw"][l])
            sums = be.layernorm_backward(dres, g["ln1w"][l], g["ln1b"][l], dbtc, residual, p["ln1w"][l],
                                         s["ln1_mean"][l], s["ln1_rstd"][l], dinp_sums=l > 0)
            if hooks is not None:
                hooks.after_layer(l)
        be.encoder_backward(g["wte"], g["wpe"], dres, self.tokens)
        if hooks is not None:
            hooks.done()

    # ---- decoding -------------------------------------------------------------------------------------------
    def new_decode_state(self, length: int) -> KVCache:
        cfg = self.cfg
        shape = (cfg.num_layers, self.B, cfg.num_heads, min(length, cfg.max_seq_len), cfg.head_size)
        return KVCache.allocate(self.be, shape)


FAMILY = Family(name="gpt2", title="GPT-2", config=GPT2Config, model=GPT2, spec=spec,
                parse=lambda prefix, name: config_from_name(name), names=NAMES)
