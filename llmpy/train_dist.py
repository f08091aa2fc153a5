"""The training loop's view of data parallelism: rank, communicator, watchdog, barriers, sums, the collective
stop decision, and the per-rank ZeRO optimizer shards in the checkpoint folder. With one process every method
is a no-op, so the loop reads the same either way."""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from .distributed import ENV_RDZV_PATH, ENV_TIMEOUT, DEFAULT_TIMEOUT, Watchdog, dist_env
from .errors import UserError


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
        from .backends.cuda.comm import NcclComm
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


def shard_path(out: Path, step: int, rank: int, world: int) -> Path:
    return Path(out) / f"zero-step{step:08d}-rank{rank}-of-{world}.safetensors"


def save_shard(out, step: int, dist: Dist, m: np.ndarray, v: np.ndarray) -> None:
    from .formats.safetensors import save_safetensors
    Path(out).mkdir(parents=True, exist_ok=True)
    save_safetensors(shard_path(out, step, dist.rank, dist.world), {"adam_m": m, "adam_v": v},
                     {"format": "llmpy-zero-shard", "step": str(step), "rank": str(dist.rank),
                      "world": str(dist.world)})


def load_shard(out, step: int, dist: Dist) -> tuple[np.ndarray, np.ndarray]:
    from .formats.safetensors import load_safetensors
    path = shard_path(out, step, dist.rank, dist.world)
    if not path.exists():
        raise UserError(f"rank {dist.rank}: the optimizer shard {path.name} for step {step} is missing from {out} "
                        f"(ZeRO checkpoints need every rank's shard and the same number of ranks)")
    t, meta = load_safetensors(path)
    if meta.get("format") != "llmpy-zero-shard" or meta.get("step") != str(step):
        raise UserError(f"{path} is not the ZeRO shard of step {step}")
    return t["adam_m"], t["adam_v"]


def prune_shards(out, step: int, dist: Dist) -> None:
    """Removes this rank's shards of other steps (after the checkpoint naming `step` is in place)."""
    keep = shard_path(out, step, dist.rank, dist.world).name
    pattern = re.compile(rf"zero-step\d+-rank{dist.rank}-of-{dist.world}\.safetensors")
    for p in Path(out).glob(f"zero-step*-rank{dist.rank}-of-{dist.world}.safetensors"):
        if p.name != keep and pattern.fullmatch(p.name):
            p.unlink(missing_ok=True)
