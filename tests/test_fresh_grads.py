"""Gradients that count as zero (backends/fresh.py): the bookkeeping, through CUDABackend on the CPU with fake arrays
(which writes overwrite, which memory gets zeroed for real and when), and the CPU backend's whole models: a first
micro-batch over a gradient buffer of stale values gives the zero-and-accumulate gradients. The GPU side is
tests/test_cuda_fresh_grads.py; the training step's use of it (first micro-batch fresh, ZeRO-2 not) is covered by
the step tests and the GPU runs."""
from types import SimpleNamespace

import numpy as np
import pytest

from llmpy.backends import get_backend
from llmpy.backends.cuda.backend import CUDABackend
from llmpy.config import config_from_name, family_of


class Arr:
    """What the bookkeeping reads of a device array: its pointer, shape, strides, itemsize, contiguity."""

    def __init__(self, ptr, n, step=1, itemsize=2):
        self.data = SimpleNamespace(ptr=ptr)
        self.shape, self.strides, self.itemsize = (n,), (step * itemsize,), itemsize
        self.flags = SimpleNamespace(c_contiguous=step == 1)
        self.nbytes = n * itemsize


def backend():
    """A CUDABackend without a GPU: memsets are recorded as (first byte, bytes)."""
    be = object.__new__(CUDABackend)
    zeroed = []
    rt = SimpleNamespace(memsetAsync=lambda p, v, n, s: zeroed.append((p, n)))
    be.cp = SimpleNamespace(cuda=SimpleNamespace(runtime=rt, get_current_stream=lambda: SimpleNamespace(ptr=0)))
    be.fresh = []
    return be, zeroed


def test_a_whole_fresh_gradient_is_overwritten_once():
    be, zeroed = backend()
    be.fresh_grads(Arr(0, 500))            # bytes [0, 1000)
    w = Arr(200, 50)                       # [200, 300)
    assert be._first_write(w) is True
    assert be._first_write(w) is False, "the second write must add to the first"
    assert zeroed == []
    assert sorted(be.fresh) == [(0, 200), (300, 1000)]


def test_a_partly_fresh_or_strided_gradient_is_zeroed_for_real_then_added_to():
    be, zeroed = backend()
    be.fresh_grads(Arr(0, 500))
    be._first_write(Arr(200, 50))                    # [200, 300) written
    assert be._first_write(Arr(100, 150)) is False   # [100, 400): only [100, 200) and [300, 400) count as zero
    assert sorted(zeroed) == [(100, 100), (300, 100)]
    zeroed.clear()
    assert be._first_write(Arr(600, 10, step=2)) is False, "a strided view does not cover its whole range"
    assert zeroed == [(600, 38)]


def test_settle_zeroes_what_no_op_wrote_and_forgets_it():
    be, zeroed = backend()
    be.fresh_grads(Arr(0, 500))
    be._first_write(Arr(200, 50))
    be.settle_grads(Arr(0, 50))             # a bucket [0, 100): its unwritten part only
    assert zeroed == [(0, 100)]
    be.settle_grads()
    assert sorted(zeroed) == [(0, 100), (100, 100), (300, 700)]
    assert be.fresh == [] and be._first_write(Arr(0, 10)) is False
    be.settle_grads()
    assert len(zeroed) == 3, "nothing left to zero"


def test_scatter_ops_get_a_zeroed_table():
    be, zeroed = backend()
    filled = []
    be.fill_zero = lambda x: filled.append(be._span(x))
    be.fresh_grads(Arr(0, 500))
    be._zero_if_fresh(Arr(0, 100), None)
    be._zero_if_fresh(Arr(0, 100))
    assert filled == [(0, 200)], "zeroed once, when it still counted as zero"
    assert zeroed == []


def test_nothing_counts_as_zero_outside_a_first_micro_batch():
    be, zeroed = backend()
    assert be._first_write(Arr(0, 10)) is False and be._first_write(None) is False
    assert zeroed == []


@pytest.mark.parametrize("name", ["gpt2:l2h4c64t32", "llama3:l2d64h4k2f128v300t32r8", "mmfree:l2d64i128v300t32"])
@pytest.mark.parametrize("recompute", [0, 1])
def test_cpu_first_micro_batch_overwrites_stale_gradients(name, recompute):
    """The CPU backend overwrites (the products) or zeroes first (norm sums, scatters, the MatMul-free ops) every
    gradient: over a buffer full of NaN declared zero, one micro-batch gives what zeroing then accumulating gives, bit
    for bit (0 + x is x), NaN nowhere (the padded vocabulary rows, which no op writes, zeroed by settle_grads); a
    second micro-batch adds."""
    cfg = config_from_name(name)
    B, T = 2, 32
    m = family_of(cfg).model(cfg, get_backend("cpu"), B, T, recompute=recompute)
    m.init_weights(1)
    be, flat = m.be, m.grads.flat
    r = np.random.default_rng(5)
    (x1, y1), (x2, y2) = (np.split(r.integers(0, cfg.vocab_size, (B, 2 * T)).astype(np.int32), 2, axis=1)
                          for _ in range(2))

    def micro(x, y):
        m.forward(x, y, grad_scale=1 / (2 * B * T), return_loss=False)
        m.backward()

    m.zero_grad()
    micro(x1, y1)
    ref1 = flat.copy()
    micro(x2, y2)
    ref2 = flat.copy()
    flat[...] = np.nan
    be.fresh_grads(flat)
    micro(x1, y1)
    be.settle_grads()
    assert not be.fresh
    assert not np.isnan(flat).any(), "a gradient was neither overwritten nor zeroed"
    assert np.array_equal(flat, ref1)
    micro(x2, y2)
    assert np.array_equal(flat, ref2)
