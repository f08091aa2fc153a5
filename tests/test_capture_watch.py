"""CudaBackend.capture's check (LLMPY_CHECK_CAPTURE=1): a graph capture that drops memory it allocated raises,
since its replays would write memory the pool hands out again; memory the capture did not allocate may go. The
watch against a stand-in pool (no GPU)."""
import gc

import pytest

from llmpy.backends.cuda.backend import _AllocationWatch


class Pool:
    """CuPy's pool as the watch uses it: malloc(n) -> a pointer holding a memory object of the rounded size, which
    goes back to the pool when nothing holds it any more (CuPy's PooledMemory frees itself when collected)."""

    def __init__(self):
        self.freed = []

    def malloc(self, n):
        freed = self.freed

        class Mem:
            size = -(-n // 512) * 512

            def __del__(self):
                freed.append(self.size)

        class Ptr:
            mem = None

        p = Ptr()
        p.mem = Mem()
        return p


def test_a_capture_that_keeps_what_it_allocates_passes_and_one_that_drops_a_temporary_raises():
    pool = Pool()
    before = pool.malloc(1000)  # held before the capture, dropped during it: not the capture's concern
    watch = _AllocationWatch(pool)
    kept = [watch(100), watch(4096)]  # buffers made during the capture and kept
    del before
    gc.collect()
    watch.check()
    assert pool.freed == [1024]
    watch = _AllocationWatch(pool)
    kept.append(watch(100))
    tmp = watch(2048)  # a temporary: dropped before the capture ends
    del tmp
    assert pool.freed == [1024], "the watch holds a dropped allocation until its check"
    with pytest.raises(RuntimeError, match="dropped 1 of its allocations \\(2048 bytes\\)"):
        watch.check()
    assert pool.freed == [1024, 2048], "the check lets it go"
    assert len(kept) == 3
