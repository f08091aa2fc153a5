"""What the GPU model tests (test_cuda_model, test_cuda_llama, test_cuda_mmfree) share: random batches, a norm-wise
relative error, a model on a device from given weights, the CPU-vs-GPU comparisons of one step, ten training steps
and decoding, and whole bf16 CUDA training runs on small phrase-structured shards (determinism and resume)."""
from __future__ import annotations

import json

import numpy as np

from family_runs import phrase_shards

from llmpy.backends import get_backend
from llmpy.models.decode import decoder
from llmpy.train import TrainConfig, run
from llmpy.train.optim import AdamW
from llmpy.train.step import TrainStep


def random_batches(vocab, B, T, n, seed=0):
    """n (inputs, targets) pairs of B x T random tokens below vocab (targets are the inputs shifted by one)."""
    r = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w = r.integers(0, vocab, (B, T + 1)).astype(np.int32)
        out.append((np.ascontiguousarray(w[:, :-1]), np.ascontiguousarray(w[:, 1:])))
    return out


def relerr(a, b):
    """The relative error of a against b, norm-wise, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def loaded_model(model_cls, cfg, B, T, device, dtype, params, **kw):
    """A model_cls of cfg for B x T batches on device in dtype, loaded with params (kw: recompute and the like)."""
    m = model_cls(cfg, get_backend(device, dtype), B, T, **kw)
    m.load_params(params)
    return m


def forward_backward(m, x, y):
    """One forward and backward of m on (x, y), the gradient scaled by 1/(B*T); returns the loss."""
    B, T = x.shape
    loss = m.forward(x, y, grad_scale=1 / (B * T))
    m.backward()
    return loss


def one_step_vs_cpu(make, dtype, batch):
    """forward_backward of make("cpu", "fp32") and make("cuda", dtype) on batch, losses agreeing: (cpu, gpu) models."""
    x, y = batch
    cpu, gpu = make("cpu", "fp32"), make("cuda", dtype)
    lc = forward_backward(cpu, x, y)
    lg = forward_backward(gpu, x, y)
    print(f"\n{dtype}: loss cpu {lc:.6f} gpu {lg:.6f}")
    assert abs(lg - lc) <= (1e-5 if dtype == "fp32" else 1e-2) * lc
    return cpu, gpu


def vocab_cut_grads(cpu, gpu, vocab):
    """(name, gpu grad, cpu grad) in float64 per parameter; padded vocabulary rows must be 0, and are cut off."""
    for name in cpu.params.shapes:
        gc = np.asarray(cpu.grads[name], np.float64)
        gg = np.asarray(gpu.be.to_numpy(gpu.grads[name]), np.float64)
        if name in ("wte", "lm_head"):
            assert np.all(gg[vocab:] == 0), "padded vocabulary rows must get no gradient"
            gc, gg = gc[:vocab], gg[:vocab]
        yield name, gg, gc


def ten_steps_vs_cpu(make, dtype, data, tol, cuda_recompute=0):
    """One AdamW step per batch of data on the CPU (fp32) and GPU (dtype): the CPU's loss falls, the GPU's is near."""
    losses = {}
    for dev, dt in (("cpu", "fp32"), ("cuda", dtype)):
        m = make(dev, dt, recompute=0 if dev == "cpu" else cuda_recompute)
        st = TrainStep(m, AdamW(m, weight_decay=0.1), 1, grad_clip=1.0)
        losses[dev] = [st.run([b], 1e-3)[0] for b in data]
    diff = np.abs(np.array(losses["cuda"]) - np.array(losses["cpu"]))
    print(f"\n{dtype}: cpu {np.round(losses['cpu'], 5)}\n      gpu {np.round(losses['cuda'], 5)}\n"
          f"      max |diff| {diff.max():.2e}")
    assert losses["cpu"][-1] < losses["cpu"][0]
    assert diff.max() <= tol


def decode_logits(m, toks):
    """m's logits from decoding toks[:, :5] at once, then one token at a time, over a fresh decode state."""
    n = toks.shape[1]
    st = m.new_decode_state(n)
    steps = [m.decode_step(toks[:, :5], st)] + [m.decode_step(toks[:, i:i + 1], st) for i in range(5, n)]
    return np.concatenate(steps)


def decode_on_both(cfg, params, dtype, toks):
    """decode_logits on the CPU (fp32) and on the GPU (dtype): (cpu logits, gpu logits, the GPU decoder)."""
    cpu = decode_logits(decoder(cfg, params, get_backend("cpu", "fp32")), toks)
    gpu = decoder(cfg, params, get_backend("cuda", dtype))
    return cpu, decode_logits(gpu, toks), gpu


def run_shards(d):
    """(train glob, val glob) in folder d: 4000 random picks of 30 nine-token phrases (GPT-2's vocabulary)."""
    return phrase_shards(d, 50257, 0, phrases=30, length=9, picks=4000, split=30000)


def metrics(out):
    """(step, train loss, val loss, grad norm) of every event in folder out's metrics.jsonl."""
    with open(out / "metrics.jsonl") as f:
        ev = [json.loads(line) for line in f]
    return [(e["step"], e.get("train_loss"), e.get("val_loss"), e.get("grad_norm")) for e in ev]


def train_run(init, shards, out, **kw):
    """A bf16 CUDA run of init (8 steps of 8 x 64 in 2 micro-batches) into out, kw overriding: (metrics, result)."""
    base = {"init": init, "train_data": shards[0], "val_data": shards[1], "batch_size": 8, "seq_len": 64, "steps": 8,
            "val_every": 4, "val_batches": 2, "sample_tokens": 0, "progress": False, "device": "cuda",
            "dtype": "bf16", "grad_accum": 2, "out": str(out), "checkpoint_every": 0}
    base.update(kw)
    res = run(TrainConfig(**base))
    return metrics(res.out), res


def resume_run(out):
    """Resumes the run in folder out to its end: (metrics, result)."""
    res = run(TrainConfig(resume=str(out), progress=False, explicit=("resume",)))
    return metrics(res.out), res


def reproducible_runs(init, shards, tmp_path, **kw):
    """Runs a, b and c (c eager, not graph-replayed) of init into tmp_path: all bitwise equal; a's (metrics, result)."""
    a, ra = train_run(init, shards, tmp_path / "a", **kw)
    b, _ = train_run(init, shards, tmp_path / "b", **kw)
    c, _ = train_run(init, shards, tmp_path / "c", graph=False, **kw)
    assert a == b, "two runs with the same seed must be bitwise identical"
    assert a == c, "graph replay and eager execution must be bitwise identical"
    return a, ra


def resumed_run(init, shards, tmp_path, **kw):
    """Stops a run of init into tmp_path/d after step 3, then resumes it: the resumed run's (metrics, result)."""
    train_run(init, shards, tmp_path / "d", stop_at=3, **kw)
    return resume_run(tmp_path / "d")
