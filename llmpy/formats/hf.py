"""Hugging Face GPT-2 weights (`model.safetensors` + `config.json`), from and to LOCAL files (no hub access).

HF GPT-2 uses Conv1D layers whose weight is (in, out): the transpose of our (out, in) linear weights. Keys are
`wte.weight`, `wpe.weight`, `h.{i}.{ln_1,attn.c_attn,attn.c_proj,ln_2,mlp.c_fc,mlp.c_proj}.{weight,bias}`,
`ln_f.{weight,bias}`, optionally prefixed by `transformer.`; HF's `wte` has the real vocabulary (50257 rows),
so we pad it with zero rows to a multiple of 128 on import and drop the padding on export.

`path` may name the .safetensors file or a folder holding `model.safetensors`; `config.json` is looked for
next to the file.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import numpy as np

from ..config import GPT2Config, pad_vocab
from ..errors import UserError
from . import check_params
from .atomic import atomic_write
from .safetensors import load_safetensors, read_safetensors_header, save_safetensors

WEIGHTS_NAME = "model.safetensors"
# our name -> (HF per-layer key suffix, transposed?) ; per-layer tensors are stacked along a new axis 0
_LAYER = {
    "ln1w": ("ln_1.weight", False), "ln1b": ("ln_1.bias", False),
    "qkvw": ("attn.c_attn.weight", True), "qkvb": ("attn.c_attn.bias", False),
    "attprojw": ("attn.c_proj.weight", True), "attprojb": ("attn.c_proj.bias", False),
    "ln2w": ("ln_2.weight", False), "ln2b": ("ln_2.bias", False),
    "fcw": ("mlp.c_fc.weight", True), "fcb": ("mlp.c_fc.bias", False),
    "fcprojw": ("mlp.c_proj.weight", True), "fcprojb": ("mlp.c_proj.bias", False),
}
_GLOBAL = {"wte": "wte.weight", "wpe": "wpe.weight", "lnfw": "ln_f.weight", "lnfb": "ln_f.bias"}
_BUFFERS = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")  # causal-mask buffers, not parameters
# config.json settings that change the math; anything else than these values is not the GPT-2 we compute
_MUST = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"), "layer_norm_epsilon": (1e-5,),
         "scale_attn_weights": (True,), "scale_attn_by_inverse_layer_idx": (False,),
         "reorder_and_upcast_attn": (False,), "add_cross_attention": (False,), "model_type": ("gpt2",)}


def _weights_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p / WEIGHTS_NAME if p.is_dir() else p


def is_hf_gpt2(path: str | os.PathLike) -> bool:
    """True if `path` (a file, or a folder with model.safetensors) is a safetensors file with GPT-2's HF keys."""
    try:
        infos, _ = read_safetensors_header(_weights_file(path))
    except UserError:
        return False
    keys = {k.removeprefix("transformer.") for k in infos}
    return {"wte.weight", "wpe.weight", "h.0.attn.c_attn.weight"} <= keys


def read_hf_gpt2(path: str | os.PathLike) -> tuple[GPT2Config, dict[str, np.ndarray]]:
    """Import HF GPT-2 weights as (config, float32 params in our layout, wte padded with zero rows)."""
    file = _weights_file(path)
    raw, _ = load_safetensors(file)
    t: dict[str, np.ndarray] = {}
    for k, a in raw.items():
        k2 = k.removeprefix("transformer.")
        if k2 in t:
            raise UserError(f"{file} holds {k2!r} both with and without the 'transformer.' prefix")
        t[k2] = a
    lm_head = t.pop("lm_head.weight", None)
    for k in [k for k in t if _BUFFERS.match(k)]:
        del t[k]
    for k in ("wte.weight", "wpe.weight"):
        if k not in t or t[k].ndim != 2:
            raise UserError(f"{file} is not a Hugging Face GPT-2 file: no 2-D {k}")
    if lm_head is not None and not (lm_head.shape == t["wte.weight"].shape and np.array_equal(lm_head, t["wte.weight"])):
        raise UserError(f"{file}: lm_head.weight differs from wte.weight; GPT-2 ties them, untied heads are not supported")
    cfg = _config(file, t)

    params: dict[str, np.ndarray] = {}
    wte = np.zeros((cfg.padded_vocab_size, cfg.channels), dtype=np.float32)
    wte[:cfg.vocab_size] = _take(file, t, "wte.weight")
    params["wte"] = wte
    for ours, key in _GLOBAL.items():
        if ours != "wte":
            params[ours] = _take(file, t, key)
    for ours, (suffix, transposed) in _LAYER.items():
        layers = [_take(file, t, f"h.{i}.{suffix}") for i in range(cfg.num_layers)]
        # Conv1D (in, out) -> our (out, in)
        params[ours] = np.stack([w.T if transposed else w for w in layers])
    if t:
        raise UserError(f"{file}: unexpected tensors for GPT-2: {', '.join(sorted(t)[:5])}"
                        + (" ..." if len(t) > 5 else ""))
    return cfg, check_params(cfg, params, str(file))


