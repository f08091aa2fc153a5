"""NCCL collectives for data parallelism (cupy.cuda.nccl), on a stream of our choosing.

Every call is stream-ordered and asynchronous, so it can be captured into a CUDA graph with the rest of the step.
Sums only: the training step folds 1/world into the loss gradient, so a summed gradient is the average.
NVLink multicast (NVLS) stays off: env.force_nccl_settings() runs before the communicator is made.
"""
from __future__ import annotations

import numpy as np

from ..errors import UserError


class NcclComm:
    def __init__(self, env, *, rdzv: str = "tcp", rdzv_path: str | None = None, timeout: float = 300.0):
        import cupy
        from cupy.cuda import nccl

        from .env import force_nccl_settings
        from .rendezvous import exchange_id
        note = force_nccl_settings()
        if note and env.rank == 0:
            print(note)
        self.cp, self.nccl = cupy, nccl
        self.rank, self.world = env.rank, env.world
        blob = nccl.get_unique_id() if env.rank == 0 else None
        uid = exchange_id(env, blob, method=rdzv, path=rdzv_path, timeout=timeout)
        try:
            self.comm = nccl.NcclCommunicator(env.world, uid, env.rank)
        except Exception as e:
            raise UserError(f"rank {env.rank}: NCCL could not start ({e})") from None
        self._types = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64,
                       np.dtype(np.int32): nccl.NCCL_INT32}

    def _type(self, a) -> int:
        t = self._types.get(np.dtype(a.dtype))
        if t is None:
            if np.dtype(a.dtype).name == "bfloat16":
                return self.nccl.NCCL_BFLOAT16
            raise TypeError(f"no NCCL type for {a.dtype}")
        return t

    def _s(self, stream):
        return (stream or self.cp.cuda.get_current_stream()).ptr

    def all_reduce(self, x, stream=None):
        """x = sum over ranks of x, in place."""
        self.comm.allReduce(x.data.ptr, x.data.ptr, x.size, self._type(x), self.nccl.NCCL_SUM, self._s(stream))

    def all_max(self, x, stream=None):
        """x = the elementwise max over ranks of x, in place (exact: the same on every rank)."""
        self.comm.allReduce(x.data.ptr, x.data.ptr, x.size, self._type(x), self.nccl.NCCL_MAX, self._s(stream))

    def reduce_scatter(self, send, recv, stream=None):
        """recv = this rank's 1/world slice of the sum over ranks of send."""
        if send.size != recv.size * self.world:
            raise ValueError(f"reduce_scatter: {send.size} elements in, {recv.size} out, world {self.world}")
        self.comm.reduceScatter(send.data.ptr, recv.data.ptr, recv.size, self._type(send), self.nccl.NCCL_SUM,
                                self._s(stream))

    def all_gather(self, send, recv, stream=None):
        """recv = the ranks' `send` slices concatenated (in place when send is this rank's slice of recv)."""
        if recv.size != send.size * self.world:
            raise ValueError(f"all_gather: {send.size} elements in, {recv.size} out, world {self.world}")
        self.comm.allGather(send.data.ptr, recv.data.ptr, send.size, self._type(send), self._s(stream))

    def abort(self):
        try:
            self.comm.abort()
        except Exception:
            pass
