"""Hugging Face MatMul-free LM (`model_type` "hgrn_bit": ridgerchu/matmulfreellm's HGRNBitForCausalLM, the layout of
the released `ridger/MMfreeLM-*` checkpoints): config.json, recognizing its files, and gate_proj's row order.

The reference's fused GLU projection gate_proj (2I, d) is [gate; up]; ours (models/mmfree.py `gatew`) is [up; gate]
(our SwiGLU op's order), so the halves swap both ways. Options of the reference that change the math and that we do
not implement are refused: the short convolution, an expand ratio other than 1, no lower bounds, another
activation. The released checkpoints are bf16 latent weights; they load as float32 (exact).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ...errors import UserError
from ...models.base import pad_vocab
from ...models.mmfree import MMFreeConfig
from . import config_json_beside, document_tokens, setting, tokenizer_files

TITLE = "MatMul-free LM (hgrn_bit)"
# config.json settings that change the math: anything else is not the model we compute
_MUST = {"model_type": ("hgrn_bit",), "use_short_conv": (False,), "expand_ratio": (1, None),
         "use_lower_bound": (True,), "hidden_act": ("swish", "silu"), "tie_word_embeddings": (False,)}


_KEY = re.compile(r"^model\.(?:embeddings\.|layers\.\d+\.(?:attn|attn_norm|mlp_norm)\.)")


def detect(keys) -> bool:
    """Any of the reference's keys (the embeddings, a layer's MLGRU or its norms): a file missing some of them is
    still recognized, and then reported by the tensor it lacks."""
    return any(_KEY.match(k) for k in keys)


def clean(file: Path, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return dict(raw)


def _config_json(file: Path) -> dict:
    return config_json_beside(file, "MatMul-free (hgrn_bit)")


def config(file: Path, t: dict[str, np.ndarray]) -> MMFreeConfig:
    d = _config_json(file)
    cj = file.parent / "config.json"
    for k, allowed in _MUST.items():
        if k in d and d[k] not in allowed:
            raise UserError(f"{cj}: {k}={d[k]!r} is not supported (want {' or '.join(map(repr, allowed))})")
    if "lm_head.weight" not in t:
        raise UserError(f"{file} is missing the tensor lm_head.weight (the MatMul-free head is untied and ternary)")
    if "model.embeddings.weight" not in t:
        raise UserError(f"{file} is missing the tensor model.embeddings.weight")
    ints = {k: setting(cj, d, k, int) for k in ("hidden_size", "num_hidden_layers", "vocab_size")}
    C, V = ints["hidden_size"], ints["vocab_size"]
    if t["model.embeddings.weight"].shape != (V, C):
        raise UserError(f"{cj}: vocab_size {V} and hidden_size {C} but the embedding is "
                        f"{' x '.join(map(str, t['model.embeddings.weight'].shape))}")
    inter = setting(cj, d, "intermediate_size", int, None)
    ratio = setting(cj, d, "hidden_ratio", float, 4, above=0)
    if inter is None:  # the reference's rule from hidden_ratio (default 4)
        inter = 256 * -(-int(C * ratio * 2 / 3) // 256)
    eps = setting(cj, d, "rms_norm_eps", float, 1e-6, above=0)
    maxT = setting(cj, d, "max_position_embeddings", int, 2048)
    try:
        return MMFreeConfig(max_seq_len=maxT, vocab_size=V, padded_vocab_size=pad_vocab(V),
                            num_layers=ints["num_hidden_layers"], channels=C, ffn_hidden=inter, norm_eps=eps)
    except UserError as e:
        raise UserError(f"{cj}: {e}") from None


def _swap_halves(key: str, a: np.ndarray) -> np.ndarray:
    if not key.endswith("mlp.gate_proj.weight"):
        return a
    half = a.shape[0] // 2
    return np.concatenate([a[half:], a[:half]])


def to_ours(key: str, a: np.ndarray, cfg: MMFreeConfig) -> np.ndarray:
    return _swap_halves(key, a)


def to_hf(key: str, a: np.ndarray, cfg: MMFreeConfig) -> np.ndarray:
    return _swap_halves(key, a)


def config_json(cfg: MMFreeConfig) -> dict:
    out = {"architectures": ["HGRNBitForCausalLM"], "model_type": "hgrn_bit", "vocab_size": cfg.vocab_size,
           "hidden_size": cfg.channels, "num_hidden_layers": cfg.num_layers, "attn_mode": "fused_recurrent",
           "num_heads": 1, "expand_ratio": 1, "use_short_conv": False, "use_lower_bound": True,
           "hidden_ratio": 4, "intermediate_size": cfg.ffn_hidden, "hidden_act": "swish",
           "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": False,
           "initializer_range": 0.02, "torch_dtype": "float32"}
    # the document tokens of the tokenizer the vocabulary belongs to (Mistral's SentencePiece, Llama 3's or GPT-2's)
    out["bos_token_id"], out["eos_token_id"] = ((1, 2) if cfg.vocab_size == 32000 else
                                                document_tokens(cfg.vocab_size) or (50256, 50256))
    return out


def extra_files(cfg: MMFreeConfig) -> dict[str, bytes]:
    """generation_config.json and the tokenizer llmpy reads the model with, where it knows it (GPT-2's or Llama
    3's, by the vocabulary); the released models' 32,000 tokens are Mistral's SentencePiece, which llmpy does not
    ship: such an export gets none here (`llmpy convert` of a released folder copies the folder's own files)."""
    return tokenizer_files(cfg)
