"""Gradients that count as zero (CUDABackend.fresh_grads): a training step's first micro-batch overwrites each
parameter gradient instead of adding to a memset buffer. On the GPU: every gradient of GPT-2, Llama 3 and the
MatMul-free LM is written (buffers filled with NaN first stay NaN nowhere) and equals the zero-and-accumulate result,
then a second micro-batch accumulates on top. Marked gpu: skipped where there is none (CI). The bookkeeping itself
(which ranges count as zero, what is zeroed for real) is checked on the CPU in test_fresh_grads.py."""
import numpy as np
import pytest

from cuda_common import random_batches

from llmpy.backends import get_backend
from llmpy.config import config_from_name, family_of

pytestmark = pytest.mark.gpu
B, T = 4, 64
CONFIGS = ["gpt2:l2h4c128t64", "llama3:l2d128h4k2f256v50257t64r8", "mmfree:l2d128i256v50257t64"]


def _grads(m):
    return np.asarray(m.be.to_numpy(m.grads.flat), np.float64)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("recompute", [0, 1])
def test_first_micro_batch_overwrites_every_gradient(name, recompute):
    cfg = config_from_name(name)
    m = family_of(cfg).model(cfg, get_backend("cuda", "bf16"), B, T, recompute=recompute)
    m.init_weights(1)
    be, flat = m.be, m.grads.flat
    (x1, y1), (x2, y2) = (random_batches(cfg.vocab_size, B, T, 1, seed=s)[0] for s in (1, 2))

    def micro(x, y):
        m.forward(x, y, grad_scale=1 / (2 * B * T), return_loss=False)
        m.backward()

    # reference: zero, then accumulate both micro-batches
    m.zero_grad()
    micro(x1, y1)
    ref1 = _grads(m)
    micro(x2, y2)
    ref2 = _grads(m)
    # the same with the gradients full of NaN and declared zero: the first micro-batch must write all of them
    be.xp.cuda.runtime.memset(flat.data.ptr, 0xFF, flat.nbytes)
    be.fresh_grads(flat)
    micro(x1, y1)
    be.settle_grads()
    assert not be.fresh, "settle_grads leaves nothing counting as zero"
    got1 = _grads(m)
    assert not np.isnan(got1).any(), "a gradient was neither overwritten nor zeroed"
    assert np.any(got1)
    # overwriting (a product with beta 0, a sum stored) gives the sums the accumulation into zeros gave; the
    # products may take another cuBLASLt kernel for beta 0, so the bits may differ within bf16 rounding
    err = np.linalg.norm(got1 - ref1) / np.linalg.norm(ref1)
    assert err < 1e-2, err
    micro(x2, y2)  # nothing counts as zero now: the second micro-batch adds
    got2 = _grads(m)
    assert np.linalg.norm(got2 - ref2) / np.linalg.norm(ref2) < 1e-2
    assert np.linalg.norm(got2 - got1) > 0.1 * np.linalg.norm(got1), "the second micro-batch must add"
