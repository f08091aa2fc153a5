"""The training loop's view of data parallelism: `Dist` (rank, communicator, watchdog, barriers, sums, the
collective stop decision; with one process every method is a no-op, so the loop reads the same either way) and
`GradReducer` (the hooks that reduce each layer's gradients while backward goes on)."""
from __future__ import annotations

import os

import numpy as np

from ..errors import UserError
from .env import DEFAULT_TIMEOUT, ENV_RDZV_PATH, ENV_TIMEOUT, dist_env
from .watchdog import Watchdog


class Dist:
    def __init__(self, env):
        self.env, self.rank, self.world = env, env.rank, env.world
        self.main = env.rank == 0
        self.be = self.comm = self.watchdog = None
        self._stop_read = None
        self.timeout = float(os.environ.get(ENV_TIMEOUT, DEFAULT_TIMEOUT))

    @classmethod
    def start(cls, tc) -> "Dist":
        env = dist_env()
        if env.world > 1 and tc.device == "cpu":
            raise UserError("data-parallel training (several ranks) needs --device cuda")
        return cls(env)

    def connect(self, be):
        """The NCCL communicator (None for one process) and the watchdog that stops every rank if one dies."""
        self.be = be
        if self.world == 1:
            return None
        from .nccl import NcclComm
        self.comm = NcclComm(self.env, rdzv=self.env.rdzv, rdzv_path=os.environ.get(ENV_RDZV_PATH),
                             timeout=self.timeout)
        self.watchdog = Watchdog(self.env, timeout=self.timeout, on_abort=self.comm.abort).start()
        self._flag = be.zeros(1, np.float32)
        return self.comm

    def progress(self) -> None:
        if self.watchdog is not None:
            self.watchdog.progress()

    def stop(self) -> None:
        """Clean end of a data-parallel run: wait for the device, tell the watchdog. The communicator is not
        released: ncclCommAbort (and ncclCommDestroy at interpreter exit) hung every rank after CUDA graphs had
        captured collectives (H200 x2, NCCL 2.28, 2026-11-28, stacks taken with LLMPY_STACKS); the CLI leaves
        with os._exit instead, and process exit frees the GPU."""
        if self.watchdog is not None:
            self.be.synchronize()
            self.watchdog.stop()

    def barrier(self) -> None:
        if self.world > 1:
            x = self.be.zeros(1, np.float32)
            self.comm.all_reduce(x)
            self.be.synchronize()

    def sum(self, value: float) -> float:
        """The sum of a host number over the ranks (blocking)."""
        if self.world == 1:
            return value
        x = self.be.asarray(np.array([value], np.float32))
        self.comm.all_reduce(x)
        return float(np.asarray(self.be.to_numpy(x))[0])

    def stop_agreed(self, local: bool) -> bool:
        """Whether any rank asked to stop, decided one step late so the host never waits for the GPU: this
        step's flags are summed on the device behind the step's work, the previous step's sum is read."""
        if self.world == 1:
            return local
        self.be.upload(self._flag, np.array([1.0 if local else 0.0], np.float32))
        self.comm.all_reduce(self._flag)
        prev, self._stop_read = self._stop_read, self.be.async_read(self._flag)
        return prev is not None and float(prev.result()[0][0]) > 0


class GradReducer:
    """Data parallelism overlapped with backward: as soon as a layer's gradients are complete, a second stream
    reduces that bucket over the ranks (zero 0: all-reduce in place; zero 1: reduce-scatter into this rank's
    shard; zero 2: reduce-scatter and add into the shard, freeing the rotating bucket buffer) while the main
    stream goes on with the layers below. The streams are ordered by events, which a CUDA graph captures as
    dependencies."""

    def __init__(self, step):
        self.step, self.be, self.comm = step, step.be, step.comm
        self.model, self.opt = step.model, step.opt
        self.side = self.be.side_stream()
        self.free = [self.be.event(), self.be.event()]  # ZeRO-2: bucket buffer l % 2 may be written again
        if self.model.zero == 2:
            self.tmp = self.be.zeros(max(b1 - b0 for b0, b1 in self.model.layout.buckets) // self.comm.world,
                                     self.be.param_dtype)

    def before_layer(self, l: int) -> None:
        if self.model.zero != 2:
            return
        if l < self.model.layout.L - 2:  # layers L-1, L-2 reuse buffers freed before the last done()
            self.be.stream.wait_event(self.free[l % 2])
        self.be.fill_zero(self.model.grads.bucket(1 + l))

    def after_layer(self, l: int) -> None:
        self._reduce(1 + l)

    def done(self) -> None:
        self._reduce(0)
        ev = self.be.event()
        ev.record(self.side)
        self.be.stream.wait_event(ev)  # join: the update (or the next micro-batch) comes after every reduction

    def _reduce(self, b: int) -> None:
        be, m, comm = self.be, self.model, self.comm
        full = m.grads.bucket(b)
        be.settle_grads(full)  # a gradient of the bucket no op wrote (none in our models) is zero before it is summed
        ev = be.event()
        ev.record(be.stream)
        self.side.wait_event(ev)
        with be.on(self.side):
            if m.zero == 0:
                comm.all_reduce(full, self.side)
            elif m.zero == 1:
                comm.reduce_scatter(full, self.opt.gshard.bucket(b), self.side)
            else:
                part = self.tmp[:full.size // comm.world]
                comm.reduce_scatter(full, part, self.side)
                be.add_inplace(self.opt.gshard.bucket(b), part)
                if b == 0:
                    be.fill_zero(full)  # the head's buffer is reused by the next micro-batch
                else:
                    self.free[(b - 1) % 2].record(self.side)
