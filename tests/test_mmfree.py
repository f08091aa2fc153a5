"""The MatMul-free LM through the family seam: configs and their sizes, decoding with recurrent states against the
full forward, recompute, and training through the ordinary loop (checkpoint, bitwise resume, sampling)."""

import numpy as np
import pytest

from family_runs import decodes_like_the_full_forward, phrase_shards, trains_and_resumes_bitwise

from llmpy.backends import get_backend
from llmpy.config import config_from_name
from llmpy.errors import UserError
from llmpy.models.decode import generate
from llmpy.models.mmfree import MMFree, default_intermediate

SMALL = "mmfree:l2d64v200t24"


def test_published_configs_have_the_published_sizes():
    # docs/mmfree.md's table: 374.1M, 1.365B, 2.702B (vocab 32000, untied, ternary head with its norm)
    sizes = {"mmfree:370m": 374_108_160, "mmfree:1.3b": 1_364_779_008, "mmfree:2.7b": 2_702_357_504}
    for name, n in sizes.items():
        assert config_from_name(name).num_params() == n, name
    assert [default_intermediate(d) for d in (1024, 2048, 2560)] == [2816, 5632, 6912]
    c = config_from_name("mmfree:l3d96v300t64")
    assert (c.num_layers, c.channels, c.ffn_hidden, c.vocab_size, c.padded_vocab_size, c.max_seq_len) == \
        (3, 96, 256, 300, 384, 64)
    assert config_from_name("mmfree:l2d64").vocab_size == 50257  # GPT-2's tokenizer by default
    assert c.flops_per_token(64) == 6 * c.num_params()


@pytest.mark.parametrize("name, why", [("mmfree:l0d64", "non-positive"), ("mmfree:70b", "unknown model config"),
                                       ("mmfree:l2d64x3", "unknown model config")])
def test_bad_configs_are_one_line_errors(name, why):
    with pytest.raises(UserError, match=why):
        config_from_name(name)


def test_init_follows_the_reference():
    cfg = config_from_name("mmfree:l4d64v200")
    m = MMFree(cfg, get_backend("cpu"), 1, 4, training=False)
    m.init_weights(0)
    p = m.params_numpy()
    bound = 2 ** -2.5 * np.sqrt(6 / 128)  # xavier_uniform, gain 2^-2.5
    for k in ("iw", "fw", "gw", "ow"):
        assert np.abs(p[k]).max() <= bound and np.abs(p[k]).max() > 0.95 * bound, k
    assert abs(p["gatew"].std() - 0.02) < 1e-3 and abs(p["downw"].std() - 0.02 / np.sqrt(8)) < 5e-4
    assert np.all(p["lower_bounds"] == 0) and np.all(p["gnormw"] == 1) and np.all(p["downn"] == 1)
    assert np.all(p["wte"][200:] == 0) and np.all(p["lm_head"][200:] == 0)


def test_lower_bounds_start_linear_in_depth():
    cfg = config_from_name("mmfree:l4d16v64")
    m = MMFree(cfg, get_backend("cpu"), 1, 2, training=False)
    m.init_weights(0)
    m.forward(np.zeros((1, 2), np.int32))
    np.testing.assert_allclose(m.stats["lam"], np.repeat([[0], [0.25], [0.5], [0.75]], 16, 1), atol=1e-7)


def test_decoding_with_recurrent_states_matches_the_full_forward():
    cfg = config_from_name(SMALL)
    dec, state = decodes_like_the_full_forward(MMFree, cfg)
    assert state.h.shape == (cfg.num_layers, 1, cfg.channels)  # the same at any length: no cache grows
    new = generate(dec, [1, 2, 3], 30, rng=np.random.default_rng(0), temperature=0)  # past the context (24)
    assert len(new) == 30


def test_recompute_gives_the_same_gradients():
    cfg = config_from_name(SMALL)
    x = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 12)).astype(np.int32)
    out = []
    for rc in (0, 1, 2):
        m = MMFree(cfg, get_backend("cpu"), 2, 12, recompute=rc)
        m.init_weights(4)
        loss = m.forward(x, x, grad_scale=1 / 24)
        m.backward()
        plan = m.memory_plan()
        out.append((loss, {k: np.array(m.grads[k]) for k in m.params.shapes}, plan["activations"]))
    (l0, g0, a0), (l1, g1, a1), (l2, g2, a2) = out
    assert l0 == l1 == l2 and a2 < a1 < a0
    for k in g0:  # recomputing is the same arithmetic on the CPU
        np.testing.assert_array_equal(g0[k], g1[k])
        np.testing.assert_array_equal(g0[k], g2[k])


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return phrase_shards(tmp_path_factory.mktemp("mmfree"))


def test_trains_checkpoints_and_resumes_bitwise(shards, tmp_path):
    ck = trains_and_resumes_bitwise("mmfree:l2d64v256t32", shards, tmp_path)
    assert type(ck.cfg).__name__ == "MMFreeConfig" and "lower_bounds" in ck.params
    assert np.abs(ck.params["lower_bounds"]).max() > 0  # P is trained
