"""Llama 3 through the family seam: configs and their sizes, decoding with a GQA KV cache against the full forward,
recompute, and training through the ordinary loop (checkpoint, bitwise resume, sampling)."""

import numpy as np
import pytest

from family_runs import decodes_like_the_full_forward, phrase_shards, trains_and_resumes_bitwise

from llmpy.backends import get_backend
from llmpy.config import config_from_name
from llmpy.errors import UserError
from llmpy.models.decode import generate
from llmpy.models.llama3 import Llama

SMALL = "llama3:l2d64h4k2f192v256t24r32"


def test_published_configs_have_the_published_sizes():
    sizes = {"llama3:8b": 8_030_261_248, "llama3.1:8b": 8_030_261_248, "llama3.2:1b": 1_235_814_400,
             "llama3.2:3b": 3_212_749_824}
    for name, n in sizes.items():
        assert config_from_name(name).num_params() == n, name
    c = config_from_name("llama3.2:1b")
    assert (c.tied, c.rope_factor, c.max_seq_len, c.num_kv_heads) == (True, 32.0, 131072, 8)
    assert config_from_name("llama3.1:8b").rope_factor == 8.0 and config_from_name("llama3:8b").rope_factor == 1.0
    assert round(c.flops_per_token(2048) / 1e9, 2) == 8.22  # torchtitan's convention (docs/llama3.md)


@pytest.mark.parametrize("name, why", [("llama3:l2d64h4k3f192", "multiple of key/value heads"),
                                       ("llama3:l2d60h8k2f192", "even head size"),
                                       ("llama3:70b", "unknown model config"),
                                       ("llama3.2:8b", "unknown model config")])
def test_bad_configs_are_one_line_errors(name, why):
    with pytest.raises(UserError, match=why):
        config_from_name(name)


def test_decoding_with_a_gqa_cache_matches_the_full_forward():
    cfg = config_from_name(SMALL)
    dec, state = decodes_like_the_full_forward(Llama, cfg)
    assert state.k.shape == (cfg.num_layers, 1, cfg.num_kv_heads, 20, cfg.head_size)  # K heads, not NH
    new = generate(dec, [1, 2, 3], 5, rng=np.random.default_rng(0), temperature=0)
    assert len(new) == 5


@pytest.mark.parametrize("recompute", [1, 2])
def test_recompute_gives_the_same_gradients(recompute):
    cfg = config_from_name(SMALL)
    x = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 12)).astype(np.int32)
    out = []
    for rc in (0, recompute):
        m = Llama(cfg, get_backend("cpu"), 2, 12, recompute=rc)
        m.init_weights(4)
        loss = m.forward(x, x, grad_scale=1 / 24)
        m.backward()
        out.append((loss, {k: np.array(m.grads[k]) for k in m.params.shapes}, m.memory_plan()["activations"]))
    (l0, g0, a0), (l1, g1, a1) = out
    assert l0 == l1 and a1 < a0
    for k in g0:
        np.testing.assert_array_equal(g0[k], g1[k])  # recomputing is the same arithmetic on the CPU


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return phrase_shards(tmp_path_factory.mktemp("llama"))


@pytest.mark.slow
def test_trains_checkpoints_and_resumes_bitwise(shards, tmp_path):
    ck = trains_and_resumes_bitwise("llama3:l2d64h4k2f192t32r8", shards, tmp_path)
    assert type(ck.cfg).__name__ == "LlamaConfig" and ck.cfg.rope_factor == 8.0 and "lm_head" in ck.params
