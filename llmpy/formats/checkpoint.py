"""Our training-state checkpoint: one safetensors file holding everything needed to resume bit-exactly.

Tensors: the parameters under their spec names (fp32 master weights) and, unless it is a weights-only
checkpoint, the AdamW moments under `adam_m.<name>` / `adam_v.<name>` (float32), and the bf16 compute copy under
`compute_bf16.<name>` (uint16 bits) when training ran in bf16.
`__metadata__`: {"format": "llmpy-train-state", "version": "1", "family": the model family ("gpt2"; files from
before families have none and are GPT-2), "config": JSON of the family config's to_dict(), "state": JSON of
whatever dict the trainer passes (step, loader position, RNG state, args)}.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import DEFAULT_FAMILY, FAMILIES, config_from_dict, family_of
from ..errors import UserError
from ..paths import open_input, path_problem, reason
from . import check_params
from .hf import is_hf_model, read_hf_model
from .llmc import is_llmc_model, read_llmc_model
from .safetensors import load_safetensors, read_safetensors_header, save_safetensors

FORMAT = "llmpy-train-state"
VERSION = "1"
MOMENTS = ("adam_m", "adam_v")
COMPUTE = "compute_bf16"


@dataclass
class Checkpoint:
    cfg: object  # the family's config
    params: dict[str, np.ndarray]
    adam_m: dict[str, np.ndarray] | None = None  # None in a weights-only checkpoint
    adam_v: dict[str, np.ndarray] | None = None
    state: dict = field(default_factory=dict)
    # the bf16 compute copy of the weights (uint16 bits) when training in bf16: it was stochastically rounded
    # from the master weights, so a bitwise resume must restore it rather than round again
    compute_bf16: dict[str, np.ndarray] | None = None


def save_checkpoint(path: str | os.PathLike, cfg, params: dict[str, np.ndarray], *,
                    adam_m: dict[str, np.ndarray] | None = None, adam_v: dict[str, np.ndarray] | None = None,
                    state: dict | None = None, compute_bf16: dict[str, np.ndarray] | None = None) -> None:
    """Write the training state atomically. `adam_m` and `adam_v` are given together or not at all; `state`
    must be JSON-serializable (Python ints of any size are fine, e.g. NumPy's PCG64 state); `compute_bf16` are
    the bf16 weights as uint16 bits (optional)."""
    where = f"cannot write {path}"
    if (adam_m is None) != (adam_v is None):
        raise UserError(f"{where}: AdamW moments adam_m and adam_v must be saved together")
    tensors = dict(check_params(cfg, params, where))
    if adam_m is not None:
        for prefix, moments in zip(MOMENTS, (adam_m, adam_v)):
            for name, a in check_params(cfg, moments, f"{where} ({prefix})").items():
                tensors[f"{prefix}.{name}"] = a
    for name, shape in ([(s.name, s.shape) for s in family_of(cfg).spec(cfg)] if compute_bf16 is not None else []):
        a = np.ascontiguousarray(compute_bf16[name])
        if a.shape != shape or a.dtype != np.uint16:
            raise UserError(f"{where}: bf16 copy of {name} must be uint16 {shape}, got {a.dtype} {a.shape}")
        tensors[f"{COMPUTE}.{name}"] = a
    try:  # allow_nan=False: a NaN/Inf setting is never written back (JSON has no such numbers)
        state_json = json.dumps(state or {}, allow_nan=False)
        config_json = json.dumps(cfg.to_dict(), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: the training state or config is not JSON-serializable ({e})") from None
    meta = {"format": FORMAT, "version": VERSION, "family": type(cfg).family, "config": config_json,
            "state": state_json}
    save_safetensors(path, tensors, meta)


def is_checkpoint(path: str | os.PathLike) -> bool:
    """True if `path` is a safetensors file whose metadata says it is an llmpy training state."""
    try:
        _, meta = read_safetensors_header(path)
    except UserError:
        return False
    return meta.get("format") == FORMAT


def load_checkpoint(path: str | os.PathLike, *, weights_only: bool = False) -> Checkpoint:
    """Read and validate a training-state checkpoint; `weights_only` skips reading the moments."""
    infos, meta = read_safetensors_header(path)
    if meta.get("format") != FORMAT:
        raise UserError(f"{path} is not an llmpy checkpoint (metadata format is {meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise UserError(f"{path}: unsupported llmpy checkpoint version {meta.get('version')!r} (want {VERSION})")
    family = meta.get("family", DEFAULT_FAMILY)
    if family not in FAMILIES:
        raise UserError(f"{path}: a checkpoint of an unknown model family {family!r} (this llmpy knows "
                        f"{', '.join(sorted(FAMILIES))})")
    try:
        cfg = config_from_dict(family, json.loads(meta["config"]))
        state = json.loads(meta.get("state", "{}"))
    except (KeyError, ValueError, TypeError, AttributeError, UserError) as e:
        raise UserError(f"{path}: bad config or state in the checkpoint metadata ({e})") from None
    except RecursionError:
        raise UserError(f"{path}: bad config or state in the checkpoint metadata (JSON nested too deeply)") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: bad state in the checkpoint metadata (not a JSON object)")

    shapes = {s.name: tuple(s.shape) for s in family_of(cfg).spec(cfg)}
    has_moments = any(k.startswith(p + ".") for k in infos for p in MOMENTS)
    has_compute = any(k.startswith(COMPUTE + ".") for k in infos)
    expected = dict(shapes)
    if has_moments:
        expected |= {f"{p}.{n}": s for p in MOMENTS for n, s in shapes.items()}
    if has_compute:
        expected |= {f"{COMPUTE}.{n}": s for n, s in shapes.items()}
    missing = [n for n in expected if n not in infos]
    extra = [n for n in infos if n not in expected]
    if missing or extra:
        raise UserError(f"{path}: tensors do not match the config"
                        + (f"; missing {', '.join(missing)}" if missing else "")
                        + (f"; unexpected {', '.join(extra)}" if extra else ""))
    for n, s in expected.items():
        want = "U16" if n.startswith(COMPUTE + ".") else "F32"
        if infos[n].shape != s or infos[n].dtype != want:
            raise UserError(f"{path}: tensor {n} is {infos[n].dtype} {infos[n].shape}, want {want} {s}")

    names = list(shapes) if weights_only else list(expected)
    t, _ = load_safetensors(path, names=names)
    ck = Checkpoint(cfg, {n: t[n] for n in shapes}, state=state)
    if has_moments and not weights_only:
        ck.adam_m = {n: t[f"adam_m.{n}"] for n in shapes}
        ck.adam_v = {n: t[f"adam_v.{n}"] for n in shapes}
    if has_compute and not weights_only:
        ck.compute_bf16 = {n: t[f"{COMPUTE}.{n}"] for n in shapes}
    return ck


def load_weights(path: str | os.PathLike, *, packed_ok: bool = False) -> tuple[object, dict[str, np.ndarray]]:
    """Model weights from an llm.c .bin (by magic), an llmpy checkpoint (by metadata), an HF safetensors file,
    index or folder (by keys), or a Hub model name (`gpt2`, `hf:owner/name`: formats/hub.py) that is not a local
    path. Returns (config, float32 params in spec order); the config's class names the family. A file of a
    recognized kind that is damaged is reported by its reader (truncated, bad header, ...). A packed ternary
    model (formats/ternary.py) loads only with packed_ok (inference), its ternary weights as PackedTernary."""
    p = Path(path)
    if not os.path.exists(p):  # Path.exists raises on a name too long
        from .hub import fetch_model, hub_repo
        repo = None if os.path.lexists(p) else hub_repo(str(path))  # a dangling link is no Hub name
        if repo is None:
            raise UserError(f"{path} {path_problem(p)}")
        p = fetch_model(*repo)
    if p.is_dir() or p.name.endswith(".index.json"):
        return read_hf_model(p)
    kind = _sniff(p)
    if kind == "llmc" or (kind is None and p.suffix == ".bin"):
        return read_llmc_model(p)  # an unknown .bin gets llm.c's reasons (too short, bad magic)
    if kind == "safetensors" or p.suffix == ".safetensors":
        infos, meta = read_safetensors_header(p)
        if meta.get("format") == FORMAT:
            ck = load_checkpoint(p, weights_only=True)
            return ck.cfg, ck.params
        from .ternary import FORMAT as TERNARY, read_ternary
        if meta.get("format") == TERNARY:
            if not packed_ok:
                raise UserError(f"{path} is a packed ternary model, for sample and eval only: training and "
                                "converting need the latent weights it was packed from")
            return read_ternary(p)
        if is_hf_model(p):
            return read_hf_model(p)
        kind = f" (metadata format {meta['format']!r})" if "format" in meta else ""
        raise UserError(f"{path} is a safetensors file{kind} but neither an llmpy checkpoint nor a Hugging Face "
                        f"model of a known family; its tensors: {', '.join(sorted(infos)[:4]) or 'none'}"
                        + (" ..." if len(infos) > 4 else ""))
    raise UserError(f"{path} is not a llm.c model, an llmpy checkpoint or a Hugging Face safetensors file: it "
                    "starts with neither llm.c's magic number nor a safetensors header")


def _sniff(p: Path) -> str | None:
    """"llmc" if the file starts with an llm.c magic, "safetensors" if its JSON header seems to start at byte 8."""
    if is_llmc_model(p):
        return "llmc"
    with open_input(p) as f:
        try:
            head = f.read(9)
        except OSError as e:
            raise UserError(f"cannot read {p}: {reason(e)}") from None
    return "safetensors" if len(head) == 9 and head[8:] == b"{" else None
