"""The model seam: the family registry and names, checkpoints that record their family, and a family added from
outside the package (tests/toy_family.py: an untied LM head, no attention) that trains, resumes, samples and has
exact gradients through the shared machinery."""
import json

import numpy as np
import pytest

from family_runs import phrase_shards

from llmpy import config as registry
from llmpy.backends import get_backend
from llmpy.cli import main
from llmpy.config import config_from_name, family_of
from llmpy.errors import UserError
from llmpy.formats.checkpoint import load_checkpoint, load_weights, save_checkpoint
from llmpy.formats.safetensors import load_safetensors, save_safetensors
from llmpy.models.gpt2 import GPT2Config
from llmpy.train import TrainConfig, run


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(registry.FAMILIES, "toy", "toy_family")
    return registry.get_family("toy")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return phrase_shards(tmp_path_factory.mktemp("fam"), 500, 3, picks=1200, split=5000)


def test_names_resolve_through_the_registry():
    assert config_from_name("gpt2:d12") == config_from_name("d12") == GPT2Config()
    assert config_from_name("GPT2:l4h4c256t128") == GPT2Config(num_layers=4, num_heads=4, channels=256, max_seq_len=128)
    assert family_of(config_from_name("l2h2c32")).name == "gpt2"
    with pytest.raises(UserError, match="unknown model family 'nope'.*gpt2"):
        config_from_name("nope:d12")
    with pytest.raises(UserError, match="unknown model config 'x12' for GPT-2"):
        config_from_name("gpt2:x12")


def test_checkpoints_record_their_family(tmp_path):
    cfg = config_from_name("l1h2c16t8")
    params = {s.name: np.full(s.shape, 0.5, np.float32) for s in family_of(cfg).spec(cfg)}
    p = tmp_path / "c.safetensors"
    save_checkpoint(p, cfg, params)
    t, meta = load_safetensors(p)
    assert meta["family"] == "gpt2"
    # a file from before families (no "family" entry) is GPT-2
    del meta["family"]
    save_safetensors(p, t, meta)
    assert load_checkpoint(p).cfg == cfg
    # a family this llmpy does not know: one clear line, from every command that reads weights
    meta["family"] = "mamba9"
    save_safetensors(p, t, meta)
    with pytest.raises(UserError, match="unknown model family 'mamba9'"):
        load_weights(p)


def test_unknown_family_is_a_one_line_cli_error(tmp_path, capsys):
    cfg = config_from_name("l1h2c16t8")
    params = {s.name: np.zeros(s.shape, np.float32) for s in family_of(cfg).spec(cfg)}
    p = tmp_path / "c.safetensors"
    save_checkpoint(p, cfg, params)
    t, meta = load_safetensors(p)
    save_safetensors(p, t, meta | {"family": "mamba9"})
    assert main(["sample", "--checkpoint", str(p)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "mamba9" in err[0]


@pytest.mark.slow
def test_a_family_added_as_files_trains_resumes_and_samples(toy, shards, tmp_path):
    kw = dict(init="toy:l2c16", train_data=shards[0], val_data=shards[1], batch_size=4, seq_len=16, steps=8,
              val_every=4, val_batches=2, sample_tokens=5, checkpoint_every=0, device="cpu", progress=False, lr=1e-2,
              warmup_steps=0)
    full = run(TrainConfig(out=str(tmp_path / "full"), **kw))
    assert full.train_losses[-1] < full.train_losses[0] - 0.5, full.train_losses
    ck = load_checkpoint(tmp_path / "full" / "checkpoint.safetensors")
    assert type(ck.cfg).__name__ == "ToyConfig" and ck.cfg.vocab_size == 50257
    assert set(ck.params) == {s.name for s in toy.spec(ck.cfg)}
    assert not np.array_equal(ck.params["lm_head"], ck.params["wte"])  # untied, and both trained
    run(TrainConfig(out=str(tmp_path / "part"), stop_at=5, **kw))
    resumed = run(TrainConfig(resume=str(tmp_path / "part"), progress=False, explicit=("resume",)))
    events = [json.loads(line) for line in open(tmp_path / "part" / "metrics.jsonl")]
    assert [e["train_loss"] for e in events if "train_loss" in e] == full.train_losses
    assert resumed.val_losses == full.val_losses[-1:]


def test_untied_head_gradients_by_finite_differences(toy):
    """float64: every gradient of the toy model, the untied head's included, against central differences."""
    cfg = toy.parse("toy", "l2c8v40")
    be = get_backend("cpu", "fp64")
    B, T = 2, 5
    m = toy.model(cfg, be, B, T, logits_chunk=4)  # several chunks of logits, a short last one
    m.init_weights(0)
    p = m.params_numpy()
    rng = np.random.default_rng(1)
    p = {k: (v + 0.05 * rng.standard_normal(v.shape)).astype(np.float64) for k, v in p.items()}
    for s in toy.spec(cfg):
        if s.vocab_rows is not None:
            p[s.name][s.vocab_rows:] = 0
    x = rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    y = rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)

    def put(params):  # straight into the float64 views (load_params takes fp32 host weights)
        for k, v in params.items():
            m.params[k][...] = v

    def loss(params):
        put(params)
        return m.forward(x, y)

    put(p)
    m.zero_grad()
    m.forward(x, y, grad_scale=1.0 / (B * T))
    m.backward()
    grads = {k: np.array(m.grads[k]) for k in p}
    assert np.abs(grads["lm_head"]).sum() > 0 and np.abs(grads["wte"]).sum() > 0
    h = 1e-6
    for name, g in grads.items():
        flat = p[name].reshape(-1)
        for i in rng.choice(flat.size, size=min(6, flat.size), replace=False):
            if name in ("wte", "lm_head") and i // cfg.channels >= cfg.vocab_size:
                continue
            old = flat[i]
            flat[i] = old + h
            up = loss(p)
            flat[i] = old - h
            down = loss(p)
            flat[i] = old
            num = (up - down) / (2 * h)
            assert abs(num - g.reshape(-1)[i]) <= 1e-6 * max(1.0, abs(num)), (name, i, num, g.reshape(-1)[i])


def test_unknown_family_in_a_name_is_refused_by_train(shards, tmp_path, capsys):
    argv = ["train", "--init", "toy:l1c8", "--train-data", shards[0], "--device", "cpu", "--no-progress",
            "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    assert "unknown model family 'toy'" in capsys.readouterr().err
