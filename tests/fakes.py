"""Test doubles: `FakeComm`, NCCL's collectives in NumPy over threads of one process (checks the collectives'
math on the CPU), and a reference ZeRO shard arithmetic over a flat buffer (padded_size, shard_range,
shard_pieces) that the ZeRO tests check the collectives' math with."""
from __future__ import annotations

import threading
from typing import Callable

import numpy as np

class FakeWorld:
    """What the FakeComms of one world share: a slot per rank and a barrier (threads of one process)."""

    def __init__(self, world: int, timeout: float = 10.0):
        self.world, self.timeout = world, timeout
        self.slots: list = [None] * world
        self.ops: list = [None] * world
        self.barrier = threading.Barrier(world, timeout=timeout)


class FakeComm:
    """NCCL's collectives in NumPy for tests on the CPU: each rank is a thread holding FakeComm(rank, world).
    Reductions add in rank order (deterministic). A rank missing for `timeout` s makes every rank raise
    TimeoutError instead of hanging; ranks calling different collectives raise RuntimeError."""

    def __init__(self, rank: int, shared: FakeWorld):
        self.rank, self.world, self.shared = rank, shared.world, shared

    @classmethod
    def group(cls, world: int, timeout: float = 10.0) -> list["FakeComm"]:
        shared = FakeWorld(world, timeout)
        return [cls(r, shared) for r in range(world)]

    def _wait(self, op: str) -> None:
        try:
            self.shared.barrier.wait()
        except threading.BrokenBarrierError:
            raise TimeoutError(f"rank {self.rank}: {op} waited more than {self.shared.timeout:g} s for the other "
                               "ranks (one is missing or hung)") from None

    def _collective(self, op: str, x, compute: Callable[[list], object]):
        s = self.shared
        s.slots[self.rank], s.ops[self.rank] = x, op
        self._wait(op)
        if len(set(s.ops)) != 1:
            raise RuntimeError(f"rank {self.rank}: ranks called different collectives: {s.ops}")
        result = compute(list(s.slots))
        self._wait(op)  # nobody overwrites its input or slot before every rank has read them
        return result

    def _sum(self, arrays: list, sl: slice, op: str) -> np.ndarray:
        if op not in ("sum", "avg"):
            raise ValueError(f"unknown reduction {op!r}")
        if len({a.shape for a in arrays}) != 1:
            raise ValueError(f"ranks passed different shapes: {[a.shape for a in arrays]}")
        out = np.array(arrays[0][sl], copy=True)
        for a in arrays[1:]:
            out += a[sl]
        if op == "avg":
            out /= self.world
        return out

    def all_reduce(self, x: np.ndarray, op: str = "sum") -> np.ndarray:
        """x = the sum (or mean) of every rank's x, in place."""
        x[...] = self._collective("all_reduce", x, lambda v: self._sum(v, slice(None), op))
        return x

    def all_max(self, x: np.ndarray) -> np.ndarray:
        """x = the elementwise max of every rank's x, in place."""
        x[...] = self._collective("all_max", x, lambda v: np.maximum.reduce([np.asarray(a) for a in v]))
        return x

    def reduce_scatter(self, x: np.ndarray, out: np.ndarray, op: str = "avg") -> np.ndarray:
        """out = this rank's shard (x.size // world elements) of the reduction of every rank's flat x."""
        L = out.size
        if x.size != L * self.world:
            raise ValueError(f"reduce_scatter: input has {x.size} elements, need world*shard = {self.world * L}")
        flat = x.reshape(-1)
        vals = self._collective("reduce_scatter", flat,
                                lambda v: self._sum(v, slice(self.rank * L, (self.rank + 1) * L), op))
        out.reshape(-1)[...] = vals
        return out

    def all_gather(self, shard: np.ndarray, out: np.ndarray) -> np.ndarray:
        """out = every rank's shard, concatenated in rank order."""
        if out.size != shard.size * self.world:
            raise ValueError(f"all_gather: output has {out.size} elements, need world*shard = "
                             f"{self.world * shard.size}")
        out.reshape(-1)[...] = self._collective("all_gather", shard.reshape(-1), np.concatenate)
        return out

    def broadcast(self, x: np.ndarray, root: int = 0) -> np.ndarray:
        x[...] = self._collective("broadcast", x, lambda v: np.array(v[root], copy=True))
        return x

    def barrier(self) -> None:
        self._collective("barrier", None, lambda v: None)


def padded_size(n: int, world: int, align: int = 64) -> int:
    """n rounded up to a multiple of world*align: every rank's shard has padded_size // world elements, and every
    shard starts on an `align`-element boundary (vector loads, NCCL's alignment)."""
    if n < 0 or world < 1 or align < 1:
        raise ValueError(f"bad shard settings: n={n} world={world} align={align}")
    unit = world * align
    return -(-n // unit) * unit


def shard_range(n: int, rank: int, world: int, align: int = 64) -> tuple[int, int]:
    """[begin, end) of rank's shard of a flat buffer of n elements padded to padded_size(n, world, align).
    The last shards may lie partly or wholly in the padding (>= n)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..{world - 1}")
    size = padded_size(n, world, align) // world
    return rank * size, (rank + 1) * size


def shard_pieces(offsets: dict[str, int], sizes: dict[str, int], begin: int,
                 end: int) -> list[tuple[str, int, int, int]]:
    """The parts of the named tensors of a flat buffer (tensor `name` = buffer[offsets[name]:+sizes[name]]) that
    fall in [begin, end), by offset: (name, tensor_begin, tensor_end, shard_begin), where tensor[tensor_begin:
    tensor_end] is shard[shard_begin:shard_begin + tensor_end - tensor_begin]. Gaps between tensors are skipped."""
    out = []
    for name in sorted(offsets, key=offsets.__getitem__):
        off = offsets[name]
        lo, hi = max(begin, off), min(end, off + sizes[name])
        if lo < hi:
            out.append((name, lo - off, hi - off, lo - begin))
    return out
