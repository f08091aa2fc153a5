"""The parameter spec of a model family, and where the parameters (and their gradients, master copy, AdamW
moments) live in memory.

`ParamSpec`: one tensor of a family, everything the rest of the code derives from it: the layout below, the
initialization (`init_params`), AdamW's weight-decay mask, the llm.c file order (the spec's order) and the Hugging
Face names. A family lists its tensors once, in its `spec(cfg)`.

Layout: one flat buffer per role, laid out in buckets: a head bucket (the tensors that are not per layer), then one
bucket per layer with that layer's slice of every per-layer tensor. A bucket is the unit data parallelism reduces as
soon as backward has finished its layer, and the unit ZeRO shards: rank r of W owns the r-th 1/W of every bucket
(buckets are padded to a multiple of W * ALIGN so all slices are equal and aligned). Inside a bucket the tensors
without weight decay come first (in the head bucket, the decayed ones), so AdamW runs over few contiguous pieces.
Files are written by name, in spec order.

Views: `buf[name]` of a tensor that is not per layer is a plain array of its shape; a per-layer tensor's is an
(L, ...) view whose layer slices are contiguous (`buf[name][l]`), strided by the bucket size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import UserError

ALIGN = 64  # elements: every tensor starts 128/256-byte aligned (16-byte vector loads, cuBLASLt's fast paths)
INITS = ("normal", "uniform", "zeros", "ones")


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple[int, ...]         # the whole tensor; a per-layer tensor is stacked on axis 0: (L, ...)
    per_layer: bool = False
    decay: bool = False            # AdamW's decoupled weight decay applies
    init: str = "zeros"            # "normal" (N(0, std)), "uniform" (U(-std, std)), "zeros" or "ones"
    std: float = 0.0
    vocab_rows: int | None = None  # rows from here on pad the vocabulary: zero at init, left out of HF files
    hf: str | tuple[str, ...] | None = None  # Hugging Face key ("{l}": the layer index), or the keys of the HF
                                             # tensors that this one concatenates along its first axis
    hf_rows: tuple[int, ...] = ()  # with several keys: the rows each contributes
    hf_transposed: bool = False    # HF stores the transpose (GPT-2's Conv1D layers)
    fp8: bool = False              # a block product's weight (OC, K) per layer: its products run on FP8 operands
                                   # under --dtype fp8 (backends/fp8.py)

    def __post_init__(self):
        if self.init not in INITS:
            raise ValueError(f"{self.name}: unknown init {self.init!r}")
        if self.per_layer and len(self.shape) < 2:
            raise ValueError(f"{self.name}: a per-layer tensor needs the layer axis first")


def init_params(specs: list[ParamSpec], seed: int) -> dict[str, np.ndarray]:
    """Fresh fp32 host weights from the spec, drawn in spec order from one seeded generator (so every backend and
    every rank starts identical); padded vocabulary rows are zero."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in specs:
        if s.init == "ones":
            out[s.name] = np.ones(s.shape, np.float32)
        elif s.init == "zeros":
            out[s.name] = np.zeros(s.shape, np.float32)
        elif s.init == "uniform":
            out[s.name] = rng.uniform(-s.std, s.std, s.shape).astype(np.float32)
        else:
            out[s.name] = rng.standard_normal(s.shape, dtype=np.float32) * np.float32(s.std)
    for s in specs:
        if s.vocab_rows is not None:
            out[s.name][s.vocab_rows:] = 0.0
    return out


