"""Text generation through a family's own forward with state: a KV cache for attention families (each new token
costs one position; llm.c recomputes the whole sequence for every token), a recurrent state for the MatMul-free LM.

`decoder(cfg, params, backend, batch)` makes a family's model for decoding `batch` sequences at once (B = batch,
T = 1, no training); `generate_batch` feeds it the prompt in one forward (a prefill, once, its state copied to every
sequence) and draws new tokens one position at a time with `sample_tokens` (temperature, top-k, top-p), each
sequence with its own random generator; `generate` is the same for one sequence. Past the model's context an
attention model's windows slide, each window prefilled in one forward; a recurrent state does not grow, so a
recurrent model just goes on.

Memory: each sequence of a batch holds its own state (a KV cache of 2 L KVH hs bytes-per-value per position, or a
recurrent state of L d fp32 values) and its rows of a step's activations (the widest: its logits, Vp values);
`row_bytes` tells, and the `sample` command checks the batch against the free memory before it allocates it.
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

    def row(self, b: int) -> "KVCache":
        """Sequence b's cache as a state of one sequence (views: what a B = 1 model writes lands in row b)."""
        return KVCache(self.k[:, b:b + 1], self.v[:, b:b + 1], self.pos)

    def copy_first_row(self, backend) -> None:
        """Every sequence's cache = the first's, positions < pos (one prompt prefilled once for a batch): the bits,
        as unsigned integers of the element's size (CuPy has no bf16 arithmetic to copy with)."""
        for x in (self.k, self.v):
            bits = x.view(np.dtype(f"u{x.itemsize}"))
            backend.copy_(bits[:, 1:, :, :self.pos], bits[:, :1, :, :self.pos])


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

    def row(self, b: int) -> "RecurrentState":
        """Sequence b's state as a state of one sequence (a view)."""
        return RecurrentState(self.h[:, b:b + 1], self.pos)

    def copy_first_row(self, backend) -> None:
        """Every sequence's state = the first's."""
        backend.copy_(self.h[:, 1:], self.h[:, :1])


def decoder(cfg, params: dict[str, np.ndarray], backend, batch: int = 1, *, weights_of=None):
    """cfg's family model on `backend`, planned for decoding `batch` sequences at once (B = batch, T = 1), holding
    `params` (or sharing the weights of `weights_of`, another decoder of cfg: then params is not read); it plans a
    prefill model (B = 1) sharing its weights when a window is first fed (Model.prefill_model)."""
    if weights_of is None and batch == 1:
        from .base import inference_model
        return inference_model(cfg, params, backend, 1, 1)
    if weights_of is None:
        weights_of = decoder(cfg, params, backend)
    from ..config import family_of
    # all B rows' logits in one chunk: a step reads every row's
    model = family_of(cfg).model(cfg, backend, batch, 1, training=False, packed=weights_of.is_packed,
                                 logits_chunk=batch, weights_of=weights_of)
    model.row_model = weights_of if weights_of.B == 1 else None  # row_decoder's, made on first use otherwise
    return model


def row_bytes(one, length: int) -> tuple[int, int, str]:
    """(state bytes, activation bytes, what the state is) that each sequence of a batch adds, from `one`, a decoder
    of one sequence, for sequences of up to `length` tokens: its decoding state and its decoding step's activations
    (a batch's activations are at most B times these; the weights are shared)."""
    state = one.new_decode_state(1)  # a cache's bytes: one position's times the positions (not allocated)
    kv = isinstance(state, KVCache)
    nbytes = int(state.k.nbytes + state.v.nbytes) * min(length, one.cfg.max_seq_len) if kv else int(state.h.nbytes)
    return nbytes, one.acts.nbytes() + one.stats.nbytes(), "KV cache" if kv else "recurrent state"


