"""Data parallelism and ZeRO on the CPU: two ranks as threads over an in-process communicator run the real
TrainStep (per-layer reduction hooks, sharded AdamW, all-gather) and must match one process training on the same
global batch with gradient accumulation. Also the bucketed parameter layout that makes the shards."""
import json
import threading

import numpy as np
import pytest

from llmpy.backends import get_backend
from llmpy.models.gpt2 import GPT2Config, spec
from llmpy.data.shards import write_shard
from llmpy.distributed.env import DistEnv
from fakes import FakeComm
from llmpy.models.gpt2 import GPT2
from llmpy.models.params import ParamBuffer, ParamLayout, RotatingGrads
from llmpy.train.optim import AdamW
from llmpy.train.step import TrainStep
from llmpy.train import TrainConfig, run
from llmpy.distributed.dataparallel import Dist
from streams import phrase_stream

CFG = GPT2Config(max_seq_len=16, vocab_size=300, padded_vocab_size=384, num_layers=3, num_heads=2, channels=32)


class Comm:
    """Our communicator interface (sum reductions, optional stream) over FakeComm."""

    def __init__(self, fake):
        self.fake, self.rank, self.world = fake, fake.rank, fake.world

    def all_reduce(self, x, stream=None):
        self.fake.all_reduce(x, op="sum")

    def reduce_scatter(self, send, recv, stream=None):
        self.fake.reduce_scatter(send, recv, op="sum")

    def all_gather(self, send, recv, stream=None):
        self.fake.all_gather(send, recv)

    def all_max(self, x, stream=None):
        self.fake.all_max(x)


def data(steps, B, T, world):
    r = np.random.default_rng(0)
    return [r.integers(0, CFG.vocab_size, (B * world, T + 1)).astype(np.int32) for _ in range(steps)]


def single(batches, B, T, world):
    m = GPT2(CFG, get_backend("cpu"), B, T)
    m.init_weights(5)
    st = TrainStep(m, AdamW(m, weight_decay=0.1), world, grad_clip=1.0)
    losses = [st.run(((w[i * B:(i + 1) * B, :-1], w[i * B:(i + 1) * B, 1:]) for i in range(world)), 1e-3)[0]
              for w in batches]
    return losses, m.params_numpy()


def on_threads(world, fn):
    """fn(rank) on `world` threads; a rank's exception fails the test (the others then time out in FakeComm)."""
    out, errors = {}, []

    def body(r):
        try:
            out[r] = fn(r)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return out


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_two_ranks_match_one_process_with_accumulation(zero):
    B, T, W, steps = 2, 16, 2, 3
    batches = data(steps, B, T, W)
    ref_losses, ref_params = single(batches, B, T, W)
    comms = FakeComm.group(W, timeout=30)

    def rank(r):
        comm = Comm(comms[r])
        m = GPT2(CFG, get_backend("cpu"), B, T, rank=r, world=W, zero=zero)
        m.init_weights(5)
        st = TrainStep(m, AdamW(m, weight_decay=0.1, comm=comm), 1, grad_clip=1.0, comm=comm)
        losses = [st.run([(w[r * B:(r + 1) * B, :-1], w[r * B:(r + 1) * B, 1:])], 1e-3)[0] for w in batches]
        return losses, m.params_numpy(comm)

    out = on_threads(W, rank)
    p0 = GPT2(CFG, get_backend("cpu"), B, T, training=False)
    p0.init_weights(5)
    init = p0.params_numpy()
    for r in range(W):
        losses, params = out[r]
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
        for k in params:  # the same weights on every rank as in the single process (relative to the update)
            assert np.linalg.norm(params[k] - ref_params[k]) <= 1e-3 * np.linalg.norm(ref_params[k] - init[k]), k
    assert all(np.array_equal(out[0][1][k], out[1][1][k]) for k in out[0][1])


