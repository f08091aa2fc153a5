"""Hugging Face Llama 3 (`LlamaForCausalLM`): config.json, recognizing its files, and the q/k row permutation.

HF applies RoPE to the halves of each head (x_i with x_{i+d/2}); Meta, llm.c and we rotate interleaved pairs
(x_{2i}, x_{2i+1}). The conversion permutes the rows of wq (H heads) and wk (K heads) only: Meta -> HF is
W.view(h, d/2, 2, C).transpose(1, 2), HF -> Meta the inverse (transformers' convert_llama_weights_to_hf). config.json
may carry RoPE settings as the Hub's Llama 3.x checkpoints spell them (`rope_theta` + `rope_scaling`) or as
current transformers writes them (`rope_parameters`); both are read, the Hub's spelling is written.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ...errors import UserError
from ...models.base import pad_vocab
from ...models.llama3 import LlamaConfig
from . import config_json_beside, document_tokens, setting, tokenizer_files

TITLE = "Llama 3"
# config.json settings that change the math; other values are not the Llama 3 we compute
_MUST = {"hidden_act": ("silu",), "attention_bias": (False,), "mlp_bias": (False,), "model_type": ("llama",),
         "pretraining_tp": (1,)}


_KEY = re.compile(r"^model\.(?:embed_tokens\.|layers\.\d+\.(?:self_attn|input_layernorm|post_attention_layernorm)\.)")


def detect(keys) -> bool:
    """Any of Llama's keys (the token embedding, a layer's attention or its norms): a file missing some of them is
    still recognized, and then reported by the tensor it lacks."""
    return any(_KEY.match(k) for k in keys)


def clean(file: Path, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The parameter tensors: RoPE buffers dropped; a head equal to the embedding dropped (tied)."""
    t = {k: a for k, a in raw.items() if not k.endswith("rotary_emb.inv_freq")}
    head, emb = t.get("lm_head.weight"), t.get("model.embed_tokens.weight")
    if head is not None and emb is not None and head.shape == emb.shape and np.array_equal(head, emb) and \
            _config_json(file).get("tie_word_embeddings"):
        del t["lm_head.weight"]
    return t


def _config_json(file: Path) -> dict:
    return config_json_beside(file, "Llama")


def _rope(cj: Path, d: dict) -> dict:
    """{theta, factor, low, high, original} from either spelling, each value checked."""
    for key in ("rope_parameters", "rope_scaling"):
        if d.get(key) is not None and not isinstance(d[key], dict):
            raise UserError(f"{cj}: {key} is {d[key]!r}, want an object (or null)")
    p = d.get("rope_parameters")
    if p is not None:
        theta, scaling, where = p.get("rope_theta", d.get("rope_theta")), p, "rope_parameters."
    else:
        theta, scaling, where = d.get("rope_theta"), d.get("rope_scaling") or {}, "rope_scaling."
    out = {"rope_theta": setting(cj, {"rope_theta": theta}, "rope_theta", float, above=0)}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in ("default", None) or not scaling:
        return out
    if kind != "llama3":
        raise UserError(f"{cj}: RoPE scaling of type {kind!r} is not supported (llama3 or none)")
    named = {where + k: v for k, v in scaling.items()}
    out |= {"rope_factor": setting(cj, named, where + "factor", float, least=1),
            "rope_low_freq_factor": setting(cj, named, where + "low_freq_factor", float, above=0),
            "rope_high_freq_factor": setting(cj, named, where + "high_freq_factor", float, above=0),
            "rope_original_context": setting(cj, named, where + "original_max_position_embeddings", int)}
    return out


