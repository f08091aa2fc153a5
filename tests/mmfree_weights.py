"""Test weights for the MatMul-free LM: a config's init with its gains and lower bounds moved off 1 and 0, so that
every term of the model matters."""
import numpy as np

from llmpy.backends import get_backend
from llmpy.config import config_from_name
from llmpy.models.mmfree import MMFree


def trained_like(name: str, seed: int = 0):
    """(config, fp32 params): the init of `name` from `seed`, every 1-D and 2-D tensor but the embeddings moved by
    N(0, 0.1)."""
    cfg = config_from_name(name)
    m = MMFree(cfg, get_backend("cpu"), 1, 4, training=False)
    m.init_weights(seed)
    p = m.params_numpy()
    r = np.random.default_rng(seed)
    for n, v in p.items():
        if v.ndim <= 2 and n not in ("wte", "lm_head"):
            p[n] = (v + 0.1 * r.standard_normal(v.shape)).astype(np.float32)
    return cfg, p
