"""--recompute-keep N: the first N layers keep the activations their recompute level would redo. The same
gradients bit for bit (on the CPU recomputing is the same arithmetic), memory between the two levels."""
import numpy as np
import pytest

from llmpy.backends import get_backend
from llmpy.config import config_from_name, family_of
from llmpy.errors import UserError

CONFIGS = ["l3h4c64t24v256", "llama3:l3d64h4k2f192v256t24r32", "mmfree:l3d64v200t24"]


def run(cfg, **kw):
    m = family_of(cfg).model(cfg, get_backend("cpu"), 2, 12, **kw)
    m.init_weights(4)
    x = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 12)).astype(np.int32)
    loss = m.forward(x, x, grad_scale=1 / 24)
    m.backward()
    return loss, {k: np.array(m.grads[k]) for k in m.params.shapes}, m.memory_plan()["activations"]


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("level", [1, 2])
def test_keeping_layers_gives_the_same_gradients(name, level):
    cfg = config_from_name(name)
    l0, g0, a0 = run(cfg)
    lr, gr, ar = run(cfg, recompute=level)
    for keep in (1, 2, 3, 5):
        lk, gk, ak = run(cfg, recompute=level, recompute_keep=keep)
        assert lk == l0 == lr
        for k in g0:
            np.testing.assert_array_equal(gk[k], g0[k])
        if keep < 2:  # each kept layer adds its slots; keeping all but one (then none recomputes) is level 0
            assert ar < ak < a0
        else:
            assert ak == a0


def test_bad_keep_is_refused():
    cfg = config_from_name(CONFIGS[0])
    with pytest.raises(UserError, match="recompute-keep"):
        family_of(cfg).model(cfg, get_backend("cpu"), 2, 12, recompute_keep=1)
    with pytest.raises(UserError, match="recompute-keep"):
        family_of(cfg).model(cfg, get_backend("cpu"), 2, 12, recompute=1, recompute_keep=-1)
