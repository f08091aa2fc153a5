"""The MatMul-free LM on the GPU against the CPU reference from the same weights: loss and every gradient, ten
training steps, decoding with recurrent states, the packed ternary model (same tokens as the latent one); bitwise
determinism and resume of a CUDA run. Marked gpu: skipped where there is none (CI).

A quantized model is discontinuous: a quantizer input near a rounding tie may round the other way on the GPU (sums
in another order; in bf16, activations of 8 significant bits), and each flip moves its outputs by one int8 step.
At these sizes even fp32 sees a few per step, so the gradient tolerances are looser than Llama's; the exact
comparison of the math is tests/test_mmfree_torch.py's (float64). The weights are made bf16-representable so that
the CPU and a bf16 GPU model quantize the same weights."""
from functools import partial

import numpy as np
import pytest

from cuda_common import (decode_on_both, forward_backward, loaded_model, one_step_vs_cpu, random_batches, relerr,
                         reproducible_runs, resumed_run, run_shards, ten_steps_vs_cpu, vocab_cut_grads)

from llmpy.backends import get_backend
from llmpy.config import config_from_name
from llmpy.formats.bf16 import bf16_bits_to_fp32, fp32_to_bf16_bits
from llmpy.formats.ternary import read_ternary, write_ternary
from llmpy.models.base import inference_model
from llmpy.models.decode import decoder, generate
from llmpy.models.mmfree import MMFree

pytestmark = pytest.mark.gpu
CFG = config_from_name("mmfree:l3d256i512v50257t128")  # padded vocabulary (50304 rows): the head's w_rows
B, T = 4, 128
GRAD_TOL = {"fp32": 1e-2, "bf16": 1e-1}


@pytest.fixture(scope="module")
def params():
    m = MMFree(CFG, get_backend("cpu"), 1, 8, training=False)
    m.init_weights(3)
    p = m.params_numpy()
    r = np.random.default_rng(0)
    for n, v in p.items():
        if v.ndim <= 2 and n not in ("wte", "lm_head"):
            v = (v + 0.1 * r.standard_normal(v.shape)).astype(np.float32)
        p[n] = bf16_bits_to_fp32(fp32_to_bf16_bits(v))
    return p


batches = partial(random_batches, CFG.vocab_size, B, T)  # batches(n, seed=0)
model_on = partial(loaded_model, MMFree, CFG, B, T)  # model_on(device, dtype, params, **kw)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_loss_and_every_gradient_vs_cpu(params, dtype):
    cpu, gpu = one_step_vs_cpu(partial(model_on, params=params), dtype, batches(1)[0])
    worst = {}
    for name, gg, gc in vocab_cut_grads(cpu, gpu, CFG.vocab_size):
        worst[name] = relerr(gg, gc)
        print(f"  grad {name:12s} rel err {worst[name]:.2e}")
    assert max(worst.values()) < GRAD_TOL[dtype], worst


