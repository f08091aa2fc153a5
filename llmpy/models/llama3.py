"""Llama 3 (Meta 2024; llama-models `models/llama3/model.py`): its config, parameter spec, activation plan, forward
and backward, written once over a backend's declared ops (backends/ops.py). Formulas: docs/llama3.md.

Token embedding without a position table; pre-RMSNorm blocks; attention with RoPE (Llama 3.1's frequency scaling
a config field) and grouped-query attention (K key/value heads shared by NH/K query heads each, never repeated in
memory); SwiGLU MLP from one fused [W3; W1] projection; no biases; final RMSNorm; an LM head of its own or tied to
the embedding (3.2 1B/3B). q and k rows are in Meta's interleaved RoPE order (formats/hf permutes HF's).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..backends.ops import OpShapes
from ..errors import UserError
from ..layers.rope import rope_frequencies, rope_table
from .base import Family, Model, ModelConfig, pad_vocab
from .decode import KVCache
from .params import ParamSpec

LLAMA3_VOCAB = 128256
NAMES = ("llama3:8b, llama3.1:8b, llama3.2:1b, llama3.2:3b, or llama3:lLdDhHkKfF[vV][tT][rR][-tied] such as "
         "llama3:l2d64h4k2f192v256t16r32 (layers, dim, heads, KV heads, FFN, vocab (default 50257, GPT-2's "
         "tokenizer), context (1024), RoPE scaling factor (none))")


@dataclass(frozen=True)
class LlamaConfig(ModelConfig):
    family = "llama3"
    max_seq_len: int = 8192                 # maxT: the longest sequence (RoPE table rows, KV cache)
    vocab_size: int = LLAMA3_VOCAB          # V
    padded_vocab_size: int = LLAMA3_VOCAB   # Vp (128256 is a multiple of 128)
    num_layers: int = 32                    # L
    channels: int = 4096                    # C = dim
    num_heads: int = 32                     # NH query heads
    num_kv_heads: int = 8                   # K key/value heads
    ffn_hidden: int = 14336                 # F
    rope_theta: float = 500000.0
    rope_factor: float = 1.0                # Llama 3.1 scaling: 1 = none, 8 (3.1), 32 (3.2, as HF's configs say)
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192
    norm_eps: float = 1e-5
    tied: bool = False                      # LM head = the token embedding (3.2 1B and 3B)

    def __post_init__(self):
        self.check_fields()
        sizes = (self.max_seq_len, self.vocab_size, self.num_layers, self.channels, self.num_heads,
                 self.num_kv_heads, self.ffn_hidden)
        if min(sizes) < 1:
            raise UserError(f"model config has a non-positive size: {self}")
        if self.channels % self.num_heads or self.head_size % 2:
            raise UserError(f"dim ({self.channels}) must be an even head size times the heads ({self.num_heads})")
        if self.num_heads % self.num_kv_heads:
            raise UserError(f"query heads ({self.num_heads}) must be a multiple of key/value heads "
                            f"({self.num_kv_heads})")
        if self.padded_vocab_size < self.vocab_size:
            raise UserError(f"padded vocab {self.padded_vocab_size} < vocab {self.vocab_size}")
        if not (self.rope_theta > 0 and self.rope_factor >= 1 and self.norm_eps > 0
                and 0 < self.rope_low_freq_factor < self.rope_high_freq_factor):
            raise UserError(f"bad RoPE or norm settings: {self}")

    @property
    def head_size(self) -> int:
        return self.channels // self.num_heads

    @property
    def qkv_width(self) -> int:
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_size

    def num_params(self) -> int:
        return sum(math.prod(s.shape) for s in spec(self))

    def flops_per_token(self, T: int) -> int:
        """torchtitan's convention (for MFU): 6 N + 12 L NH hs T, N counting a tied head once."""
        return 6 * self.num_params() + 12 * self.num_layers * self.num_heads * self.head_size * T

    def describe(self) -> str:
        return (f"Llama 3 L={self.num_layers} C={self.channels} H={self.num_heads} KV={self.num_kv_heads} "
                f"F={self.ffn_hidden} maxT={self.max_seq_len} V={self.vocab_size} rope x{self.rope_factor:g}"
                + (" tied" if self.tied else ""))


