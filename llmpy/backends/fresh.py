"""Parameter gradients that count as zero, for both backends: a training step's first micro-batch overwrites each
parameter gradient instead of adding to a zeroed buffer (no memset of the whole buffer: 3.1 GB on GPT-2 d48).

`fresh_grads(flat)` declares the buffer zero without writing it. Each op about to write a gradient g asks
`_first_write(g)`: True means g counts as zero as a whole and the op overwrites it (a product with beta 0, a sum
stored instead of added); a part of g that counts as zero while the rest does not is zeroed for real first (then the
op adds). Ops that can only add (scatters) call `_zero_if_fresh`. `settle_grads` zeroes what no op wrote. The
decision is taken as each op is issued, so a captured CUDA graph keeps it. What counts as zero is a list of byte
ranges of memory; a backend supplies `_ptr` (an array's address) and `_zero_bytes` (a memset of ranges)."""
from __future__ import annotations


def span(a, ptr: int) -> tuple[int, int]:
    """[first byte, one past the last) that array view a (starting at address ptr) can touch (a strided view: the
    range enclosing it)."""
    lo = hi = ptr
    for n, st in zip(a.shape, a.strides):
        if n == 0:
            return lo, lo
        lo, hi = (lo + (n - 1) * st, hi) if st < 0 else (lo, hi + (n - 1) * st)
    return lo, hi + a.itemsize


class FreshGrads:
    fresh: list  # byte ranges [lo, hi) of parameter gradients that count as zero

    def _ptr(self, a) -> int:
        raise NotImplementedError

    def _zero_bytes(self, ranges) -> None:
        raise NotImplementedError

    def _span(self, a) -> tuple[int, int]:
        return span(a, self._ptr(a))

    def fresh_grads(self, flat) -> None:
        """The parameter gradients in flat count as zero from here, without a memset: the first op to write each one
        overwrites it; settle_grads zeroes what no op wrote."""
        self.fresh = [self._span(flat)]

    def settle_grads(self, x=None) -> None:
        """Zeroes the parts of x (default: all) that still count as zero but were never written; they no longer
        count as such after."""
        lo, hi = self._span(x) if x is not None else (0, 1 << 64)
        self._zero_bytes(self._cut(lo, hi))

    def _first_write(self, x) -> bool:
        """Whether the gradient x, about to be written, counts as zero as a whole: then the op overwrites it. A
        part of it that counts as zero while the rest does not is zeroed first (then the op accumulates)."""
        if not self.fresh or x is None:
            return False
        lo, hi = self._span(x)
        whole = x.flags.c_contiguous and any(a <= lo and hi <= b for a, b in self.fresh)
        cut = self._cut(lo, hi)
        if not whole:
            self._zero_bytes(cut)
        return whole

    def _zero_if_fresh(self, *grads) -> None:
        """For ops that only accumulate (scatters, the MatMul-free kernels): their gradients are zeroed for real if
        they count as zero."""
        for g in grads:
            if self._first_write(g):
                self.fill_zero(g)

    def _cut(self, lo, hi) -> list:
        """Removes [lo, hi) from the ranges that count as zero; returns the pieces removed."""
        keep, cut = [], []
        for a, b in self.fresh:
            if b <= lo or hi <= a:
                keep.append((a, b))
                continue
            cut.append((max(a, lo), min(b, hi)))
            keep += [r for r in ((a, lo), (hi, b)) if r[0] < r[1]]
        self.fresh = keep
        return cut
