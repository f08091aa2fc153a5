"""The packed MatMul-free LM's batch-1 decode step in one persistent kernel (kernels/mmfree_decode.cu) against the
per-op decode path (persistent_decode off: bitlinear_packed_decode*, mlgru_forward, the fused residual RMSNorms)
on the same GPU: the same logits and recurrent states bit for bit at every step, base3 and 2bit codes, bf16 and
fp32, either inner loop (2-bit fields or the code table), a config whose sizes are not multiples of the packs (d =
200: 40 code bytes a row). Marked gpu."""
import numpy as np
import pytest

from dev.mmfree_decode_step import differing

from llmpy.backends import get_backend
from llmpy.config import config_from_name
from llmpy.formats.bf16 import bf16_bits_to_fp32, fp32_to_bf16_bits
from llmpy.formats.ternary import read_ternary, write_ternary
from llmpy.models.decode import decoder
from llmpy.models.mmfree import MMFree

pytestmark = pytest.mark.gpu
CONFIGS = ("mmfree:l3d256i512v50257t128", "mmfree:l2d200i520v1000t64")


def packed_params(name, packing, tmp_path):
    cfg = config_from_name(name)
    m = MMFree(cfg, get_backend("cpu"), 1, 8, training=False)
    m.init_weights(3)
    p = m.params_numpy()
    r = np.random.default_rng(0)
    for n, v in p.items():  # gains and lower bounds off their init values, so each matters
        if v.ndim <= 2 and n not in ("wte", "lm_head"):
            v = (v + 0.1 * r.standard_normal(v.shape)).astype(np.float32)
        p[n] = bf16_bits_to_fp32(fp32_to_bf16_bits(v))
    write_ternary(tmp_path / "t.safetensors", cfg, p, packing=packing)
    return cfg, read_ternary(tmp_path / "t.safetensors")[1]


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("packing", ["base3", "2bit"])
@pytest.mark.parametrize("name, fields", [(CONFIGS[0], True), (CONFIGS[0], False), (CONFIGS[1], True)])
def test_one_kernel_decode_equals_the_per_op_path_bit_for_bit(name, fields, packing, dtype, tmp_path):
    """fields: the kernel reads 2-bit fields (base 3 transcribed) where rows are whole words (d = 256), else the
    code table (also d = 200, whose rows are not)."""
    cfg, q = packed_params(name, packing, tmp_path)
    be = get_backend("cuda", dtype)
    new, old = decoder(cfg, q, be), decoder(cfg, q, be)
    new.persistent_decode, old.persistent_decode = True, False
    be.mmfree.decode_fields = fields  # read when the first step makes the plan
    states = [m.new_decode_state(cfg.max_seq_len) for m in (new, old)]
    toks = np.random.default_rng(1).integers(0, cfg.vocab_size, 6)
    for i, t in enumerate(toks):  # the first step runs eagerly, the rest replay its CUDA graph
        a, b = (m.decode_step(np.array([[t]]), st) for m, st in zip((new, old), states))
        assert np.isfinite(b).all() and np.abs(b).max() > 0
        ha, hb = (be.to_numpy(st.h) for st in states)
        same = np.array_equal(a.view(np.uint32), b.view(np.uint32)), np.array_equal(ha.view(np.uint32),
                                                                                     hb.view(np.uint32))
        assert all(same), (i, same, np.abs(a - b).max(), np.abs(ha - hb).max(), differing(new, old))
    be.mmfree.decode_fields = True
    plan = new._one_kernel_plan[1]
    assert plan is not None, be.mmfree.decode_step_why  # it ran: no silent fall-back
    assert int(be.to_numpy(plan["A"])[-1]) == (fields and cfg.channels % 16 == 0)  # the inner loop asked for
    assert getattr(old, "_one_kernel_plan", None) is None


def _same(a, b) -> bool:
    return np.array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))


def test_one_kernel_decode_of_several_states_in_turn_and_beside_a_batch(tmp_path):
    """One batch-1 model decoding three states in turn (each turn a new plan and an eager first step, from a
    non-zero state: what generate_batch's row decoder does), against the per-op path doing the same; and a per-op
    batch of 3 sharing its weights, stepped between those turns (its graph replayed while plans come and go), against
    a batch beside a per-op model, in fp32 (a packed model's bf16 embedding widened: once by array temporaries that
    the batch's captured step kept writing after the kernel's next plan reused their memory)."""
    cfg, q = packed_params(CONFIGS[0], "base3", tmp_path)
    be = get_backend("cuda", "fp32")
    new, old = decoder(cfg, q, be), decoder(cfg, q, be)
    new.persistent_decode, old.persistent_decode = True, False
    batch, batch_old = decoder(cfg, q, be, 3, weights_of=new), decoder(cfg, q, be, 3, weights_of=old)
    sn, so = [new.new_decode_state(64) for _ in range(3)], [old.new_decode_state(64) for _ in range(3)]
    sb, sbo = batch.new_decode_state(64), batch_old.new_decode_state(64)
    toks = np.random.default_rng(2).integers(0, cfg.vocab_size, (3, 4))
    for i in range(toks.shape[1]):
        got, want = batch.decode_step(toks[:, i:i + 1], sb), batch_old.decode_step(toks[:, i:i + 1], sbo)
        assert _same(got, want), ("the batch beside the one-kernel model", i)
        for b in range(3):
            a, c = new.decode_step(toks[b:b + 1, i:i + 1], sn[b]), old.decode_step(toks[b:b + 1, i:i + 1], so[b])
            assert _same(a, c) and _same(be.to_numpy(sn[b].h), be.to_numpy(so[b].h)), ("state in turn", i, b)
    assert new._one_kernel_plan[1] is not None, be.mmfree.decode_step_why