def spec(cfg: LlamaConfig) -> list[ParamSpec]:
    """The tensors in the order of llm.c's Llama 3 file (which adds zero biases). qkvw = [wq; wk; wv] (Meta's row
    order), fcw = [W3; W1] (up, then gate). Init as GPT-2's: N(0, 0.02), the residual projections wo and W2 at
    0.02/sqrt(2L), norms 1. Weight decay on the matrices and embeddings."""
    L, C, F, Vp, d = cfg.num_layers, cfg.channels, cfg.ffn_hidden, cfg.padded_vocab_size, cfg.head_size
    H, K = cfg.num_heads, cfg.num_kv_heads
    std, res = 0.02, 0.02 / math.sqrt(2 * L)
    m = "model.layers.{l}."

    def layer(name, shape, hf, **kw):
        return ParamSpec(name, (L, *shape), per_layer=True, **kw,
                         hf=tuple(m + k for k in hf) if isinstance(hf, tuple) else m + hf)

    head = [] if cfg.tied else [ParamSpec("lm_head", (Vp, C), decay=True, init="normal", std=std,
                                          vocab_rows=cfg.vocab_size, hf="lm_head.weight")]
    return [
        ParamSpec("wte", (Vp, C), decay=True, init="normal", std=std, vocab_rows=cfg.vocab_size,
                  hf="model.embed_tokens.weight"),
        *head,
        layer("ln1w", (C,), "input_layernorm.weight", init="ones"),
        layer("qkvw", ((H + 2 * K) * d, C), ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                             "self_attn.v_proj.weight"),
              hf_rows=(H * d, K * d, K * d), decay=True, init="normal", std=std, fp8=True),
        layer("attprojw", (C, C), "self_attn.o_proj.weight", decay=True, init="normal", std=res, fp8=True),
        layer("ln2w", (C,), "post_attention_layernorm.weight", init="ones"),
        layer("fcw", (2 * F, C), ("mlp.up_proj.weight", "mlp.gate_proj.weight"), hf_rows=(F, F), decay=True,
              init="normal", std=std, fp8=True),
        layer("fcprojw", (C, F), "mlp.down_proj.weight", decay=True, init="normal", std=res, fp8=True),
        ParamSpec("lnfw", (C,), init="ones", hf="model.norm.weight"),
    ]


# name -> (dim, layers, heads, KV heads, FFN, context, RoPE factor, tied) (llama-models sku_list; docs/llama3.md)
_PUBLISHED = {
    ("llama3", "8b"): (4096, 32, 32, 8, 14336, 8192, 1.0, False),
    ("llama3.1", "8b"): (4096, 32, 32, 8, 14336, 131072, 8.0, False),
    ("llama3.2", "1b"): (2048, 16, 32, 8, 8192, 131072, 32.0, True),
    ("llama3.2", "3b"): (3072, 28, 24, 8, 8192, 131072, 32.0, True),
}
_SMALL = re.compile(r"l(\d+)d(\d+)h(\d+)k(\d+)f(\d+)(?:v(\d+))?(?:t(\d+))?(?:r(\d+(?:\.\d+)?))?(-tied)?")


def config_from_name(prefix: str, name: str) -> LlamaConfig:
    """A published size (`llama3.2:1b`, ...) or a small config `llama3:l2d64h4k2f192v256t16r32[-tied]`."""
    s = name.strip().lower()
    if (prefix, s) in _PUBLISHED:
        C, L, H, K, F, T, r, tied = _PUBLISHED[prefix, s]
        return LlamaConfig(max_seq_len=T, num_layers=L, channels=C, num_heads=H, num_kv_heads=K, ffn_hidden=F,
                           rope_factor=r, tied=tied)
    m = _SMALL.fullmatch(s)
    if m:
        v = int(m.group(6) or 50257)
        return LlamaConfig(num_layers=int(m.group(1)), channels=int(m.group(2)), num_heads=int(m.group(3)),
                           num_kv_heads=int(m.group(4)), ffn_hidden=int(m.group(5)), vocab_size=v,
                           padded_vocab_size=pad_vocab(v), max_seq_len=int(m.group(7) or 1024),
                           rope_factor=float(m.group(8) or 1.0), tied=bool(m.group(9)))
    raise UserError(f"unknown model config {name!r} for {prefix}: use {NAMES}")


