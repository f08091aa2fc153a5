"""The bookkeeping of gradients that count as zero (CUDABackend.fresh_grads), on the CPU with fake arrays: which
writes overwrite, which memory gets zeroed for real and when. The GPU side is tests/test_cuda_fresh_grads.py; the
training step's use of it (first micro-batch fresh, ZeRO-2 not) is covered by the CPU step tests and the GPU runs."""
from types import SimpleNamespace

from llmpy.backends.cuda.backend import CUDABackend, _span


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
    be.fill_zero = lambda x: filled.append(_span(x))
    be.fresh_grads(Arr(0, 500))
    be._zero_if_fresh(Arr(0, 100), None)
    be._zero_if_fresh(Arr(0, 100))
    assert filled == [(0, 200)], "zeroed once, when it still counted as zero"
    assert zeroed == []


def test_nothing_counts_as_zero_outside_a_first_micro_batch():
    be, zeroed = backend()
    assert be._first_write(Arr(0, 10)) is False and be._first_write(None) is False
    assert zeroed == []