def config(file: Path, t: dict[str, np.ndarray]) -> LlamaConfig:
    d = _config_json(file)
    cj = file.parent / "config.json"
    for k, allowed in _MUST.items():
        if k in d and d[k] not in allowed:
            raise UserError(f"{cj}: {k}={d[k]!r} is not supported (want {' or '.join(map(repr, allowed))})")
    ints = {k: setting(cj, d, k, int) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                 "num_attention_heads", "vocab_size", "max_position_embeddings")}
    C, H = ints["hidden_size"], ints["num_attention_heads"]
    K = setting(cj, d, "num_key_value_heads", int, H)
    head_dim = setting(cj, d, "head_dim", int, None)
    if head_dim not in (None, C // H) or C % H:
        raise UserError(f"{cj}: hidden_size {C} is not head_dim x num_attention_heads ({head_dim or C / H:g} x {H})")
    V = ints["vocab_size"]
    if "model.embed_tokens.weight" not in t:
        raise UserError(f"{file} is missing the tensor model.embed_tokens.weight")
    Ve, Ce = t["model.embed_tokens.weight"].shape
    if (Ve, Ce) != (V, C):
        raise UserError(f"{cj}: vocab_size {V} and hidden_size {C} but the embedding is {Ve} x {Ce}")
    try:
        return LlamaConfig(max_seq_len=ints["max_position_embeddings"], vocab_size=V, padded_vocab_size=pad_vocab(V),
                           num_layers=ints["num_hidden_layers"], channels=C, num_heads=H, num_kv_heads=K,
                           ffn_hidden=ints["intermediate_size"], norm_eps=setting(cj, d, "rms_norm_eps", float, 1e-5,
                                                                                  above=0),
                           tied="lm_head.weight" not in t, **_rope(cj, d))
    except UserError as e:
        raise UserError(f"{cj}: {e}") from None


def _permute(w: np.ndarray, heads: int, inverse: bool) -> np.ndarray:
    d = w.shape[0] // heads
    if inverse:  # HF -> Meta
        return w.reshape(heads, 2, d // 2, -1).transpose(0, 2, 1, 3).reshape(w.shape)
    return w.reshape(heads, d // 2, 2, -1).transpose(0, 2, 1, 3).reshape(w.shape)


def _rows(key: str, a: np.ndarray, cfg: LlamaConfig, inverse: bool) -> np.ndarray:
    """q and k projections with their rows permuted (HF -> Meta when inverse); other tensors as they are."""
    heads = cfg.num_heads if key.endswith("q_proj.weight") else cfg.num_kv_heads
    return _permute(a, heads, inverse) if key.endswith(("q_proj.weight", "k_proj.weight")) else a


def to_ours(key: str, a: np.ndarray, cfg: LlamaConfig) -> np.ndarray:
    """An HF tensor (after loading) in our orientation: q and k rows back to Meta's pair order."""
    return _rows(key, a, cfg, inverse=True)


def to_hf(key: str, a: np.ndarray, cfg: LlamaConfig) -> np.ndarray:
    return _rows(key, a, cfg, inverse=False)


def config_json(cfg: LlamaConfig) -> dict:
    out = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.channels,
           "intermediate_size": cfg.ffn_hidden, "num_hidden_layers": cfg.num_layers,
           "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
           "head_dim": cfg.head_size, "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_seq_len,
           "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tied,
           "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32"}
    # the document and end tokens of the tokenizer the vocabulary belongs to (Llama 3's, else GPT-2's)
    out["bos_token_id"], out["eos_token_id"] = document_tokens(cfg.vocab_size) or (50256, 50256)
    if cfg.rope_factor != 1.0:
        out["rope_scaling"] = {"rope_type": "llama3", "factor": cfg.rope_factor,
                               "low_freq_factor": cfg.rope_low_freq_factor,
                               "high_freq_factor": cfg.rope_high_freq_factor,
                               "original_max_position_embeddings": cfg.rope_original_context}
    return out


def extra_files(cfg: LlamaConfig) -> dict[str, bytes]:
    """generation_config.json and the tokenizer llmpy reads the model with: Llama 3's for its vocabulary of
    128,256, GPT-2's for the small configs trained on GPT-2's tokens."""
    return tokenizer_files(cfg)