def _up(n: int, q: int) -> int:
    return -(-n // q) * q


class ParamLayout:
    def __init__(self, specs: list[ParamSpec], world: int = 1):
        self.world = world
        self.shapes = {s.name: tuple(s.shape) for s in specs}
        self.decayed = frozenset(s.name for s in specs if s.decay)
        head = [s.name for s in specs if not s.per_layer]
        layer_names = [s.name for s in specs if s.per_layer]
        depths = {self.shapes[n][0] for n in layer_names}
        if len(depths) > 1:
            raise ValueError(f"per-layer tensors disagree on the number of layers: {sorted(depths)}")
        self.L = depths.pop() if depths else 0
        q = ALIGN * world
        self.head_off, off = {}, 0
        for name in sorted(head, key=lambda n: n not in self.decayed):  # stable: spec order within each group
            self.head_off[name] = off
            off += _up(math.prod(self.shapes[name]), ALIGN)
        head_size = _up(off, q)
        self.layer_off, off = {}, 0
        for name in sorted(layer_names, key=lambda n: n in self.decayed):
            self.layer_off[name] = off
            off += _up(math.prod(self.shapes[name][1:]), ALIGN)
        self.bucket_size = _up(off, q)
        self.buckets = [(0, head_size)] + [(head_size + l * self.bucket_size, head_size + (l + 1) * self.bucket_size)
                                           for l in range(self.L)]
        self.size = head_size + self.L * self.bucket_size

    def offset(self, name: str, layer: int | None = None) -> int:
        if name in self.head_off:
            return self.head_off[name]
        return self.buckets[1 + layer][0] + self.layer_off[name]

    def pieces(self) -> list[tuple[str, int | None, int, int]]:
        """(name, layer or None, offset, size) of every contiguous tensor slice, in memory order."""
        out = [(n, None, o, math.prod(self.shapes[n])) for n, o in self.head_off.items()]
        for l in range(self.L):
            out += [(n, l, self.offset(n, l), math.prod(self.shapes[n][1:])) for n in self.layer_off]
        return sorted(out, key=lambda p: p[2])

    def runs(self) -> list[tuple[int, int, bool]]:
        """Contiguous (offset, size, decayed) runs covering every piece; neighbours with the same weight-decay
        setting merge (alignment gaps between them hold zeros and stay zero under AdamW)."""
        runs: list[list] = []
        for name, _, off, n in self.pieces():
            d = name in self.decayed
            if runs and runs[-1][2] == d and runs[-1][0] + runs[-1][1] <= off and \
                    not _crosses_bucket(self, runs[-1][0], off + n):
                runs[-1][1] = off + n - runs[-1][0]
            else:
                runs.append([off, n, d])
        return [tuple(r) for r in runs]

    def shard(self, rank: int) -> list[tuple[int, int, int]]:
        """This rank's slice of every bucket: (global offset, offset in the shard buffer, size)."""
        out, local = [], 0
        for b0, b1 in self.buckets:
            s = (b1 - b0) // self.world
            out.append((b0 + rank * s, local, s))
            local += s
        return out

    def to_flat(self, named: dict) -> np.ndarray:
        """Named host arrays (the spec's shapes) -> one fp32 host buffer in this layout (gaps zero)."""
        flat = np.zeros(self.size, np.float32)
        for name, layer, off, n in self.pieces():
            a = np.asarray(named[name], dtype=np.float32)
            if a.shape != self.shapes[name]:
                raise UserError(f"parameter {name} has shape {a.shape}, the model needs {self.shapes[name]}")
            flat[off:off + n] = (a if layer is None else a[layer]).reshape(-1)
        return flat

    def from_flat(self, flat) -> dict:
        """The inverse of to_flat: a host buffer in this layout -> named fp32 arrays."""
        flat = np.asarray(flat, dtype=np.float32)
        out = {n: np.empty(s, np.float32) for n, s in self.shapes.items()}
        for name, layer, off, n in self.pieces():
            (out[name] if layer is None else out[name][layer]).reshape(-1)[...] = flat[off:off + n]
        return out

    @property
    def shard_size(self) -> int:
        return self.size // self.world

    def shard_runs(self, rank: int) -> list[tuple[int, int, int, bool]]:
        """AdamW's work on one rank: (global offset, shard offset, size, decayed) for the parts of the runs that
        fall in the rank's slices (the whole buffer when world is 1)."""
        out = []
        for g0, l0, s in self.shard(rank):
            for off, n, d in self.runs():
                a, b = max(off, g0), min(off + n, g0 + s)
                if a < b:
                    out.append((a, l0 + a - g0, b - a, d))
        return out


def _crosses_bucket(layout: ParamLayout, start: int, end: int) -> bool:
    return not any(b0 <= start and end <= b1 for b0, b1 in layout.buckets)


class ParamBuffer:
    """A full flat buffer in `layout`, with a named view per parameter."""

    def __init__(self, backend, layout: ParamLayout, dtype):
        self.layout, self.be = layout, backend
        self.flat = backend.zeros(layout.size, dtype)
        self.shapes = layout.shapes
        self.views = {}
        as_strided = backend.xp.lib.stride_tricks.as_strided
        item = self.flat.dtype.itemsize
        for name, shape in layout.shapes.items():
            o = layout.offset(name, None if name in layout.head_off else 0)
            if name in layout.head_off:
                self.views[name] = self.flat[o:o + math.prod(shape)].reshape(shape)
            else:
                inner = shape[1:]
                strides = [item] * len(inner)
                for i in range(len(inner) - 2, -1, -1):
                    strides[i] = strides[i + 1] * inner[i + 1]
                self.views[name] = as_strided(self.flat[o:], shape=shape,
                                              strides=(layout.bucket_size * item, *strides))

    def __getitem__(self, name):
        return self.views[name]

    def bucket(self, b: int):
        b0, b1 = self.layout.buckets[b]
        return self.flat[b0:b1]

    def nbytes(self) -> int:
        return self.flat.nbytes


class ShardBuffer:
    """One rank's slices of every bucket, concatenated (ZeRO: master weights, moments, reduced gradients)."""

    def __init__(self, backend, layout: ParamLayout, dtype, rank: int):
        self.layout, self.rank = layout, rank
        self.flat = backend.zeros(layout.shard_size, dtype)

    def bucket(self, b: int):
        _, l0, s = self.layout.shard(self.rank)[b]
        return self.flat[l0:l0 + s]

    def nbytes(self) -> int:
        return self.flat.nbytes


class _LayerSlices:
    """`grads["qkvw"][l]` for rotating gradients: layer l's slice lives in bucket buffer l % 2."""

    def __init__(self, owner, name):
        self.owner, self.name = owner, name

    def __getitem__(self, l):
        o = self.owner
        start = o.head + (l % 2) * o.layout.bucket_size + o.layout.layer_off[self.name]
        shape = o.layout.shapes[self.name][1:]
        return o.flat[start:start + math.prod(shape)].reshape(shape)


class RotatingGrads:
    """ZeRO-2 gradients: the head bucket in full, the layers in two bucket buffers used in turn (layer l's
    gradients exist from its backward until its reduce-scatter into the rank's shard)."""

    def __init__(self, backend, layout: ParamLayout, dtype):
        self.layout = layout
        self.head = layout.buckets[0][1]
        self.flat = backend.zeros(self.head + 2 * layout.bucket_size, dtype)
        self.shapes = layout.shapes
        self.views = {}
        for name, shape in layout.shapes.items():
            if name in layout.head_off:
                o = layout.head_off[name]
                self.views[name] = self.flat[o:o + math.prod(shape)].reshape(shape)
            else:
                self.views[name] = _LayerSlices(self, name)

    def __getitem__(self, name):
        return self.views[name]

    def bucket(self, b: int):
        if b == 0:
            return self.flat[:self.head]
        s = self.layout.bucket_size
        start = self.head + ((b - 1) % 2) * s
        return self.flat[start:start + s]

    def nbytes(self) -> int:
        return self.flat.nbytes
