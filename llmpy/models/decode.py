"""Text generation through a family's own forward, one position at a time with state: a KV cache for attention
families (each new token costs one position; llm.c recomputes the whole sequence for every token).

`decoder(cfg, params, backend)` makes a family's model for decoding (B = 1, T = 1, no training); `generate` feeds it
the prompt and draws new tokens with `sample_token`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UserError


@dataclass
class KVCache:
    """Every layer's keys and values so far: k, v (L, B, KV heads, maxT, hs); positions < pos are filled."""
    k: Any
    v: Any
    pos: int = 0

    @classmethod
    def allocate(cls, backend, shape: tuple[int, ...]) -> "KVCache":
        n = int(np.prod(shape))
        k, v = (backend.zeros(n, backend.act_dtype).reshape(shape) for _ in range(2))
        return cls(k, v)


def decoder(cfg, params: dict[str, np.ndarray], backend):
    """cfg's family model on `backend`, planned for decoding one sequence (B = 1, T = 1), holding `params`."""
    from ..config import family_of
    model = family_of(cfg).model(cfg, backend, 1, 1, training=False)
    model.load_params(params)
    return model


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


def generate(model, prompt: list[int], max_new_tokens: int, *, rng: np.random.Generator,
             temperature: float = 1.0, top_k: int | None = 40, stop_at: int | None = None,
             on_token=None) -> list[int]:
    """The new tokens (not the prompt) that `model` (from `decoder`) continues `prompt` with, drawn one at a time.
    Stops early after drawing `stop_at` (e.g. the end-of-text token) when given. `on_token(id)` hears each token as
    it is drawn (streaming)."""
    cfg = model.cfg
    if temperature < 0:
        raise UserError(f"temperature must be >= 0 (got {temperature})")
    if len(prompt) + max_new_tokens > cfg.max_seq_len:
        raise UserError(f"prompt ({len(prompt)} tokens) + {max_new_tokens} new tokens exceeds the model's context "
                        f"of {cfg.max_seq_len} tokens")
    if any(not 0 <= t < cfg.vocab_size for t in prompt):
        raise UserError(f"prompt holds a token id outside the vocabulary of {cfg.vocab_size}")
    state = model.new_decode_state()
    logits = model.decode_step(np.array([prompt]), state)[0]
    out = []
    for i in range(max_new_tokens):
        t = sample_token(logits, rng, temperature, top_k)
        out.append(t)
        if on_token is not None:
            on_token(t)
        if stop_at is not None and t == stop_at:
            break
        if i + 1 < max_new_tokens:
            logits = model.decode_step(np.array([[t]]), state)[0]
    return out