def kth_largest(x: np.ndarray, k: int, chunk: int = 128) -> np.ndarray:
    """(B,) the k-th largest of each row of x (B, V), 0 < k <= V: np.partition(x, -k)[:, -k], found among far fewer
    values. The k-th largest of the rows' chunk maxima is a lower bound (k chunks each hold a value at least that
    large), so only the values at or above it can be the answer: a few k of V = 32,000 rather than all of them
    (128 x 32,000: ~30 ms -> a few ms). Rows with a NaN take np.partition's own answer."""
    B, V = x.shape
    n = V // chunk
    if k > n:
        return np.partition(x, -k, axis=-1)[:, -k]
    maxima = x[:, :n * chunk].reshape(B, n, chunk).max(axis=-1)
    if V % chunk:
        maxima = np.concatenate([maxima, x[:, n * chunk:].max(axis=-1, keepdims=True)], axis=1)
    if not np.isfinite(maxima.max(axis=-1)).all():  # a row's largest value (NaN if it holds one)
        return np.partition(x, -k, axis=-1)[:, -k]
    floor = np.partition(maxima, -k, axis=-1)[:, -k]
    return np.array([np.partition(row[row >= f], -k)[-k] for row, f in zip(x, floor)], x.dtype)


def sample_tokens(logits: np.ndarray, rngs, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> np.ndarray:
    """One token per row of logits (B, V), row b drawn with rngs[b]: from softmax(logits / temperature) restricted
    to the top_k largest (ties with the k-th kept), then to the smallest set of the most likely tokens whose
    probability reaches top_p (nucleus sampling); temperature 0 is greedy. One uniform draw per row, inverted
    through the cumulative sum in token order. Each row's arithmetic is that row's alone: a row draws the same
    token in any batch. The whole vocabulary is read to find the k-th largest (kth_largest) and compared with it
    once; the rest runs on the tokens top_k keeps (summing the dropped tokens' zeros would change no bit)."""
    if temperature == 0:
        return np.argmax(logits, axis=-1)
    B, V = logits.shape
    keep = None
    if top_k is not None and 0 < top_k < V:
        # (B, V): each row's k largest and ties, the k-th found among the logits as given (fp32: half the bytes);
        # z = logits / temperature keeps their order (a division by a positive number)
        keep = logits >= kth_largest(logits, top_k)[:, None]
    out = np.empty(B, np.int64)
    for b in range(B):
        idx = np.flatnonzero(keep[b]) if keep is not None else None  # the candidates, in token order
        z = (logits[b] if idx is None else logits[b, idx]).astype(np.float64) / temperature
        prob = np.exp(z - z.max())  # the row's largest logit is always a candidate
        if top_p is not None and top_p < 1:
            order = np.argsort(-prob, kind="stable")
            mass = np.cumsum(prob[order])
            cut = int(np.searchsorted(mass, top_p * mass[-1])) + 1  # the first prefix whose mass reaches top_p
            kept = np.zeros_like(prob)
            kept[order[:cut]] = prob[order[:cut]]
            prob = kept
        cdf = np.cumsum(prob)
        j = min(int(np.searchsorted(cdf, rngs[b].random() * cdf[-1], side="right")), prob.size - 1)
        out[b] = j if idx is None else idx[j]
    return out


def sample_token(logits: np.ndarray, rng: np.random.Generator, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None) -> int:
    """sample_tokens for one row of logits (V,)."""
    return int(sample_tokens(np.asarray(logits)[None], [rng], temperature, top_k, top_p)[0])


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
    """The new tokens (not the prompt) that `model` (from `decoder`, one sequence) continues `prompt` with, drawn
    one at a time: generate_batch for one sequence. `on_token(id)` hears each token as it is drawn (streaming)."""
    hear = None if on_token is None else (lambda b, t: on_token(t))
    return generate_batch(model, prompt, max_new_tokens, rngs=[rng], temperature=temperature, top_k=top_k,
                          top_p=top_p, stop_at=stop_at, on_token=hear)[0]


def row_decoder(model):
    """The decoder of one sequence that prefills a batched decoder's rows one at a time, sharing its weights (the
    model itself when it decodes one sequence); made on first use."""
    if model.B == 1:
        return model
    if getattr(model, "row_model", None) is None:
        model.row_model = decoder(model.cfg, {}, model.be, weights_of=model)
    return model.row_model


def prefill(model, state, windows: list[list[int]], plan: int | None, rows=None) -> np.ndarray:
    """Feeds each sequence b of `rows` (default all) its window windows[b] into a fresh `state` (pos 0) and returns
    the logits (B, V) that follow (rows not fed: zeros). One sequence's window is one forward of the prefill plan
    (Model.decode_step); a batch feeds its rows one at a time through row_decoder, except one window shared by all
    (the prompt), fed once and copied to every row."""
    if model.B == 1:
        return model.decode_step(np.array(windows), state, prefill_len=plan)
    one, V = row_decoder(model), model.cfg.vocab_size
    rows = range(model.B) if rows is None else rows
    if len(rows) == model.B and all(w == windows[0] for w in windows):
        sub = state.row(0)
        logits = one.decode_step(np.array([windows[0]]), sub, prefill_len=plan)
        state.pos = sub.pos
        state.copy_first_row(model.be)
        return np.repeat(logits, model.B, axis=0)
    logits = np.zeros((model.B, V), np.float32)
    subs = [state.row(b) for b in rows]  # each from the batch's pos 0
    for b, sub in zip(rows, subs):
        logits[b] = one.decode_step(np.array([windows[b]]), sub, prefill_len=plan)[0]
    state.pos = subs[0].pos
    return logits


def generate_batch(model, prompt: list[int], max_new_tokens: int, *, rngs: list[np.random.Generator],
                   temperature: float = 1.0, top_k: int | None = 40, top_p: float | None = None,
                   stop_at: int | None = None, on_token=None) -> list[list[int]]:
    """The new tokens of model.B sequences that continue one `prompt`, drawn together one position at a time
    (each decoding step one forward of B rows), sequence b drawing with rngs[b]. The prompt is prefilled once, in
    one forward, and its state copied to every sequence; a prompt longer than the model's context is read from its
    last maxT tokens. A sequence stops after drawing `stop_at` when given (the others go on; the batch ends when
    all have stopped). `on_token(b, id)` hears each token as it is drawn. Past the context an attention model's
    window slides, all sequences together: each one's state is filled again from its last maxT-1 tokens, in one
    forward each, so every token sees at least maxT-1 before it; a recurrent state has no bound, and decoding goes
    on with it."""
    cfg, B = model.cfg, model.B
    maxT = cfg.max_seq_len
    check_sampling(temperature, top_k, top_p)
    if len(rngs) != B:
        raise ValueError(f"{len(rngs)} random generators for a decoder of {B} sequences")
    if max_new_tokens < 0:
        raise UserError(f"the number of new tokens must be >= 0 (got {max_new_tokens})")
    if any(not 0 <= t < cfg.vocab_size for t in prompt):
        raise UserError(f"prompt holds a token id outside the vocabulary of {cfg.vocab_size}")
    seqs = [list(prompt) for _ in range(B)]
    window = seqs[0][-maxT:]
    state = model.new_decode_state(min(len(window) + max_new_tokens, maxT))
    slides = len(window) + max_new_tokens - 1 > state.capacity  # the tokens fed overrun the state
    slid = max(1, maxT - 1)
    # every window of a call through one prefill plan (the prompt padded to the slid windows' length), so that the
    # same call gives the same bits whatever ran before
    plan = max(len(window), slid) if slides else None
    logits = prefill(model, state, [window] * B, plan)
    out = [[] for _ in range(B)]
    live = list(range(B))  # the sequences not stopped
    for i in range(max_new_tokens):
        toks = sample_tokens(logits, rngs, temperature, top_k, top_p)
        for b in live:
            t = int(toks[b])
            out[b].append(t)
            seqs[b].append(t)
            if on_token is not None:
                on_token(b, t)
        if stop_at is not None:
            live = [b for b in live if out[b][-1] != stop_at]
        if not live or i + 1 == max_new_tokens:
            break
        if state.pos < state.capacity:  # a stopped sequence is fed its last token again, its logits unread
            logits = model.decode_step(np.array([s[-1] for s in seqs])[:, None], state)
        else:  # the context is full: slide the windows, filling the same cache again from position 0
            state.pos = 0
            logits = prefill(model, state, [s[-slid:] for s in seqs], plan, rows=live)
    return out
