"""Hugging Face GPT-2 (`GPT2LMHeadModel`): config.json, how to recognize its files, and what else they may hold.

HF GPT-2 uses Conv1D layers whose weight is (in, out), the transpose of our (out, in) linear weights (the spec says
which); keys are optionally prefixed by `transformer.`; files may hold the causal-mask buffers and a copy of the
tied head, `lm_head.weight`. An export also gets GPT-2's tokenizer files and generation_config.json, so that
`transformers.pipeline("text-generation", model=folder)` works from the folder alone.
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np

from ...errors import UserError
from ...models.base import pad_vocab
from ...models.gpt2 import GPT2Config, spec
from . import tokenizer_files

TITLE = "GPT-2"
_BUFFERS = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")  # causal-mask buffers, not parameters
# config.json settings that change the math; anything else than these values is not the GPT-2 we compute
_MUST = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"), "layer_norm_epsilon": (1e-5,),
         "scale_attn_weights": (True,), "scale_attn_by_inverse_layer_idx": (False,),
         "reorder_and_upcast_attn": (False,), "add_cross_attention": (False,), "model_type": ("gpt2",)}


def detect(keys) -> bool:
    """GPT-2's keys: every tensor that is not per layer, and some of layer 0's (a file missing one of them is still
    recognized, and then reported as incomplete)."""
    keys = {k.removeprefix("transformer.") for k in keys}
    specs = spec(GPT2Config(num_layers=1))
    return ({s.hf for s in specs if not s.per_layer} <= keys
            and any(s.hf.format(l=0) in keys for s in specs if s.per_layer))


def clean(file: Path, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The parameter tensors under their spec keys: prefix stripped, buffers dropped, the tied head checked."""
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
    tied = lm_head is None or (lm_head.shape == t["wte.weight"].shape and np.array_equal(lm_head, t["wte.weight"]))
    if not tied:
        raise UserError(f"{file}: lm_head.weight differs from wte.weight; GPT-2 ties them, untied heads are not "
                        "supported")
    return t


def config(file: Path, t: dict[str, np.ndarray]) -> GPT2Config:
    """The config from config.json beside `file`, checked against the tensors (inferred from them without it)."""
    V, C = t["wte.weight"].shape
    maxT = t["wpe.weight"].shape[0]
    # max index + 1, not a count: a missing block in the middle must be reported, not skipped
    L = 1 + max((int(m.group(1)) for k in t if (m := re.match(r"^h\.(\d+)\.", k))), default=-1)
    cj = file.parent / "config.json"
    if cj.is_file():
        try:
            d = json.loads(cj.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError):
            d = None
        if not isinstance(d, dict):
            raise UserError(f"{cj} is not a JSON object")
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


def config_json(cfg: GPT2Config) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "n_layer": cfg.num_layers, "n_head": cfg.num_heads, "n_embd": cfg.channels,
        "n_positions": cfg.max_seq_len, "n_ctx": cfg.max_seq_len, "vocab_size": cfg.vocab_size,
        "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new", "torch_dtype": "float32",
    }


def extra_files(cfg: GPT2Config) -> dict[str, bytes]:
    """generation_config.json and the tokenizer llmpy reads the model with (GPT-2's, data/tokenizers/gpt2.py)."""
    return tokenizer_files(cfg)