def test_recompute_levels_give_bitwise_the_same_gradients(params):
    """Recompute 2 reruns the GLU's gate/up BitLinear and the MLGRU scan in backward (fixed-order kernels on the
    same inputs) and must give the gradients of recompute 0 bit for bit, with less activation memory."""
    (x, y), = batches(1)
    out = []
    for rc in (0, 1, 2):
        m = model_on("cuda", "bf16", params, recompute=rc)
        loss = forward_backward(m, x, y)
        out.append((loss, {n: m.be.to_numpy(m.grads[n]) for n in m.params.shapes}, m.memory_plan()["activations"]))
    (l0, g0, a0), *rest = out
    for rc, (loss, g, a) in enumerate(rest, 1):
        assert loss == l0 and a < a0
        for n in g0:
            assert np.array_equal(g[n].view(np.uint16) if g[n].dtype.itemsize == 2 else g[n],
                                  g0[n].view(np.uint16) if g0[n].dtype.itemsize == 2 else g0[n]), (rc, n)
    assert out[2][2] < out[1][2]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_ten_steps_vs_cpu(params, dtype):
    # free-running quantized training drifts (measured 7.5e-3 fp32, 1.4e-2 bf16)
    ten_steps_vs_cpu(partial(model_on, params=params), dtype, batches(2, seed=1) * 5, 0.03, cuda_recompute=1)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_decoding_matches_the_full_forward_and_the_cpu(params, dtype):
    """Decoding replays one CUDA graph per token (GRAPH_DECODE). Its logits equal the GPU's full forward over the
    sequence (the same per-row quantization and exact integer sums, so bit for bit up to the recurrence's and the
    norms' rounding), and are close to the CPU's (flips apart)."""
    n = 12
    toks = np.random.default_rng(4).integers(0, CFG.vocab_size, (1, n)).astype(np.int32)
    cpu, gpu, m = decode_on_both(CFG, params, dtype, toks)
    full = inference_model(CFG, params, m.be, 1, n)
    full.forward(toks)
    ref = m.be.to_numpy(full.acts["logits"]).astype(np.float32)[4:, :CFG.vocab_size]
    err = relerr(gpu, ref)
    print(f"\n{dtype}: decode vs the GPU's full forward rel err {err:.2e}")
    assert err < 1e-6
    assert len(generate(m, [1, 2, 3], 6, rng=np.random.default_rng(0), temperature=0)) == 6
    err = relerr(gpu, cpu)
    print(f"{dtype}: decode vs the CPU rel err {err:.2e}")
    assert err < (2e-2 if dtype == "fp32" else 1.5e-1)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_packed_model_matches_the_latent_one_on_the_gpu(params, dtype, tmp_path):
    """Packed codes x int8 activations (the decode kernel for a few rows, unpack + GEMM for many) against the
    latent weights on the same GPU: the same integer sums and rescale, so equal logits up to the bf16 rounding of
    the embedding the file makes; and the packed GPU model against the packed CPU model."""
    write_ternary(tmp_path / "t.safetensors", CFG, params)  # bf16-representable weights: nothing is rounded
    _, q = read_ternary(tmp_path / "t.safetensors")
    p = params
    be = get_backend("cuda", dtype)
    for rows in (1, 64):  # decode kernel; unpack + GEMM
        x = np.random.default_rng(rows).integers(0, CFG.vocab_size, (1, rows)).astype(np.int32)
        latent, packed = inference_model(CFG, p, be, 1, rows), inference_model(CFG, q, be, 1, rows)
        latent.forward(x)
        packed.forward(x)
        a, b = (be.to_numpy(m.acts["logits"]).astype(np.float32) for m in (latent, packed))
        err = relerr(b, a)
        print(f"\n{dtype} rows {rows}: packed vs latent logits rel err {err:.2e}")
        assert err < (1e-4 if dtype == "fp32" else 1e-2)  # fp32: s_w summed in another order may flip a weight
    toks = [generate(decoder(CFG, w, b), [1, 2, 3], 20, rng=np.random.default_rng(7), temperature=0)
            for w, b in ((q, be), (q, get_backend("cpu")))]
    if dtype == "fp32":
        assert toks[0] == toks[1]
    assert packed.memory_plan()["packed ternary weights"] < latent.memory_plan()["parameters"] / 4


def test_determinism_graph_and_resume(tmp_path):
    init, shards = "mmfree:l2d128i256t64", run_shards(tmp_path)
    a, _ = reproducible_runs(init, shards, tmp_path)
    train = [e[1] for e in a if e[1] is not None]
    assert train[-1] < train[0]
    assert resumed_run(init, shards, tmp_path)[0] == a


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_batch_decodes_each_row_as_one_sequence_on_the_gpu(params, dtype, tmp_path):
    """Decoding B sequences as one batch on the GPU, packed (the decode kernel for <= 8 rows, unpack + GEMM for
    more) and latent: each step's logits (B, V) against each row decoded alone on the same GPU and against the CPU's
    batch; generate_batch samples each packed row as generate alone does with that row's generator (fp32)."""
    from llmpy.models.decode import generate_batch
    write_ternary(tmp_path / "t.safetensors", CFG, params)
    _, q = read_ternary(tmp_path / "t.safetensors")
    be, cpu = get_backend("cuda", dtype), get_backend("cpu")
    for kind, w in (("packed", q), ("latent", params)):
        one = decoder(CFG, w, be)
        for B in (3, 12):
            batch, ref = decoder(CFG, w, be, B, weights_of=one), decoder(CFG, w, cpu, B)
            toks = np.random.default_rng(B).integers(0, CFG.vocab_size, (B, 5))
            st, st_ref = batch.new_decode_state(CFG.max_seq_len), ref.new_decode_state(CFG.max_seq_len)
            alone = [one.new_decode_state(CFG.max_seq_len) for _ in range(B)]
            for i in range(5):
                got = batch.decode_step(toks[:, i:i + 1], st)
                rows = np.concatenate([one.decode_step(toks[b:b + 1, i:i + 1], alone[b]) for b in range(B)])
                want = ref.decode_step(toks[:, i:i + 1], st_ref)
                e_rows, e_cpu = relerr(got, rows), relerr(got, want)
                assert e_rows < (1e-4 if dtype == "fp32" else 2e-2), (kind, B, i, e_rows)
                assert e_cpu < (2e-2 if dtype == "fp32" else 1.5e-1), (kind, B, i, e_cpu)
            print(f"\n{dtype} {kind} B={B}: batch vs rows alone rel err {e_rows:.2e}, vs the CPU {e_cpu:.2e}")
        if dtype == "fp32" and kind == "packed":
            batch = decoder(CFG, w, be, 12, weights_of=one)
            got = generate_batch(batch, [1, 2, 3], 20, rngs=[np.random.default_rng(b) for b in range(12)])
            assert got == [generate(one, [1, 2, 3], 20, rng=np.random.default_rng(b)) for b in range(12)]
