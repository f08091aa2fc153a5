"""Where `llmpy convert` writes: the format an output name stands for, and what is already there.

A command never replaces a file or folder it did not create unless told to (`--overwrite`): an output that exists
(for a Hugging Face folder: one that holds anything) is refused, and an output name whose format cannot be told
(`out.txt`, a typo such as `model.safetensor`) is refused with the choices rather than guessed.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import UserError
from .hf import TOKENIZER_FILES

FORMATS = ("llmc", "llmc-bf16", "hf", "checkpoint", "ternary", "ternary-2bit")
# what an HF export writes beside model.safetensors (formats/hf: the tokenizer files, its own or a source
# folder's), and the sharded layout it replaces
HF_FILES = ("model.safetensors", "model.safetensors.index.json", "config.json", "vocab.json", "merges.txt",
            *TOKENIZER_FILES)
_HF_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def output_format(output: str, to: str | None) -> str:
    """The format `--to` names, else the one the output's name stands for: `.bin` llm.c, `model.safetensors` or
    a folder (an existing one, a name ending in /, or a name without an extension) Hugging Face, another
    `.safetensors` our weights-only checkpoint. Any other name is refused with the choices."""
    if to is not None:
        return to
    p = Path(output)
    if output.endswith(("/", os.sep)) or p.is_dir() or not p.suffix:
        return "hf"
    if p.suffix == ".bin":
        return "llmc"
    if p.suffix == ".safetensors":
        return "hf" if p.name == "model.safetensors" else "checkpoint"
    raise UserError(f"cannot tell which format {output} should be from its name: use a name ending in .safetensors "
                    "(llmpy weights), .bin (llm.c) or model.safetensors, or a folder name without an extension "
                    f"(Hugging Face); or give --to ({', '.join(FORMATS)})")


def existing(output: str, fmt: str) -> list[Path]:
    """What writing `output` as `fmt` would replace: the file; for a Hugging Face folder everything in it; for an
    HF `*.safetensors` file the files an export writes beside it."""
    p = Path(output)
    if fmt == "hf" and p.suffix != ".safetensors":
        return sorted(p.iterdir()) if p.is_dir() else [p] if p.exists() else []
    if fmt == "hf":
        return [f for f in dict.fromkeys([p, *(p.parent / n for n in HF_FILES)]) if f.exists()]
    return [p] if p.exists() or p.is_symlink() else []


def check_output(output: str, fmt: str, overwrite: bool) -> None:
    """Refuses, in one line and before anything is read or written, to replace what is already at `output` unless
    `overwrite`."""
    p = Path(output)
    found = existing(output, fmt)
    if found and not overwrite:
        if found == [p] and not p.is_dir():
            where = f"{output} exists"
        else:
            names = ", ".join(f.name for f in found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
            where = f"{p if p.is_dir() else p.parent} already holds {names}"
        raise UserError(f"{where}: choose another output, or add --overwrite to replace it")


def drop_hf_shards(output: str) -> None:
    """Before an HF export replaces a folder's model (--overwrite): its sharded weights (an index and its shards)
    go, so that the model.safetensors written next is the one a reader finds."""
    p = Path(output)
    folder = p.parent if p.suffix == ".safetensors" else p
    for f in folder.iterdir() if folder.is_dir() else []:
        if f.name == "model.safetensors.index.json" or _HF_SHARD.fullmatch(f.name):
            f.unlink()
