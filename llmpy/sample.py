"""Text generation with a KV cache: the prompt is encoded in one pass, then each new token costs one position
(llm.c recomputes the whole sequence for every token and cannot take a prompt).

Inference only, batch 1, NumPy on the host: it reuses the reference layers' forward functions.
"""
from __future__ import annotations

import math

import numpy as np

from . import layers as Lr
from .config import GPT2Config
from .errors import UserError


class KVCacheDecoder:
    """Keeps each layer's keys and values (L, NH, maxT, hs) so position t attends to 0..t without recomputing."""

    def __init__(self, cfg: GPT2Config, params: dict[str, np.ndarray]):
        self.cfg, self.p = cfg, params
        L, NH, T, hs = cfg.num_layers, cfg.num_heads, cfg.max_seq_len, cfg.head_size
        self.k = np.zeros((L, NH, T, hs), np.float32)
        self.v = np.zeros((L, NH, T, hs), np.float32)
        self.pos = 0

    def forward(self, tokens) -> np.ndarray:
        """Feeds n new tokens at positions pos..pos+n-1; returns the logits (V,) that follow the last one."""
        cfg, p = self.cfg, self.p
        toks = np.asarray(tokens, dtype=np.int64).reshape(1, -1)
        n, C, NH, hs, t0 = toks.shape[1], cfg.channels, cfg.num_heads, cfg.head_size, self.pos
        if n == 0:
            raise UserError("nothing to decode: the prompt is empty")
        if t0 + n > cfg.max_seq_len:
            raise UserError(f"the sequence would reach {t0 + n} tokens, past the model's context of "
                            f"{cfg.max_seq_len}: use a shorter prompt or fewer new tokens")
        x = np.empty((1, n, C), np.float32)
        Lr.encoder_forward(x, toks, p["wte"], p["wpe"][t0:])
        h = np.empty_like(x)
        mean, rstd = np.empty((1, n), np.float32), np.empty((1, n), np.float32)
        qkv = np.empty((1, n, 3 * C), np.float32)
        fc, fcg, proj = np.empty((1, n, 4 * C), np.float32), np.empty((1, n, 4 * C), np.float32), np.empty_like(x)
        # causal mask inside the new block: query i (position t0+i) sees keys 0..t0+i
        future = np.arange(t0 + n)[None, :] > (t0 + np.arange(n))[:, None]
        for l in range(cfg.num_layers):
            Lr.layernorm_forward(h, mean, rstd, x, p["ln1w"][l], p["ln1b"][l])
            Lr.matmul_forward(qkv, h, p["qkvw"][l], p["qkvb"][l])
            q, k, v = (qkv[0, :, i * C:(i + 1) * C].reshape(n, NH, hs).transpose(1, 0, 2) for i in range(3))
            self.k[l, :, t0:t0 + n], self.v[l, :, t0:t0 + n] = k, v
            att = q @ self.k[l, :, :t0 + n].transpose(0, 2, 1) / np.float32(math.sqrt(hs))  # (NH, n, t0+n)
            att[:, future] = -np.inf
            att = np.exp(att - att.max(-1, keepdims=True))
            att /= att.sum(-1, keepdims=True)
            y = (att @ self.v[l, :, :t0 + n]).transpose(1, 0, 2).reshape(1, n, C)
            Lr.matmul_forward(proj, y, p["attprojw"][l], p["attprojb"][l])
            x += proj
            Lr.layernorm_forward(h, mean, rstd, x, p["ln2w"][l], p["ln2b"][l])
            Lr.matmul_forward(fc, h, p["fcw"][l], p["fcb"][l])
            Lr.gelu_forward(fcg, fc)
            Lr.matmul_forward(proj, fcg, p["fcprojw"][l], p["fcprojb"][l])
            x += proj
        last = np.empty((1, C), np.float32)
        Lr.layernorm_forward(last, mean[0, :1], rstd[0, :1], x[:, -1], p["lnfw"], p["lnfb"])
        self.pos += n
        return (last @ p["wte"][:cfg.vocab_size].T)[0]


def sample_token(logits: np.ndarray, rng: np.random.Generator, temperature: float = 1.0,
                 top_k: int | None = None) -> int:
    """Draws from softmax(logits / temperature) restricted to the top_k largest; temperature 0 is greedy."""
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    if top_k is not None and 0 < top_k < z.size:
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z >= kth, z, -np.inf)
    prob = np.exp(z - z.max())
    cdf = np.cumsum(prob)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), z.size - 1))


def generate(params: dict[str, np.ndarray], cfg: GPT2Config, prompt: list[int], max_new_tokens: int, *,
             rng: np.random.Generator, temperature: float = 1.0, top_k: int | None = 40,
             stop_at_eot: bool = False, eot: int = 50256, on_token=None) -> list[int]:
    """Returns the new tokens (not the prompt). `on_token(id)` is called as each one is drawn (streaming)."""
    if temperature < 0:
        raise UserError(f"temperature must be >= 0 (got {temperature})")
    if len(prompt) + max_new_tokens > cfg.max_seq_len:
        raise UserError(f"prompt ({len(prompt)} tokens) + {max_new_tokens} new tokens exceeds the model's context "
                        f"of {cfg.max_seq_len} tokens")
    if any(not 0 <= t < cfg.vocab_size for t in prompt):
        raise UserError(f"prompt holds a token id outside the vocabulary of {cfg.vocab_size}")
    dec = KVCacheDecoder(cfg, {k: np.asarray(v, np.float32) for k, v in params.items()})
    logits = dec.forward(prompt)
    out = []
    for i in range(max_new_tokens):
        t = sample_token(logits, rng, temperature, top_k)
        out.append(t)
        if on_token is not None:
            on_token(t)
        if stop_at_eot and t == eot:
            break
        if i + 1 < max_new_tokens:
            logits = dec.forward([t])
    return out
