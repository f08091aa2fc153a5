"""Text generation through a family's own forward with state: a KV cache for attention families (each new token
costs one position; llm.c recomputes the whole sequence for every token), a recurrent state for the MatMul-free LM.

`decoder(cfg, params, backend)` makes a family's model for decoding (B = 1, T = 1, no training); `generate` feeds it
the prompt in one forward (a prefill) and draws new tokens one at a time with `sample_token` (temperature, top-k,
top-p). Past the model's context an attention model's window slides, each window prefilled in one forward; a
recurrent state does not grow, so a recurrent model just goes on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UserError


@dataclass
class KVCache:
    """Every layer's keys and values so far: k, v (L, B, KV heads, capacity, hs); positions < pos are filled. span:
    the positions pos..pos+span-1 the forward in progress feeds (1 a step; a prefill: its window's tokens)."""
    k: Any
    v: Any
    pos: int = 0
    span: int = 1

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
    """Every layer's recurrent state h (L, B, d) in fp32 (the stat dtype), after positions < pos; span as a
    KVCache's. It is the same size at any length, so its capacity has no bound: decoding goes on past the model's
    context, which bounds only the prompt read (its last max_seq_len tokens, fed in one prefill)."""
    h: Any
    pos: int = 0
    span: int = 1
    capacity: float = math.inf

    @classmethod
    def allocate(cls, backend, shape: tuple[int, ...]) -> "RecurrentState":
        return cls(backend.zeros(int(np.prod(shape)), backend.stat_dtype).reshape(shape))


def decoder(cfg, params: dict[str, np.ndarray], backend):
    """cfg's family model on `backend`, planned for decoding one sequence (B = 1, T = 1), holding `params`; it plans
    a prefill model sharing its weights when a window is first fed (Model.prefill_model)."""
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
    it is drawn (streaming). A prompt longer than the model's context is read from its last maxT tokens, in one
    forward (a prefill). Past the context an attention model's window slides: its state is filled again from the
    last maxT-1 tokens, in one forward, so every token sees at least maxT-1 before it; a recurrent state has no
    bound, and decoding goes on with it."""
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
    slides = len(window) + max_new_tokens - 1 > state.capacity  # the tokens fed overrun the state
    slid = max(1, maxT - 1)
    # every window of a call through one prefill plan (the prompt padded to the slid windows' length), so that the
    # same call gives the same bits whatever ran before
    plan = max(len(window), slid) if slides else None
    logits = model.decode_step(np.array([window]), state, prefill_len=plan)[0]
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
        if state.pos < state.capacity:
            logits = model.decode_step(np.array([[t]]), state)[0]
        else:  # the context is full: slide the window, filling the same cache again from position 0
            state.pos = 0
            logits = model.decode_step(np.array([seq[-slid:]]), state, prefill_len=plan)[0]
    return out
