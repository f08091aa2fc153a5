"""Hugging Face weights (`model.safetensors` + `config.json`), from and to LOCAL files (downloads: formats/hub.py).

The tensor names come from the family's spec (ParamSpec.hf, with "{l}" for the layer; hf_transposed for layers HF
stores transposed; several keys for a tensor of ours that concatenates HF's, e.g. Llama's q, k, v projections, with
hf_rows their rows); per-layer tensors are stacked along a new axis 0. A codec may transform a key's tensor on the
way (`to_ours`, `to_hf`: Llama's q/k row permutation). HF's embedding holds the real vocabulary, so
tensors with padded vocabulary rows are padded with zero rows on import and cut on export. What differs by family
(config.json, detection, extra tensors such as buffers or a tied head, the tokenizer and generation config written
beside an export) is in formats/hf/<family>.py.

`path` may name a .safetensors file, a sharded model's `model.safetensors.index.json`, or a folder holding either
`model.safetensors` or the index and its shards (`{"weight_map": {tensor: "model-00001-of-00002.safetensors"}}`);
`config.json` is looked for next to it.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np

from ...config import family_of
from ...errors import UserError
from ...models.base import MAX_SIZE
from ...paths import file_problem, make_dir, read_input
from .. import check_params
from ..atomic import atomic_write
from ..safetensors import load_safetensors, no_duplicates, read_safetensors_header, save_safetensors

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CODECS = ("gpt2", "llama3", "mmfree")  # families with an HF codec in formats/hf/<family>.py


def document_tokens(vocab_size: int) -> tuple[int, int] | None:
    """(bos, eos) ids of the tokenizer llmpy reads a model of this vocabulary with (data/tokenizers
    `tokenizer_for`): Llama 3's for 128,256 tokens or more, GPT-2's for 50,257 or more; None below."""
    from ...data.tokenizers.gpt2 import GPT2_EOT, GPT2_VOCAB
    if vocab_size >= 128256:
        return 128000, 128001  # <|begin_of_text|>, <|end_of_text|>
    return (GPT2_EOT, GPT2_EOT) if vocab_size >= GPT2_VOCAB else None


def tokenizer_files(cfg) -> dict[str, bytes]:
    """What an export writes beside the weights so that transformers' pipeline runs from the folder alone: the
    tokenizer llmpy uses for the model's vocabulary (document_tokens) and generation_config.json. A vocabulary
    smaller than GPT-2's (a toy trained on other ids, or another tokenizer's such as the released MatMul-free
    models' 32,000) gets neither, with a warning."""
    ids = document_tokens(cfg.vocab_size)
    if ids is None:
        warnings.warn(f"no tokenizer exported: the model's vocabulary ({cfg.vocab_size}) is smaller than GPT-2's "
                      "(50257), the smallest of the tokenizers llmpy knows", stacklevel=3)
        return {}
    if ids[0] == 128000:
        from ...data.tokenizers.llama3 import hf_tokenizer_files
    else:
        from ...data.tokenizers.gpt2 import hf_tokenizer_files
    try:
        files = hf_tokenizer_files(cfg.max_seq_len)
    except UserError as e:  # Llama 3's tokenizer.model is fetched once; offline, the weights still export
        warnings.warn(f"no tokenizer exported: {e}", stacklevel=3)
        return {}
    gen = {"bos_token_id": ids[0], "eos_token_id": ids[1]}
    return files | {"generation_config.json": (json.dumps(gen, indent=2) + "\n").encode()}


