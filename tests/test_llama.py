"""Llama 3 through the family seam: configs and their sizes, decoding with a GQA KV cache against the full forward,
recompute, and training through the ordinary loop (checkpoint, bitwise resume, sampling)."""
import json

import numpy as np
import pytest

from llmpy.backends import get_backend
from llmpy.config import config_from_name
from llmpy.data.shards import write_shard
from llmpy.errors import UserError
from llmpy.formats.checkpoint import load_checkpoint
from llmpy.models.decode import decoder, generate
from llmpy.models.llama3 import Llama
from llmpy.train import TrainConfig, run

SMALL = "llama3:l2d64h4k2f192v256t24r32"


def test_published_configs_have_the_published_sizes():
    sizes = {"llama3:8b": 8_030_261_248, "llama3.1:8b": 8_030_261_248, "llama3.2:1b": 1_235_814_400,
             "llama3.2:3b": 3_212_749_824}
    for name, n in sizes.items():
        assert config_from_name(name).num_params() == n, name
    c = config_from_name("llama3.2:1b")
    assert (c.tied, c.rope_factor, c.max_seq_len, c.num_kv_heads) == (True, 32.0, 131072, 8)
    assert config_from_name("llama3.1:8b").rope_factor == 8.0 and config_from_name("llama3:8b").rope_factor == 1.0
    assert round(c.flops_per_token(2048) / 1e9, 2) == 8.22  # the spec's torchtitan figure


@pytest.mark.parametrize("name, why", [("llama3:l2d64h4k3f192", "multiple of key/value heads"),
                                       ("llama3:l2d60h8k2f192", "even head size"),
                                       ("llama3:70b", "unknown model config"),
                                       ("llama3.2:8b", "unknown model config")])
def test_bad_configs_are_one_line_errors(name, why):
    with pytest.raises(UserError, match=why):
        config_from_name(name)


def test_decoding_with_a_gqa_cache_matches_the_full_forward():
    cfg = config_from_name(SMALL)
    n = 20
    full = Llama(cfg, get_backend("cpu"), 1, n, training=False)
    full.init_weights(3)
    p = full.params_numpy()
    toks = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, n)).astype(np.int32)
    full.forward(toks)
    ref = full.acts["logits"][:, :cfg.vocab_size].copy()
    dec = decoder(cfg, p, get_backend("cpu"))
    state = dec.new_decode_state(n)
    assert state.k.shape == (cfg.num_layers, 1, cfg.num_kv_heads, n, cfg.head_size)  # K heads, not NH
    got = [dec.decode_step(toks[:, :6], state)[0]] + [dec.decode_step(toks[:, i:i + 1], state)[0]
                                                      for i in range(6, n)]
    err = np.linalg.norm(np.stack(got) - ref[5:]) / np.linalg.norm(ref[5:])
    assert err < 1e-5
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
    d = tmp_path_factory.mktemp("llama")
    r = np.random.default_rng(3)
    phrases = [r.integers(0, 256, 5) for _ in range(12)]
    stream = np.concatenate([phrases[i] for i in r.integers(0, 12, 1500)])
    write_shard(d / "tr_000.bin", stream[:6000])
    write_shard(d / "va_000.bin", stream[6000:])
    return str(d / "tr_*.bin"), str(d / "va_*.bin")


def test_trains_checkpoints_and_resumes_bitwise(shards, tmp_path):
    kw = dict(init="llama3:l2d64h4k2f192t32r8", train_data=shards[0], val_data=shards[1], batch_size=4,
              seq_len=16, steps=8, val_every=4, val_batches=2, sample_tokens=4, checkpoint_every=0, device="cpu",
              progress=False, lr=3e-3, warmup_steps=0)
    full = run(TrainConfig(out=str(tmp_path / "full"), **kw))
    assert full.train_losses[-1] < full.train_losses[0] - 0.5
    ck = load_checkpoint(tmp_path / "full" / "checkpoint.safetensors")
    assert type(ck.cfg).__name__ == "LlamaConfig" and ck.cfg.rope_factor == 8.0 and "lm_head" in ck.params
    run(TrainConfig(out=str(tmp_path / "part"), stop_at=3, **kw))
    run(TrainConfig(resume=str(tmp_path / "part"), progress=False, explicit=("resume",)))
    events = [json.loads(line) for line in open(tmp_path / "part" / "metrics.jsonl")]
    assert [e["train_loss"] for e in events if "train_loss" in e] == full.train_losses
