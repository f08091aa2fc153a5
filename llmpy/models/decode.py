"""Text generation through a family's own forward, one position at a time with state: a KV cache for attention
families (each new token costs one position; llm.c recomputes the whole sequence for every token).

`decoder(cfg, params, backend)` makes a family's model for decoding (B = 1, T = 1, no training); `generate` feeds it
the prompt and draws new tokens with `sample_token` (temperature, top-k, top-p), sliding its window past the
model's context.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UserError


@dataclass
class KVCache:
    """Every layer's keys and values so far: k, v (L, B, KV heads, capacity, hs); positions < pos are filled."""
    k: Any
    v: Any
    pos: int = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @classmethod
    def allocate(cls, backend, shape: tuple[int, ...]) -> "KVCache":
        n = int(np.prod(shape))
        k, v = (backend.zeros(n, backend.act_dtype).reshape(shape) for _ in range(2))
        return cls(k, v)


@dataclass
class RecurrentState:
    """Every layer's recurrent state h (L, B, d) in fp32 (the stat dtype), after positions < pos; a recurrent model
    has no cache to fill, so capacity only bounds the decoding window as the context bounds an attention model's."""
    h: Any
    capacity: int
    pos: int = 0

    @classmethod
    def allocate(cls, backend, shape: tuple[int, ...], capacity: int) -> "RecurrentState":
        return cls(backend.zeros(int(np.prod(shape)), backend.stat_dtype).reshape(shape), capacity)


def decoder(cfg, params: dict[str, np.ndarray], backend):
    """cfg's family model on `backend`, planned for decoding one sequence (B = 1, T = 1), holding `params`."""
    from .base import inference_model
    return inference_model(cfg, params, backend, 1, 1)


def sample_token(logits: np.ndarray, rng: np.random.Generator, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None) -> int:
    """Draws from softmax(logits / temperature) restricted to the top_k largest, then to the smallest set of the
    most likely tokens whose probability reaches top_p (nucleus sampling); temperature 0 is greedy. One uniform
    draw per token."""
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    if top_k is not None and 0 < top_k < z.size:
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z >= kth, z, -np.inf)
    prob = np.exp(z - z.max())
    if top_p is not None and top_p < 1:
        order = np.argsort(-prob, kind="stable")
        mass = np.cumsum(prob[order])
        cut = int(np.searchsorted(mass, top_p * mass[-1])) + 1  # the first prefix whose mass reaches top_p
        kept = np.zeros_like(prob)
        kept[order[:cut]] = prob[order[:cut]]
        prob = kept
    cdf = np.cumsum(prob)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), z.size - 1))


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """UserError for settings that cannot mean a distribution."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise UserError(f"temperature must be a number >= 0 (got {temperature})")
    if top_k is not None and top_k < 0:
        raise UserError(f"top-k must be >= 0 (0 = all tokens; got {top_k})")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"top-p must be in (0, 1] (got {top_p})")


def generate(model, prompt: list[int], max_new_tokens: int, *, rng: np.random.Generator,
             temperature: float = 1.0, top_k: int | None = 40, top_p: float | None = None,
             stop_at: int | None = None, on_token=None) -> list[int]:
    """The new tokens (not the prompt) that `model` (from `decoder`) continues `prompt` with, drawn one at a time.
    Stops early after drawing `stop_at` (e.g. the end-of-text token) when given. `on_token(id)` hears each token as
    it is drawn (streaming). Past the model's context the window slides: the last maxT-1 tokens are fed again into
    a fresh state, so every token sees at least maxT-1 before it (a prompt longer than the context is read from
    its last maxT tokens)."""
    cfg = model.cfg
    maxT = cfg.max_seq_len
    check_sampling(temperature, top_k, top_p)
    if max_new_tokens < 0:
        raise UserError(f"the number of new tokens must be >= 0 (got {max_new_tokens})")
    if any(not 0 <= t < cfg.vocab_size for t in prompt):
        raise UserError(f"prompt holds a token id outside the vocabulary of {cfg.vocab_size}")
    seq = list(prompt)
    window = seq[-maxT:]
    state = model.new_decode_state(min(len(window) + max_new_tokens, maxT))
    logits = model.decode_step(np.array([window]), state)[0]
    out = []
    for i in range(max_new_tokens):
        t = sample_token(logits, rng, temperature, top_k, top_p)
        out.append(t)
        seq.append(t)
        if on_token is not None:
            on_token(t)
        if stop_at is not None and t == stop_at:
            break
        if i + 1 == max_new_tokens:
            break
        if state.pos < maxT:
            logits = model.decode_step(np.array([[t]]), state)[0]
        else:  # the context is full: slide the window
            state = model.new_decode_state(maxT)
            logits = model.decode_step(np.array([seq[-max(1, maxT - 1):]]), state)[0]
    return out
