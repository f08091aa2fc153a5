"""Batched decoding on the GPU, every family (the MatMul-free LM packed too): the prompt prefilled once and copied
to every row (kv_cache_write into a row's view of the cache, the bits copied to the others), B rows a step, the
windows sliding together past the context; against each row decoded alone on the same GPU and against the CPU's
batch. Marked gpu: skipped where there is none (CI)."""
import numpy as np
import pytest
from cuda_common import relerr
from decoding import TINY, tiny

from llmpy.backends import get_backend
from llmpy.models.decode import decoder, generate, generate_batch

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", list(TINY))
def test_a_batch_on_the_gpu_samples_each_row_as_alone_and_steps_as_the_cpu(name, tmp_path):
    cfg, p = tiny(name, tmp_path)
    maxT = cfg.max_seq_len
    for dtype in ("fp32", "bf16"):
        be = get_backend("cuda", dtype)
        one = decoder(cfg, p, be)
        batch = decoder(cfg, p, be, 3, weights_of=one)
        # a one-token prompt is a step, a longer one a prefill (one shorter than the batch too); all copied
        for prompt in ([5], [5, 6], [5, 6, 7]):
            got = generate_batch(batch, prompt, 3 * maxT, rngs=[np.random.default_rng(b) for b in range(3)])
            assert [len(g) for g in got] == [3 * maxT] * 3 and len({tuple(g) for g in got}) == 3
            if dtype == "fp32":
                assert got == [generate(one, prompt, 3 * maxT, rng=np.random.default_rng(b)) for b in range(3)]
        cpu = decoder(cfg, p, get_backend("cpu"), 3)
        toks = np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 6))
        st, st_cpu = batch.new_decode_state(maxT), cpu.new_decode_state(maxT)
        for i in range(6):
            err = relerr(batch.decode_step(toks[:, i:i + 1], st), cpu.decode_step(toks[:, i:i + 1], st_cpu))
            # bf16: the MatMul-free LM's int8 activation codes flip with the rounding (as in test_cuda_mmfree.py)
            assert err < (1e-4 if dtype == "fp32" else 1.5e-1 if name.startswith("mmfree") else 3e-2), (dtype, i, err)
