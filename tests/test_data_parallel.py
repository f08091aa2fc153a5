"""Data parallelism and ZeRO on the CPU: two ranks as threads over an in-process communicator run the real
TrainStep (per-layer reduction hooks, sharded AdamW, all-gather) and must match one process training on the same
global batch with gradient accumulation. Also the bucketed parameter layout that makes the shards."""
import threading

import numpy as np
import pytest

from llmpy.backends import get_backend
from llmpy.config import GPT2Config
from llmpy.distributed import FakeComm
from llmpy.models.gpt2 import GPT2
from llmpy.models.params import ParamBuffer, ParamLayout, RotatingGrads
from llmpy.optim import AdamW
from llmpy.step import TrainStep

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


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_two_ranks_match_one_process_with_accumulation(zero):
    B, T, W, steps = 2, 16, 2, 3
    batches = data(steps, B, T, W)
    ref_losses, ref_params = single(batches, B, T, W)
    comms = FakeComm.group(W, timeout=30)
    out, errors = {}, []

    def rank(r):
        try:
            comm = Comm(comms[r])
            m = GPT2(CFG, get_backend("cpu"), B, T, rank=r, world=W, zero=zero)
            m.init_weights(5)
            st = TrainStep(m, AdamW(m, weight_decay=0.1, comm=comm), 1, grad_clip=1.0, comm=comm)
            losses = [st.run([(w[r * B:(r + 1) * B, :-1], w[r * B:(r + 1) * B, 1:])], 1e-3)[0] for w in batches]
            out[r] = (losses, m.params_numpy(comm))
        except Exception as e:  # surface a rank's failure in the main thread
            errors.append(e)
            raise

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(W)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
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
        lay = ParamLayout(CFG, world)
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
    rot = RotatingGrads(be, ParamLayout(CFG, 2), np.float32)
    assert np.shares_memory(rot["qkvw"][0], rot.bucket(1)) and np.shares_memory(rot["qkvw"][2], rot.bucket(1))
    assert not np.shares_memory(rot["qkvw"][1], rot["qkvw"][0])