class Llama(Model):
    """recompute: 0 keeps every activation; 1 recomputes the SwiGLU output in backward; 2 also the two RMSNorm
    outputs of each block (from the residual stream): less memory for more compute. (Where the FP8 products keep
    their inputs' copies, those outputs are neither kept nor recomputed: fp8_rows.)"""
    RECOMPUTE = (0, 1, 2)

    @property
    def HEAD_WEIGHT(self) -> str:
        return "wte" if self.cfg.tied else "lm_head"

    # ---- memory plan ----------------------------------------------------------------------------------------
    def plan(self):
        cfg, be, B, T = self.cfg, self.be, self.B, self.T
        L, C, F, W = cfg.num_layers, cfg.channels, cfg.ffn_hidden, cfg.qkv_width
        att_shape, att_kind = be.attention_state(B, T, cfg.num_heads, cfg.num_kv_heads, cfg.head_size)
        freqs = rope_frequencies(cfg.head_size, cfg.rope_theta, cfg.rope_factor, cfg.rope_low_freq_factor,
                                 cfg.rope_high_freq_factor, cfg.rope_original_context)
        self.rope = be.asarray(rope_table(cfg.max_seq_len, freqs))  # (maxT, hs/2, 2) fp32 cos, sin; constant
        Lg, Ln = self.fp8_rows(1), self.fp8_rows(2)
        acts = [
            ("encoded", (B, T, C)),
            ("ln1", (Ln, B, T, C)), ("qkv", (L, B, T, W)), ("atty", (L, B, T, C)),
            ("residual2", (L, B, T, C)), ("ln2", (Ln, B, T, C)),
            ("fc", (L, B, T, 2 * F)), ("sw", (Lg, B, T, F)),
            ("residual3", (L, B, T, C)), ("lnf", (B, T, C)),
            ("proj", (B, T, C)),                     # attproj / fcproj outputs: consumed at once, reused
        ]
        stats = [("ln1_rstd", (L, B, T)), ("ln2_rstd", (L, B, T)), ("lnf_rstd", (B, T))]
        (acts if att_kind == "act" else stats).append(("att", (L,) + tuple(att_shape)))
        grads = [("dresidual", (B, T, C)), ("dbtc", (B, T, C)), ("dfc", (B, T, 2 * F)), ("dsw", (B, T, F)),
                 ("dqkv", (B, T, W))]
        return acts, grads, stats

    def op_shapes(self) -> OpShapes:
        cfg, C = self.cfg, self.cfg.channels
        return OpShapes(self.B, self.T, C, cfg.num_heads, cfg.num_kv_heads, cfg.head_size, cfg.vocab_size,
                        self.Vl, linears=((cfg.qkv_width, C), (C, C), (2 * cfg.ffn_hidden, C),
                                          (C, cfg.ffn_hidden), (self.Vl, C)))

    def memory_plan(self) -> dict[str, int]:
        plan = super().memory_plan()
        plan["activations"] += self.rope.nbytes
        return plan

    def _ln1(self, l):
        return self.acts["ln1"][self.fp8_slot(2, l)]

    def _ln2(self, l):
        return self.acts["ln2"][self.fp8_slot(2, l)]

    def _sw(self, l):
        return self.acts["sw"][self.fp8_slot(1, l)]

    # ---- forward --------------------------------------------------------------------------------------------
    def forward(self, tokens=None, targets=None, grad_scale: float | None = None, *, return_loss: bool = True,
                state: KVCache | None = None) -> float | None:
        """As GPT-2's forward (models/gpt2.py): the mean loss with targets (and the LM head's backward with
        grad_scale), else the logits; state: decoding at position state.pos over its KV cache, or a prefill of it
        (T > 1)."""
        be, cfg, a, s, p = self.be, self.cfg, self.acts, self.stats, self.params
        L, H, K, eps = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.norm_eps
        if tokens is not None:
            self.set_batch(tokens, targets)
        pos = 0 if state is None else state.pos
        be.encoder_forward(a["encoded"], self.tokens, p["wte"], None)
        be.rmsnorm_forward(self._ln1(0), s["ln1_rstd"][0], a["encoded"], p["ln1w"][0], eps, fp8_next=p["qkvw"][0])
        for l in range(L):
            residual = a["encoded"] if l == 0 else a["residual3"][l - 1]
            be.matmul_forward(a["qkv"][l], self._ln1(l), p["qkvw"][l], None)
            be.rope_forward(a["qkv"][l], self.rope, H, K, pos)
            if state is None or self.T > 1:
                be.attention_forward(a["atty"][l], self.saved("att")[l], a["qkv"][l], H, K)
                if state is not None:  # a prefill: its keys and values fill the cache from position 0
                    be.kv_cache_write(state.k[l], state.v[l], a["qkv"][l][:, :state.span], 0, H, K)
            else:
                be.attention_decode(a["atty"][l], a["qkv"][l], state.k[l], state.v[l], pos, H, K)
            be.matmul_forward(a["proj"], a["atty"][l], p["attprojw"][l], None)
            be.fused_residual_rmsnorm_forward(a["residual2"][l], self._ln2(l), s["ln2_rstd"][l], residual,
                                              a["proj"], p["ln2w"][l], eps, fp8_next=p["fcw"][l])
            be.matmul_forward(a["fc"][l], self._ln2(l), p["fcw"][l], None)
            be.swiglu_forward(self._sw(l), a["fc"][l], fp8_next=p["fcprojw"][l])
            be.matmul_forward(a["proj"], self._sw(l), p["fcprojw"][l], None)
            if l + 1 < L:  # this block's residual add, fused with the next block's first RMSNorm
                be.fused_residual_rmsnorm_forward(a["residual3"][l], self._ln1(l + 1), s["ln1_rstd"][l + 1],
                                                  a["residual2"][l], a["proj"], p["ln1w"][l + 1], eps,
                                                  fp8_next=p["qkvw"][l + 1])
            else:
                be.fused_residual_rmsnorm_forward(a["residual3"][l], a["lnf"], s["lnf_rstd"], a["residual2"][l],
                                                  a["proj"], p["lnfw"], eps)
        return self.lm_head(a["lnf"], a["dbtc"] if self.training else None, grad_scale, return_loss, state)

    # ---- backward -------------------------------------------------------------------------------------------
    def backward(self, hooks=None) -> None:
        """Accumulates parameter gradients (+=) from the dlnf the LM head left in dbtc; hooks as in GPT-2's."""
        be, cfg, a, s, p, g = self.be, self.cfg, self.acts, self.stats, self.params, self.grads
        L, H, K, eps = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.norm_eps
        dres, dbtc, dfc, dsw, dqkv = a["dresidual"], a["dbtc"], a["dfc"], a["dsw"], a["dqkv"]
        be.fill_zero(dres)
        be.rmsnorm_backward(dres, g["lnfw"], dbtc, a["residual3"][L - 1], p["lnfw"], s["lnf_rstd"])
        for l in reversed(range(L)):
            if hooks is not None:
                hooks.before_layer(l)
            residual = a["encoded"] if l == 0 else a["residual3"][l - 1]
            if self.fp8_redo(2, l):
                be.rmsnorm_forward(self._ln2(l), s["ln2_rstd"][l], a["residual2"][l], p["ln2w"][l], eps)
            # MLP: dres flows unchanged into fcproj's output (the residual add)
            if self.fp8_redo(1, l):  # the SwiGLU backward reforms its output too; fcproj's dw waits for it
                be.matmul_backward(dsw, None, None, dres, None, p["fcprojw"][l])
                be.swiglu_backward(dfc, a["fc"][l], dsw, redo=self._sw(l))
                be.matmul_backward(None, g["fcprojw"][l], None, dres, self._sw(l), p["fcprojw"][l])
            else:
                be.matmul_backward(dsw, g["fcprojw"][l], None, dres, self._sw(l), p["fcprojw"][l])
                be.swiglu_backward(dfc, a["fc"][l], dsw, fp8_next=p["fcw"][l])
            be.matmul_backward(dbtc, g["fcw"][l], None, dfc, self._ln2(l), p["fcw"][l])
            be.rmsnorm_backward(dres, g["ln2w"][l], dbtc, a["residual2"][l], p["ln2w"][l], s["ln2_rstd"][l])
            # attention
            be.matmul_backward(dbtc, g["attprojw"][l], None, dres, a["atty"][l], p["attprojw"][l])
            be.attention_backward(dqkv, dbtc, a["qkv"][l], self.saved("att")[l], H, out=a["atty"][l], kv_heads=K)
            be.rope_backward(dqkv, self.rope, H, K)
            if self.fp8_redo(2, l):
                be.rmsnorm_forward(self._ln1(l), s["ln1_rstd"][l], residual, p["ln1w"][l], eps)
            be.matmul_backward(dbtc, g["qkvw"][l], None, dqkv, self._ln1(l), p["qkvw"][l])
            be.rmsnorm_backward(dres, g["ln1w"][l], dbtc, residual, p["ln1w"][l], s["ln1_rstd"][l])
            if hooks is not None:
                hooks.after_layer(l)
        be.encoder_backward(g["wte"], None, dres, self.tokens)
        if hooks is not None:
            hooks.done()

    # ---- decoding -------------------------------------------------------------------------------------------
    def new_decode_state(self, length: int) -> KVCache:
        """A KV cache of K heads: NH/K times smaller than one of NH heads."""
        cfg = self.cfg
        shape = (cfg.num_layers, self.B, cfg.num_kv_heads, min(length, cfg.max_seq_len), cfg.head_size)
        return KVCache.allocate(self.be, shape)


FAMILY = Family(name="llama3", title="Llama 3", config=LlamaConfig, model=Llama, spec=spec, parse=config_from_name,
                names=NAMES)
