"""What the families' CPU tests share: small phrase-structured shards (learnable in a few steps) and the check that
a family trains through the ordinary loop, checkpoints, and resumes bitwise."""
from __future__ import annotations

import json

import numpy as np

from llmpy.data.shards import write_shard
from llmpy.formats.checkpoint import load_checkpoint
from llmpy.train import TrainConfig, run


def phrase_shards(d, vocab: int = 256, seed: int = 3, *, phrases: int = 12, length: int = 5, picks: int = 1500,
                  split: int = 6000) -> tuple[str, str]:
    """(train glob, val glob) of shards in folder d: `picks` random picks of `phrases` phrases of `length` tokens
    below vocab, the first `split` tokens for training."""
    r = np.random.default_rng(seed)
    table = [r.integers(0, vocab, length) for _ in range(phrases)]
    stream = np.concatenate([table[i] for i in r.integers(0, phrases, picks)])
    write_shard(d / "tr_000.bin", stream[:split])
    write_shard(d / "va_000.bin", stream[split:])
    return str(d / "tr_*.bin"), str(d / "va_*.bin")


def trains_and_resumes_bitwise(init: str, shards: tuple[str, str], tmp_path):
    """Trains `init` 8 steps (the loss must fall), then stops a second run after step 3 and resumes it: the
    resumed run's losses must equal the uninterrupted one's. Returns the first run's final checkpoint."""
    kw = dict(init=init, train_data=shards[0], val_data=shards[1], batch_size=4, seq_len=16, steps=8, val_every=4,
              val_batches=2, sample_tokens=4, checkpoint_every=0, device="cpu", progress=False, lr=3e-3,
              warmup_steps=0)
    full = run(TrainConfig(out=str(tmp_path / "full"), **kw))
    assert full.train_losses[-1] < full.train_losses[0] - 0.5
    run(TrainConfig(out=str(tmp_path / "part"), stop_at=3, **kw))
    run(TrainConfig(resume=str(tmp_path / "part"), progress=False, explicit=("resume",)))
    events = [json.loads(line) for line in open(tmp_path / "part" / "metrics.jsonl")]
    assert [e["train_loss"] for e in events if "train_loss" in e] == full.train_losses
    return load_checkpoint(tmp_path / "full" / "checkpoint.safetensors")


def decodes_like_the_full_forward(model_cls, cfg, n: int = 20):
    """Decoding 6 tokens, then one at a time, gives the full forward's logits (rel. error < 1e-5) on the CPU;
    returns (the decoder, its state) for the family's own checks."""
    from llmpy.backends import get_backend
    from llmpy.models.decode import decoder
    full = model_cls(cfg, get_backend("cpu"), 1, n, training=False)
    full.init_weights(3)
    toks = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, n)).astype(np.int32)
    full.forward(toks)
    ref = full.acts["logits"][:, :cfg.vocab_size].copy()
    dec = decoder(cfg, full.params_numpy(), get_backend("cpu"))
    state = dec.new_decode_state(n)
    got = [dec.decode_step(toks[:, :6], state)[0]] + [dec.decode_step(toks[:, i:i + 1], state)[0]
                                                      for i in range(6, n)]
    err = np.linalg.norm(np.stack(got) - ref[5:]) / np.linalg.norm(ref[5:])
    assert err < 1e-5
    return dec, state