def config_json_beside(file: Path, what: str, why: str = "") -> dict:
    """The config.json beside `file` as a dict; one-line errors naming `what` needs it (a family's codec) and `why`."""
    cj = file.parent / "config.json"
    problem = file_problem(cj)
    if problem == "does not exist":
        raise UserError(f"{file}: a {what} file needs its config.json beside it{why}")
    try:
        d = json.loads(read_input(cj).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        d = None
    if not isinstance(d, dict):
        raise UserError(f"{cj} is not a JSON object")
    return d


_REQUIRED = object()


def setting(cj: Path, d: dict, key: str, kind: type, default=_REQUIRED, *, least: float = 1,
            most: float = MAX_SIZE, above: float | None = None):
    """config.json's `key` (absent or null: `default`), checked where it enters: an int (not a bool) in least..most,
    or a finite number >= least (> above when given); a one-line error naming the file, the key and the value."""
    v = d.get(key)
    if v is None:
        if default is _REQUIRED:
            raise UserError(f"{cj}: {key} is missing")
        return default
    if kind is int:
        if isinstance(v, int) and not isinstance(v, bool) and least <= v <= most:
            return v
        raise UserError(f"{cj}: {key} is {v!r}, want an integer in {least:,}..{most:,}")
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if ok and (v > above if above is not None else v >= least):
        return float(v)
    bound = f"> {above:g}" if above is not None else f">= {least:g}"
    raise UserError(f"{cj}: {key} is {v!r}, want a finite number {bound}")


def _codec(family: str):
    if family not in CODECS:
        raise UserError(f"there is no Hugging Face format for the {family} family")
    return importlib.import_module(f"{__name__}.{family}")


def _detect(keys) -> str | None:
    for family in CODECS:
        if _codec(family).detect(keys):
            return family
    return None


def _weight_files(path: str | os.PathLike) -> tuple[Path, dict[Path, list[str]] | None]:
    """(the file that names the model: its weights or its index, {shard: its tensors per the index} or None for
    one file). The index is validated: a JSON object whose weight_map names each tensor once, every shard a file
    beside it."""
    p = Path(path)
    if p.is_dir():
        if (p / INDEX_NAME).is_file():
            p = p / INDEX_NAME
        elif (p / WEIGHTS_NAME).is_file():
            return p / WEIGHTS_NAME, None
        else:
            raise UserError(f"{p} is a folder without {WEIGHTS_NAME} or {INDEX_NAME}")
    if not p.name.endswith(".index.json"):
        return p, None
    try:
        d = json.loads(read_input(p).decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else e
        raise UserError(f"{p} is not a valid safetensors index: not JSON ({why})") from None
    wm = d.get("weight_map") if isinstance(d, dict) else None
    if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
        raise UserError(f"{p} is not a valid safetensors index: no weight_map of tensor names to file names")
    shards: dict[Path, list[str]] = {}
    for key, name in wm.items():
        if Path(name).name != name or name in ("", ".", ".."):  # a plain name: nothing outside the folder
            raise UserError(f"{p} names a shard that is not a file beside it: {name!r}")
        shards.setdefault(p.parent / name, []).append(key)
    for f in shards:
        if not f.is_file():
            raise UserError(f"{p} lists the shard {f.name}, which is missing")
    return p, shards


def _headers(path) -> tuple[Path, dict[Path, list[str]]]:
    """(the model's file, {weights file: its tensors}), every shard's tensors checked against the index."""
    where, shards = _weight_files(path)
    if shards is None:
        infos, _ = read_safetensors_header(where)
        return where, {where: list(infos)}
    held = {f: list(read_safetensors_header(f)[0]) for f in shards}
    seen: dict[str, Path] = {}
    for f, keys in held.items():
        for k in keys:
            if k in seen:
                raise UserError(f"{where}: tensor {k} is in both {seen[k].name} and {f.name}")
            seen[k] = f
    for f, listed in shards.items():
        extra, gone = sorted(set(held[f]) - set(listed)), sorted(set(listed) - set(held[f]))
        if extra:
            raise UserError(f"{where}: {f.name} holds {extra[0]}, which the index does not list there")
        if gone:
            raise UserError(f"{where}: the index puts {gone[0]} in {f.name}, which does not hold it")
    return where, held


def is_hf_model(path: str | os.PathLike) -> bool:
    """True if `path` (a file, an index, or a folder with either) holds a known family's HF keys."""
    try:
        _, files = _headers(path)
    except UserError:
        return False
    return _detect([k for keys in files.values() for k in keys]) is not None


def read_hf_model(path: str | os.PathLike):
    """Import HF weights as (config, float32 params in our layout, vocabulary rows padded with zeros)."""
    file, files = _headers(path)
    raw: dict[str, np.ndarray] = {}
    for f in files:
        raw |= load_safetensors(f)[0]
    family = _detect(raw)
    if family is None:
        raise UserError(f"{file} is not a Hugging Face model file of a known family")
    codec = _codec(family)
    t = codec.clean(file, raw)
    cfg = codec.config(file, t)
    specs = family_of(cfg).spec(cfg)
    params: dict[str, np.ndarray] = {}
    to_ours = getattr(codec, "to_ours", lambda key, a, cfg: a)
    for s in specs:
        # HF's shape of one layer's tensor (or the whole one), checked before stacking layers
        shape = s.shape[1:] if s.per_layer else s.shape
        shape = shape if s.vocab_rows is None else (s.vocab_rows, *shape[1:])
        parts = _parts(s, shape)
        ws = []
        for i in range(s.shape[0]) if s.per_layer else [None]:
            pieces = [to_ours(k, _take(file, t, k.format(l=i), sh[::-1] if s.hf_transposed else sh), cfg)
                      for k, sh in parts]
            pieces = [w.T if s.hf_transposed else w for w in pieces]
            ws.append(pieces[0] if len(pieces) == 1 else np.concatenate(pieces))
        params[s.name] = np.stack(ws) if s.per_layer else ws[0]
        if s.vocab_rows is not None:
            padded = np.zeros(s.shape, np.float32)
            padded[:s.vocab_rows] = params[s.name]
            params[s.name] = padded
    if t:
        raise UserError(f"{file}: unexpected tensors for {codec.TITLE}: {', '.join(sorted(t)[:5])}"
                        + (" ..." if len(t) > 5 else ""))
    return cfg, check_params(cfg, params, str(file))


def _parts(s, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """(HF key template, HF's shape in our orientation) of each piece of the spec's tensor `s` (one layer's)."""
    if isinstance(s.hf, str):
        return [(s.hf, tuple(shape))]
    return [(k, (rows, *shape[1:])) for k, rows in zip(s.hf, s.hf_rows)]


def _take(file: Path, t: dict[str, np.ndarray], key: str, shape: tuple[int, ...]) -> np.ndarray:
    if key not in t:
        raise UserError(f"{file} is missing the tensor {key}")
    a = t.pop(key)
    if a.dtype.kind != "f":
        raise UserError(f"{file}: tensor {key} has dtype {a.dtype}, want floating point")
    if a.shape != tuple(shape):
        raise UserError(f"{file}: tensor {key} has shape {a.shape}, the config implies {tuple(shape)}")
    return a.astype(np.float32, copy=False)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


def own_tokenizer_files(folder: str | os.PathLike | None) -> dict[str, bytes]:
    """The tokenizer files a Hugging Face model folder holds (TOKENIZER_FILES), to go with an export of its model;
    {} when it holds no tokenizer.json or tokenizer.model."""
    if folder is None or not any(os.path.isfile(Path(folder) / n) for n in TOKENIZER_FILES[:2]):
        return {}
    return {n: read_input(Path(folder) / n) for n in TOKENIZER_FILES if os.path.isfile(Path(folder) / n)}


def write_hf_model(path: str | os.PathLike, cfg, params: dict[str, np.ndarray], *,
                   tokenizer_from: str | os.PathLike | None = None) -> list[Path]:
    """Export to HF: `path` is the .safetensors file to write, or a folder (created if needed) that gets
    model.safetensors; config.json and the family's other files (tokenizer, generation config) are written beside
    it: the tokenizer files of the model folder `tokenizer_from` where it has them (the model's own, e.g. the
    released MatMul-free models' SentencePiece), else the tokenizer llmpy reads the model with. Float32,
    vocabulary padding cut, HF's orientation. Each file is replaced atomically (the weights first). Returns the
    files written."""
    codec = _codec(type(cfg).family)
    p = Path(path)
    params = check_params(cfg, params, f"cannot write {p}")
    config = json.dumps(codec.config_json(cfg), indent=2, allow_nan=False) + "\n"
    files = {"config.json": config.encode("utf-8")}
    own = own_tokenizer_files(tokenizer_from)
    files |= own or (codec.extra_files(cfg) if hasattr(codec, "extra_files") else {})  # tokenizer, generation
    if p.suffix != ".safetensors":
        p = make_dir(p, "model folder") / WEIGHTS_NAME
    to_hf = getattr(codec, "to_hf", lambda key, a, cfg: a)
    out = {}
    for s in sorted(family_of(cfg).spec(cfg), key=lambda s: s.per_layer):  # the global tensors first
        a = params[s.name] if s.vocab_rows is None else params[s.name][:s.vocab_rows]
        parts = _parts(s, a.shape[1:] if s.per_layer else a.shape)
        for i in range(s.shape[0]) if s.per_layer else [None]:
            w = a if i is None else a[i]
            pieces = np.split(w, np.cumsum([sh[0] for _, sh in parts])[:-1]) if len(parts) > 1 else [w]
            for (k, _), piece in zip(parts, pieces):
                piece = to_hf(k, piece, cfg)
                out[k.format(l=i)] = piece.T if s.hf_transposed else piece
    # transformers refuses safetensors files without a "format" entry in the metadata; no llmpy checksums: the
    # file is for other tools
    save_safetensors(p, out, {"format": "pt"}, checksums=False)
    for name, data in files.items():
        atomic_write(p.parent / name, lambda f, data=data: f.write(data))
    return [p, *(p.parent / name for name in files)]
