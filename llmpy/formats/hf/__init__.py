"""Hugging Face weights (`model.safetensors` + `config.json`), from and to LOCAL files (no hub access).

The tensor names come from the family's spec (ParamSpec.hf, with "{l}" for the layer; hf_transposed for layers HF
stores transposed); per-layer tensors are stacked along a new axis 0. HF's embedding holds the real vocabulary, so
tensors with padded vocabulary rows are padded with zero rows on import and cut on export. What differs by family
(config.json, detection, extra tensors such as buffers or a tied head) is in formats/hf/<family>.py.

`path` may name the .safetensors file or a folder holding `model.safetensors`; `config.json` is looked for next to
the file.
"""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import numpy as np

from ...config import family_of
from ...errors import UserError
from .. import check_params
from ..atomic import atomic_write
from ..safetensors import load_safetensors, read_safetensors_header, save_safetensors

WEIGHTS_NAME = "model.safetensors"
CODECS = ("gpt2",)  # families with an HF codec in formats/hf/<family>.py


def _codec(family: str):
    if family not in CODECS:
        raise UserError(f"there is no Hugging Face format for the {family} family")
    return importlib.import_module(f"{__name__}.{family}")


def _weights_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p / WEIGHTS_NAME if p.is_dir() else p


def _detect(keys) -> str | None:
    for family in CODECS:
        if _codec(family).detect(keys):
            return family
    return None


def is_hf_model(path: str | os.PathLike) -> bool:
    """True if `path` (a file, or a folder with model.safetensors) is a safetensors file with a known family's
    HF keys."""
    try:
        infos, _ = read_safetensors_header(_weights_file(path))
    except UserError:
        return False
    return _detect(infos) is not None


def read_hf_model(path: str | os.PathLike):
    """Import HF weights as (config, float32 params in our layout, vocabulary rows padded with zeros)."""
    file = _weights_file(path)
    raw, _ = load_safetensors(file)
    family = _detect(raw)
    if family is None:
        raise UserError(f"{file} is not a Hugging Face model file of a known family")
    codec = _codec(family)
    t = codec.clean(file, raw)
    cfg = codec.config(file, t)
    specs = family_of(cfg).spec(cfg)
    params: dict[str, np.ndarray] = {}
    for s in specs:
        if s.per_layer:
            layers = [_take(file, t, s.hf.format(l=i)) for i in range(s.shape[0])]
            params[s.name] = np.stack([w.T if s.hf_transposed else w for w in layers])
        else:
            a = _take(file, t, s.hf)
            params[s.name] = a.T if s.hf_transposed else a
        if s.vocab_rows is not None:
            padded = np.zeros(s.shape, np.float32)
            padded[:s.vocab_rows] = params[s.name]
            params[s.name] = padded
    if t:
        raise UserError(f"{file}: unexpected tensors for {codec.TITLE}: {', '.join(sorted(t)[:5])}"
                        + (" ..." if len(t) > 5 else ""))
    return cfg, check_params(cfg, params, str(file))


def _take(file: Path, t: dict[str, np.ndarray], key: str) -> np.ndarray:
    if key not in t:
        raise UserError(f"{file} is missing the tensor {key}")
    a = t.pop(key)
    if a.dtype.kind != "f":
        raise UserError(f"{file}: tensor {key} has dtype {a.dtype}, want floating point")
    return a.astype(np.float32, copy=False)


def write_hf_model(path: str | os.PathLike, cfg, params: dict[str, np.ndarray]) -> None:
    """Export to HF: `path` is the .safetensors file to write, or a folder (created if needed) that gets
    model.safetensors; config.json is written beside it. Float32, vocabulary padding cut, HF's orientation.
    Each of the two files is replaced atomically (the weights first)."""
    codec = _codec(type(cfg).family)
    p = Path(path)
    if p.suffix != ".safetensors":
        p.mkdir(parents=True, exist_ok=True)
        p = p / WEIGHTS_NAME
    params = check_params(cfg, params, f"cannot write {p}")
    out = {}
    for s in sorted(family_of(cfg).spec(cfg), key=lambda s: s.per_layer):  # the global tensors first
        a = params[s.name] if s.vocab_rows is None else params[s.name][:s.vocab_rows]
        for i in range(s.shape[0]) if s.per_layer else [None]:
            w = a if i is None else a[i]
            out[s.hf.format(l=i)] = w.T if s.hf_transposed else w
    # transformers refuses safetensors files without a "format" entry in the metadata
    save_safetensors(p, out, {"format": "pt"})
    text = json.dumps(codec.config_json(cfg), indent=2) + "\n"
    atomic_write(p.parent / "config.json", lambda f: f.write(text.encode("utf-8")))
