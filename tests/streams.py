"""A learnable token stream for the training tests: short phrases of random tokens, repeated in random order."""
from __future__ import annotations

import numpy as np


def phrase_stream(rng: np.random.Generator, count: int, phrases: int = 20, length: int = 7,
                  vocab: int = 50257) -> np.ndarray:
    """`count` phrases drawn from `phrases` random ones of `length` token ids below `vocab`, concatenated."""
    table = [rng.integers(0, vocab, length) for _ in range(phrases)]
    return np.concatenate([table[i] for i in rng.integers(0, phrases, count)])
