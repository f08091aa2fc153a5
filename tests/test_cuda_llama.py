"""Llama 3 on the GPU against the CPU reference from the same weights: loss and every gradient, ten training steps,
decoding with a GQA KV cache; bitwise determinism and resume of a CUDA run. Marked gpu: skipped where there is
none (CI)."""
from functools import partial

import numpy as np
import pytest

from cuda_common import (decode_on_both, loaded_model, one_step_vs_cpu, random_batches, relerr, reproducible_runs,
                         resumed_run, run_shards, ten_steps_vs_cpu, vocab_cut_grads)

from llmpy.backends import get_backend
from llmpy.config import config_from_name
from llmpy.models.decode import generate
from llmpy.models.llama3 import Llama

pytestmark = pytest.mark.gpu
CFG = config_from_name("llama3:l3d256h8k2f512v50257t128r32")  # GQA 8:2, head size 32, scaled RoPE, untied
B, T = 4, 128
GRAD_TOL = {"fp32": 1e-4, "bf16": 3e-2}
LOSS_TOL = {"fp32": 1e-4, "bf16": 2e-2}


@pytest.fixture(scope="module")
def params():
    m = Llama(CFG, get_backend("cpu"), 1, 8, training=False)
    m.init_weights(3)
    p = m.params_numpy()
    r = np.random.default_rng(0)
    for n in ("ln1w", "ln2w", "lnfw"):
        p[n] = (p[n] + 0.1 * r.standard_normal(p[n].shape)).astype(np.float32)
    return p


batches = partial(random_batches, CFG.vocab_size, B, T)  # batches(n, seed=0)
model_on = partial(loaded_model, Llama, CFG, B, T)  # model_on(device, dtype, params, **kw)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_loss_and_every_gradient_vs_cpu(params, dtype):
    cpu, gpu = one_step_vs_cpu(partial(model_on, params=params), dtype, batches(1)[0])
    for name, gg, gc in vocab_cut_grads(cpu, gpu, CFG.vocab_size):
        e = relerr(gg, gc)
        print(f"  grad {name:9s} rel err {e:.2e}")
        assert e < GRAD_TOL[dtype], name


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_ten_steps_vs_cpu(params, dtype):
    ten_steps_vs_cpu(partial(model_on, params=params), dtype, batches(2, seed=1) * 5, LOSS_TOL[dtype],
                     cuda_recompute=1)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_decoding_matches_the_cpu(params, dtype):
    toks = np.random.default_rng(4).integers(0, CFG.vocab_size, (1, 12)).astype(np.int32)
    cpu, gpu, m = decode_on_both(CFG, params, dtype, toks)
    assert len(generate(m, [1, 2, 3], 6, rng=np.random.default_rng(0), temperature=0)) == 6
    err = relerr(gpu, cpu)
    print(f"\n{dtype}: decode logits rel err {err:.2e}")
    assert err < (1e-4 if dtype == "fp32" else 3e-2)


def test_determinism_graph_and_resume(tmp_path):
    init, shards = "llama3:l2d128h4k2f256t64r8", run_shards(tmp_path)
    a, _ = reproducible_runs(init, shards, tmp_path)
    assert resumed_run(init, shards, tmp_path)[0] == a