def _take(file: Path, t: dict[str, np.ndarray], key: str) -> np.ndarray:
    if key not in t:
        raise UserError(f"{file} is missing the GPT-2 tensor {key}")
    a = t.pop(key)
    if a.dtype.kind != "f":
        raise UserError(f"{file}: tensor {key} has dtype {a.dtype}, want floating point")
    return a.astype(np.float32, copy=False)


def _config(file: Path, t: dict[str, np.ndarray]) -> GPT2Config:
    V, C = t["wte.weight"].shape
    maxT = t["wpe.weight"].shape[0]
    # max index + 1, not a count: a missing block in the middle must be reported, not skipped
    L = 1 + max((int(m.group(1)) for k in t if (m := re.match(r"^h\.(\d+)\.", k))), default=-1)
    cj = file.parent / "config.json"
    if cj.is_file():
        try:
            d = json.loads(cj.read_text(encoding="utf-8"))
            assert isinstance(d, dict)
        except (ValueError, UnicodeDecodeError, AssertionError):
            raise UserError(f"{cj} is not a JSON object") from None
        for k, allowed in _MUST.items():
            if k in d and d[k] not in allowed:
                raise UserError(f"{cj}: {k}={d[k]!r} is not supported (want {' or '.join(map(repr, allowed))})")
        n_pos = d.get("n_positions", d.get("n_ctx"))
        got = {"n_layer": d.get("n_layer"), "n_head": d.get("n_head"), "n_embd": d.get("n_embd"),
               "n_positions/n_ctx": n_pos, "vocab_size": d.get("vocab_size")}
        missing = [k for k, v in got.items() if not isinstance(v, int) or isinstance(v, bool)]
        if missing:
            raise UserError(f"{cj}: missing or non-integer {', '.join(missing)}")
        implied = {"n_layer": L, "n_embd": C, "n_positions/n_ctx": maxT, "vocab_size": V}
        for k, v in implied.items():
            if got[k] != v:
                raise UserError(f"{cj}: {k}={got[k]} but the tensors in {file.name} imply {v}")
        NH = got["n_head"]
        if NH <= 0 or C % NH:
            raise UserError(f"{cj}: n_embd {C} is not a multiple of n_head {NH}")
    else:
        if C % 64:
            raise UserError(f"{file}: no config.json beside it and n_embd {C} is not a multiple of 64, "
                            "so the number of heads cannot be inferred; add a config.json")
        NH = C // 64
        warnings.warn(f"{file}: no config.json beside it; inferred from the tensor shapes L={L}, C={C}, "
                      f"maxT={maxT}, V={V} and {NH} heads assuming head size 64", stacklevel=3)
    if L == 0:
        raise UserError(f"{file} has no transformer blocks (no h.0.* tensors)")
    try:
        return GPT2Config(max_seq_len=maxT, vocab_size=V, padded_vocab_size=pad_vocab(V), num_layers=L,
                          num_heads=NH, channels=C)
    except UserError as e:
        raise UserError(f"{file}: {e}") from None


def write_hf_gpt2(path: str | os.PathLike, cfg: GPT2Config, params: dict[str, np.ndarray]) -> None:
    """Export to HF GPT-2: `path` is the .safetensors file to write, or a folder (created if needed) that gets
    model.safetensors; config.json is written beside it. Float32, wte unpadded, Conv1D weights transposed.
    Each of the two files is replaced atomically (the weights first)."""
    p = Path(path)
    if p.suffix != ".safetensors":
        p.mkdir(parents=True, exist_ok=True)
        p = p / WEIGHTS_NAME
    params = check_params(cfg, params, f"cannot write {p}")
    out = {"wte.weight": params["wte"][:cfg.vocab_size], "wpe.weight": params["wpe"],
           "ln_f.weight": params["lnfw"], "ln_f.bias": params["lnfb"]}
    for ours, (suffix, transposed) in _LAYER.items():
        for i in range(cfg.num_layers):
            w = params[ours][i]
            out[f"h.{i}.{suffix}"] = w.T if transposed else w
    # transformers refuses safetensors files without a "format" entry in the metadata
    save_safetensors(p, out, {"format": "pt"})
    config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "n_layer": cfg.num_layers, "n_head": cfg.num_heads, "n_embd": cfg.channels,
        "n_positions": cfg.max_seq_len, "n_ctx": cfg.max_seq_len, "vocab_size": cfg.vocab_size,
        "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new", "torch_dtype": "float32",
    }
    text = json.dumps(config, indent=2) + "\n"
    atomic_write(p.parent / "config.json", lambda f: f.write(text.encode("utf-8")))
