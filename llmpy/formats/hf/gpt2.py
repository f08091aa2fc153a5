"""Hugging Face GPT-2 (`GPT2LMHeadModel`): config.json, how to recognize its files, and what else they may hold.

HF GPT-2 uses Conv1D layers whose weight is (in, out), the transpose of our (out, in) linear weights (the spec says
which); keys are optionally prefixed by `transformer.`; files may hold the causal-mask buffers and a copy of the
tied head, `lm_head.weight`. An export also gets GPT-2's tokenizer files and generation_config.json, so that
`transformers.pipeline("text-generation", model=folder)` works from the folder alone.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ...errors import UserError
from ...models.base import pad_vocab
from ...models.gpt2 import GPT2Config
from . import config_json_beside, setting, tokenizer_files

TITLE = "GPT-2"
_BUFFERS = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")  # causal-mask buffers, not parameters
# config.json settings that change the math; anything else than these values is not the GPT-2 we compute
_MUST = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"), "layer_norm_epsilon": (1e-5,),
         "scale_attn_weights": (True,), "scale_attn_by_inverse_layer_idx": (False,),
         "reorder_and_upcast_attn": (False,), "add_cross_attention": (False,), "model_type": ("gpt2",)}


_KEY = re.compile(r"^(?:transformer\.)?(?:wte\.|wpe\.|ln_f\.|h\.\d+\.(?:ln_1|attn|ln_2|mlp)\.)")


def detect(keys) -> bool:
    """Any of GPT-2's keys (wte, wpe, ln_f, a block's): a file missing some of them is still recognized, and then
    reported by the tensor it lacks."""
    return any(_KEY.match(k) for k in keys)


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
        if k not in t:
            raise UserError(f"{file} is missing the tensor {k}")
        if t[k].ndim != 2:
            raise UserError(f"{file}: tensor {k} has shape {t[k].shape}, want 2 dimensions")
    tied = lm_head is None or (lm_head.shape == t["wte.weight"].shape and np.array_equal(lm_head, t["wte.weight"]))
    if not tied:
        raise UserError(f"{file}: lm_head.weight differs from wte.weight; GPT-2 ties them, untied heads are not "
                        "supported")
    return t


def config(file: Path, t: dict[str, np.ndarray]) -> GPT2Config:
    """The config from config.json beside `file` (required: the number of heads is in no tensor's shape), checked
    against the tensors."""
    V, C = t["wte.weight"].shape
    maxT = t["wpe.weight"].shape[0]
    d = config_json_beside(file, "GPT-2", " (the number of heads is in no tensor's shape)")
    cj = file.parent / "config.json"
    for k, allowed in _MUST.items():
        if k in d and d[k] not in allowed:
            raise UserError(f"{cj}: {k}={d[k]!r} is not supported (want {' or '.join(map(repr, allowed))})")
    pos = "n_positions" if d.get("n_positions") is not None else "n_ctx"
    got = {k: setting(cj, d, k, int) for k in ("n_layer", "n_head", "n_embd", pos, "vocab_size")}
    implied = {"n_embd": C, pos: maxT, "vocab_size": V}  # a block's tensor missing or extra is reported by name
    for k, v in implied.items():
        if got[k] != v:
            raise UserError(f"{cj}: {k}={got[k]} but the tensors in {file.name} imply {v}")
    L, NH = got["n_layer"], got["n_head"]
    if C % NH:
        raise UserError(f"{cj}: n_embd {C} is not a multiple of n_head {NH}")
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