def test_layout_views_runs_and_shards():
    be = get_backend("cpu")
    for world in (1, 2, 3):
        lay = ParamLayout(spec(CFG), world)
        buf = ParamBuffer(be, lay, np.float32)
        buf.flat[...] = np.arange(lay.size)
        covered = np.zeros(lay.size, bool)
        for name, layer, off, n in lay.pieces():  # every view element is where the layout says
            v = buf[name] if layer is None else buf[name][layer]
            assert np.array_equal(v.reshape(-1), np.arange(off, off + n))
            assert not covered[off:off + n].any()
            covered[off:off + n] = True
        runs = np.zeros(lay.size, int)
        for off, n, _ in lay.runs():
            runs[off:off + n] += 1
        assert np.all(runs[covered] == 1)
        owned = np.zeros(lay.size, int)
        for r in range(world):
            for g0, l0, n, _ in lay.shard_runs(r):
                owned[g0:g0 + n] += 1
        assert np.all(owned[covered] == 1), "every parameter is updated by exactly one rank"
        assert all((b1 - b0) % (64 * world) == 0 for b0, b1 in lay.buckets)
    rot = RotatingGrads(be, ParamLayout(spec(CFG), 2), np.float32)
    assert np.shares_memory(rot["qkvw"][0], rot.bucket(1)) and np.shares_memory(rot["qkvw"][2], rot.bucket(1))
    assert not np.shares_memory(rot["qkvw"][1], rot["qkvw"][0])


# ---- the whole training loop (llmpy.train.run) with two ranks as threads -----------------------------------------

class ThreadDist(Dist):
    """Rank r of a job whose ranks are threads of this process: the loop's Dist with FakeComm instead of NCCL."""

    def __init__(self, fake):
        super().__init__(DistEnv(rank=fake.rank, world=fake.world, local_rank=fake.rank, local_world=fake.world))
        self.fake = fake

    def connect(self, be):
        self.be, self.comm = be, Comm(self.fake)
        self._flag = be.zeros(1, np.float32)
        return self.comm


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("dp_loop")
    r = np.random.default_rng(1)
    stream = phrase_stream(r, 3000, phrases=30)
    write_shard(d / "tr_000.bin", stream[:18000])
    write_shard(d / "va_000.bin", stream[18000:])
    return d


def loop_config(shards, out, **kw):
    return TrainConfig(init="l2h2c32t16", train_data=str(shards / "tr_*.bin"), val_data=str(shards / "va_*.bin"),
                       batch_size=2, seq_len=16, steps=8, lr=3e-3, warmup_steps=2, val_every=4, val_batches=3,
                       sample_tokens=4, checkpoint_every=3, shuffle=False, progress=False, device="cpu",
                       out=str(out), **kw)


@pytest.mark.slow
@pytest.mark.parametrize("zero", [0, 1, 2])
def test_training_loop_on_two_thread_ranks(shards, tmp_path, zero):
    """Every collective of the loop (evaluation, sampling, checkpoints with ZeRO shards, the stop decision, resume)
    is called by every rank, and two ranks train like one process accumulating two micro-batches. (The CPU runs
    fp32, which keeps no master copy: gathering a ZeRO-sharded master is exercised by tests/test_cuda_multi.py.)"""
    ref = run(loop_config(shards, tmp_path / "one", grad_accum=2))
    comms = FakeComm.group(2, timeout=30)
    full = on_threads(2, lambda r: run(loop_config(shards, tmp_path / "dp", zero=zero), dist=ThreadDist(comms[r])))
    np.testing.assert_allclose(full[0].train_losses, ref.train_losses, rtol=1e-5)
    np.testing.assert_allclose([v for _, v in full[0].val_losses], [v for _, v in ref.val_losses], rtol=1e-5)
    assert full[1].train_losses == full[0].train_losses
    shard_files = sorted(p.name for p in (tmp_path / "dp").glob("zero-step*"))
    assert shard_files == ([] if zero == 0 else [f"zero-step00000008-rank{r}-of-2.safetensors" for r in (0, 1)])
    # stop after step 5 (the checkpoint after step 3 is replaced by the stop's), then resume on two ranks: the same run
    comms = FakeComm.group(2, timeout=30)
    on_threads(2, lambda r: run(loop_config(shards, tmp_path / "part", zero=zero, stop_at=5),
                                dist=ThreadDist(comms[r])))
    comms = FakeComm.group(2, timeout=30)
    resumed = on_threads(2, lambda r: run(TrainConfig(resume=str(tmp_path / "part"), progress=False),
                                          dist=ThreadDist(comms[r])))
    events = [json.loads(line) for line in open(tmp_path / "part" / "metrics.jsonl")]
    assert [e["train_loss"] for e in events if "train_loss" in e] == full[0].train_losses
    assert resumed[0].val_losses == full[0].val_losses[-1:]
