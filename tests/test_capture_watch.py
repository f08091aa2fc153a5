"""CudaBackend.capture's check (LLMPY_CHECK_CAPTURE=1): a graph capture that frees memory it allocated raises,
since its replays would write memory the pool hands out again. The watch against a stand-in pool (no GPU)."""
import pytest

from llmpy.backends.cuda.backend import _AllocationWatch


class Pool:
    """CuPy's pool as the watch uses it: malloc(n) -> a pointer whose .mem.size is the rounded chunk, and
    used_bytes(), which drops when a pointer is released."""

    def __init__(self):
        self.live = {}

    def malloc(self, n):
        pool = self

        class Mem:
            size = -(-n // 512) * 512

        class Ptr:
            mem = Mem()

            def release(self):
                del pool.live[id(self)]

        p = Ptr()
        self.live[id(p)] = p.mem.size
        return p

    def used_bytes(self):
        return sum(self.live.values())


def test_a_capture_that_keeps_what_it_allocates_passes_and_one_that_frees_a_temporary_raises():
    pool = Pool()
    pool.malloc(1000)  # held before the capture
    watch = _AllocationWatch(pool)
    kept = [watch(100), watch(4096)]  # buffers made during the capture and kept
    watch.check()
    tmp = watch(2048)  # a temporary: freed before the capture ends
    tmp.release()
    with pytest.raises(RuntimeError, match="3 allocations and gave 2048 bytes back"):
        watch.check()
    assert len(kept) == 2
