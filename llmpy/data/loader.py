"""The training/validation DataLoader over llm.c token shards (data/shards.py), in llm.c's order or shuffled."""
from __future__ import annotations

import glob
import os

import numpy as np

from ..errors import UserError
from .shards import read_shard, shard_num_tokens

class DataLoader:
    """Batches of B sequences of T tokens from the shards matching `pattern` (sorted), for process `rank` of
    `world`.

    shuffle=False follows llm.c's dataloader exactly: shard by shard, batch i of a shard with ntok tokens
    (i < num_samples = (ntok-1) // (B*T*world)) is the B*T+1 tokens from i*B*T*world + rank*B*T; inputs are the
    first B*T, targets the same window shifted by one. After the last shard it wraps to the first (next epoch).
    shuffle=True (deterministic): epoch e visits shards in the order default_rng([seed, e]).permutation(n), and
    within shard file k (index in the sorted list) samples in default_rng([seed, e, k]).permutation(num_samples).

    `next_batch()` returns the same two preallocated int32 (B, T) arrays every call, overwritten in place: copy
    them to keep them. Shard headers are checked when the loader is made, token ids (against `vocab_size`) when a
    shard is first read. Only one shard is open at a time.
    """

    def __init__(self, pattern: str, B: int, T: int, *, rank: int = 0, world: int = 1, shuffle: bool = False,
                 seed: int = 0, vocab_size: int | None = None, val: bool = False):
        if B < 1 or T < 1 or world < 1 or not 0 <= rank < world or seed < 0:
            raise UserError(f"bad loader settings: B={B} T={T} rank={rank} world={world} seed={seed} "
                            "(need B, T, world >= 1, 0 <= rank < world, seed >= 0)")
        self.pattern, self.B, self.T, self.rank, self.world = pattern, B, T, rank, world
        self.shuffle, self.seed, self.vocab_size = bool(shuffle), seed, vocab_size
        self.files = sorted(glob.glob(os.path.expanduser(pattern)))
        if not self.files:
            raise UserError(f"no token shards match {pattern!r}")
        span = B * T * world
        self._ntok = [shard_num_tokens(f) for f in self.files]
        self._num_samples = [(n - 1) // span if n else 0 for n in self._ntok]
        for f, n, ns in zip(self.files, self._ntok, self._num_samples):
            if ns == 0 and val:  # a validation split: the fix is usually a larger one
                raise UserError(f"the val split {f} has {n} tokens, too few for one batch of B*T+1 = {span + 1} "
                                f"tokens (B={B}, T={T}): prepare a larger one (llmpy prepare ... --val-tokens "
                                f"{span + 1} or more) or use a smaller -b/-t")
            if ns == 0:
                raise UserError(f"{f} has {n} tokens, too few for one batch of B*T*world+1 = {span + 1} tokens "
                                f"(B={B}, T={T}, world={world}); use a smaller -b/-t")
        self.inputs = np.empty((B, T), dtype=np.int32)
        self.targets = np.empty((B, T), dtype=np.int32)
        self._in_flat, self._tgt_flat = self.inputs.reshape(-1), self.targets.reshape(-1)  # views
        self._validated: set[int] = set()
        self._loaded, self._tokens = -1, np.zeros(0, dtype=np.uint16)
        self.reset()

    @property
    def num_batches_per_epoch(self) -> int:
        """Batches in one pass over all shards (the same for every rank)."""
        return sum(self._num_samples)

    def reset(self) -> None:
        """Back to the first batch of epoch 0."""
        self._seek(0, 0, 0)

    def _seek(self, epoch: int, shard_pos: int, sample_pos: int) -> None:
        self._epoch, self._shard_pos, self._sample_pos = epoch, shard_pos, sample_pos
        self._order = self._shard_order(epoch)
        self._open_shard()

    def _shard_order(self, epoch: int) -> np.ndarray:
        n = len(self.files)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def _open_shard(self) -> None:
        k = int(self._order[self._shard_pos])
        if k != self._loaded:
            self._tokens = read_shard(self.files[k], None if k in self._validated else self.vocab_size)
            if len(self._tokens) != self._ntok[k]:
                raise UserError(f"{self.files[k]} changed while it was being read (now {len(self._tokens)} tokens)")
            self._validated.add(k)
            self._loaded = k
        self._perm = (np.random.default_rng([self.seed, self._epoch, k]).permutation(self._num_samples[k])
                      if self.shuffle else None)

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets), int32 (B, T): the loader's own buffers, overwritten by the next call."""
        if self._sample_pos >= self._num_samples[self._loaded]:
            self._shard_pos += 1
            if self._shard_pos == len(self.files):
                self._seek(self._epoch + 1, 0, 0)
            else:
                self._sample_pos = 0
                self._open_shard()
        i = self._sample_pos if self._perm is None else int(self._perm[self._sample_pos])
        BT = self.B * self.T
        start = i * BT * self.world + self.rank * BT
        window = self._tokens[start:start + BT + 1]
        np.copyto(self._in_flat, window[:-1])
        np.copyto(self._tgt_flat, window[1:])
        self._sample_pos += 1
        return self.inputs, self.targets

    def state(self) -> dict:
        """Position and settings, JSON-serialisable. The position is the same on every rank, so one rank's state
        can resume all of them."""
        return {"epoch": self._epoch, "shard_pos": self._shard_pos, "sample_pos": self._sample_pos,
                "B": self.B, "T": self.T, "world": self.world, "rank": self.rank, "shuffle": self.shuffle,
                "seed": self.seed, "files": [os.path.basename(f) for f in self.files]}

    def load_state(self, d: dict) -> None:
        """Continue exactly where the loader that saved `d` was. The shards may have moved folder; their names,
        B, T, world, shuffle (and seed when shuffling) must match."""
        try:
            epoch, shard_pos, sample_pos = int(d["epoch"]), int(d["shard_pos"]), int(d["sample_pos"])
            theirs = {k: d[k] for k in ("B", "T", "world", "shuffle", "seed", "files")}
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"data loader state is malformed ({e!r})")
        ours = self.state()
        keys = ["B", "T", "world", "shuffle"] + (["seed"] if self.shuffle else [])
        diff = [f"{k}={theirs[k]} (saved) vs {ours[k]} (now)" for k in keys if theirs[k] != ours[k]]
        if diff:
            raise UserError(f"cannot resume the data loader: {', '.join(diff)}")
        if list(theirs["files"]) != ours["files"]:
            raise UserError(f"cannot resume the data loader: it was saved over {len(theirs['files'])} shards "
                            f"{theirs['files'][:3]}..., but {self.pattern!r} matches {len(ours['files'])} shards "
                            f"{ours['files'][:3]}...")
        if epoch < 0 or not 0 <= shard_pos < len(self.files) or sample_pos < 0:
            raise UserError(f"data loader state has an impossible position: epoch {epoch}, shard {shard_pos}, "
                            f"sample {sample_pos}")
        k = int(self._shard_order(epoch)[shard_pos])
        if sample_pos > self._num_samples[k]:
            raise UserError(f"data loader state has sample {sample_pos} but shard {self.files[k]} has "
                            f"{self._num_samples[k]} batches")
        self._seek(epoch, shard_pos, sample_pos)
