"""What every model family shares: its registry entry (`Family`), the config base, and the `Model` machinery —
flat buffers planned once (parameters, master weights, gradients, activations), the LM head and the loss in
chunks of rows (tied or untied head), initialization and parameter I/O from the family's spec, and decoding with
state one position at a time.

A family file (models/gpt2.py) subclasses `Model` and holds only its config, its spec, its activation plan
(`plan`, `op_shapes`), `forward`, `backward` and `new_decode_state`; it calls the backend's declared ops
(backends/ops.py) and nothing else.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import numpy as np

from ..errors import UserError
from .params import ALIGN, ParamBuffer, ParamLayout, ParamSpec, RotatingGrads, ShardBuffer, init_params


@dataclass(frozen=True)
class Family:
    """A model family as the registry (llmpy/config.py) knows it."""
    name: str                                   # recorded in checkpoints: "gpt2"
    title: str                                  # for people: "GPT-2"
    config: type                                # its ModelConfig subclass
    model: type                                 # its Model subclass
    spec: Callable[..., list[ParamSpec]]        # spec(cfg): the parameter list
    parse: Callable[[str, str], object]         # (prefix, name) of "prefix:name" -> config; the prefix tells
                                                # versions apart (llama3.1:8b vs llama3:8b)
    names: str                                  # the config names `parse` takes, for help and errors


MAX_SIZE = 2**31 - 1  # the largest size of a config (context, vocabulary, width, layers, heads): kernels index int32


class ModelConfig:
    """Base of every family's config, a frozen dataclass whose fields all have defaults and include max_seq_len
    (maxT: the longest sequence), vocab_size (V: real tokens) and padded_vocab_size (Vp: embedding rows, a
    multiple of 128; the padding never gets probability). `family` names its registry entry."""
    family: ClassVar[str] = ""

    def flops_per_token(self, T: int) -> int:
        """Training FLOPs per token at sequence length T (forward + backward), for MFU; each family states its
        convention."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line for people: the family and its sizes."""
        raise NotImplementedError

    def check_fields(self) -> None:
        """Each field has its default's type: an int (not a bool) in 1..MAX_SIZE, a finite float (an int will do),
        a bool. Every family's __post_init__ starts with it: a config from a name, a checkpoint or a config.json
        holds no size past what an int32 indexes and no NaN/Inf that would be written back into a file."""
        for f in dataclasses.fields(self):
            v, kind = getattr(self, f.name), type(f.default)
            number = isinstance(v, (int, float)) and not isinstance(v, bool)
            if kind is bool and not isinstance(v, bool) or kind in (int, float) and not number:
                want = "a number" if kind is float else kind.__name__
                raise UserError(f"model config: {f.name} is {v!r}, not {want}")
            if kind is int and not isinstance(v, int):
                raise UserError(f"model config: {f.name} is {v!r}, not an integer")
            if kind is int and v < 1:
                raise UserError(f"model config has a non-positive size: {f.name} = {v}")
            if kind is int and v > MAX_SIZE:
                raise UserError(f"model config: {f.name} = {v} is larger than any model llmpy can hold "
                                f"(at most {MAX_SIZE:,})")
            if kind is float and not math.isfinite(v):
                raise UserError(f"model config: {f.name} is {v}, not a finite number")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        """From to_dict's output (checkpoint metadata): every field, of its type (check_fields); ints stand for
        floats."""
        if not isinstance(d, dict):
            raise UserError(f"model config is {type(d).__name__}, not a JSON object")
        fields = dataclasses.fields(cls)
        missing = [f.name for f in fields if f.name not in d]
        if missing:
            raise UserError(f"model config is missing {', '.join(missing)}")

        def value(f):
            v = d[f.name]
            return float(v) if type(f.default) is float and type(v) is int else v
        try:
            return cls(**{f.name: value(f) for f in fields})
        except (TypeError, ValueError, OverflowError) as e:
            raise UserError(f"bad model config {d}: {e}") from None


def inference_model(cfg, params: dict, backend, B: int, T: int):
    """cfg's family model for inference on (B, T) holding `params` (packed when they hold ternary codes)."""
    from ..config import family_of
    packed = any(hasattr(v, "codes") for v in params.values())
    model = family_of(cfg).model(cfg, backend, B, T, training=False, packed=packed)
    model.load_params(params)
    return model


def _bf16():
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)


def pad_vocab(v: int, multiple: int = 128) -> int:
    return ((v + multiple - 1) // multiple) * multiple


class FlatBuffer:
    """One contiguous allocation with named views (the activations): what makes a step allocation-free and a
    CUDA graph possible. Tensors start at multiples of ALIGN elements (the gaps stay zero)."""

    def __init__(self, backend, entries, dtype):
        self.shapes = dict(entries)
        self.offsets, n = {}, 0
        for name, shape in entries:
            self.offsets[name] = n
            n += -(-math.prod(shape) // ALIGN) * ALIGN
        self.size = n
        self.flat = backend.zeros(n, dtype)
        self.views = {name: self.view(name) for name, _ in entries}

    def view(self, name):
        o, shape = self.offsets[name], self.shapes[name]
        return self.flat[o:o + math.prod(shape)].reshape(shape)

    def __getitem__(self, name):
        return self.views[name]

    def __contains__(self, name) -> bool:
        return name in self.shapes

    def nbytes(self) -> int:
        return self.size * self.flat.dtype.itemsize


class Model:
    """A family's model on a backend, planned for micro-batches of (B, T) tokens.

    training: gradients and the backward's activations exist. recompute: a level the family defines (0 keeps
    every activation); recompute_keep: the first that many layers keep theirs anyway (as at level 0: more memory,
    fewer recomputations; rc_rows / rc_slot / rc_redo below). master_weights: keep fp32 master weights when the
    compute copy is lower precision (else AdamW updates the compute weights with stochastic rounding).
    logits_chunk: rows of logits formed at a time. rank/world/zero: data parallelism; zero >= 1 keeps only this rank's shard of the master weights, zero 2 also
    keeps the layers' gradients in two rotating bucket buffers (models/params.py)."""

    HEAD_WEIGHT: ClassVar[str] = ""            # the LM head's weight: the embedding's name when tied
    RECOMPUTE: ClassVar[tuple[int, ...]] = (0,)
    TERNARY: ClassVar[tuple[str, ...]] = ()    # weights a packed model holds as ternary codes (formats/ternary.py)
    GRAPH_DECODE: ClassVar[bool] = False       # a decode step is the same launches at every position (no position
                                               # argument, state updated in place): replayed as one CUDA graph

    def __init__(self, cfg, backend, B: int, T: int, *, training: bool = True, recompute: int = 0,
                 recompute_keep: int = 0, master_weights: bool = True, logits_chunk: int = 8192, rank: int = 0,
                 world: int = 1, zero: int = 0, packed: bool = False, weights_of: "Model | None" = None):
        if T > cfg.max_seq_len:
            raise UserError(f"sequence length {T} exceeds the model's maximum {cfg.max_seq_len}")
        if B < 1 or T < 1:
            raise UserError(f"batch size and sequence length must be positive (got B={B}, T={T})")
        if recompute not in self.RECOMPUTE:
            raise UserError(f"--recompute must be one of {', '.join(map(str, self.RECOMPUTE))} (got {recompute})")
        if recompute_keep < 0 or (recompute_keep and not recompute):
            raise UserError(f"--recompute-keep must be >= 0 and needs --recompute 1 or 2 (got {recompute_keep} with "
                            f"--recompute {recompute})")
        if zero not in (0, 1, 2):
            raise UserError(f"--zero must be 0, 1 or 2 (got {zero})")
        from ..config import family_of
        if packed and (training or not self.TERNARY):
            raise UserError("a packed ternary model is for inference only (sample, eval): train from the latent "
                            "weights it was packed from" if self.TERNARY else
                            f"the {family_of(cfg).title} has no packed ternary form")
        self.cfg, self.be, self.B, self.T = cfg, backend, B, T
        self.training, self.recompute, self.keep = training, recompute, recompute_keep
        self.chunk = min(B * T, max(1, logits_chunk))
        self.rank, self.world, self.zero = rank, world, zero
        # packed: the TERNARY weights live as codes + scales (self.packed, filled by load_params), not as params,
        # and the token embedding in bf16 as the packed file stores it (self.bf16; the GPU's parameter dtype)
        spec = family_of(cfg).spec(cfg)
        self.is_packed = packed
        bf16 = [s for s in spec if packed and s.vocab_rows is not None and s.name not in self.TERNARY]
        self.specs = [s for s in spec if not (packed and s.name in self.TERNARY) and s not in bf16]
        self.layout = ParamLayout(self.specs, world)
        if weights_of is not None:  # another inference model's weights, shared (a decoder's prefill model)
            if training or weights_of.cfg != cfg or weights_of.is_packed != packed or weights_of.be is not backend:
                raise ValueError("weights_of: an inference model of the same config, packing and backend")
            self.params, self.packed, self.bf16 = weights_of.params, weights_of.packed, weights_of.bf16
        else:
            self.params = ParamBuffer(backend, self.layout, backend.param_dtype)
            self.packed: dict[str, tuple] = {}
            self.bf16 = {s.name: backend.zeros(math.prod(s.shape), _bf16()).reshape(s.shape) for s in bf16}
        # fp32 master weights when the compute copy is lower precision (AdamW updates these); ZeRO shards them
        self.master = None
        if training and master_weights and np.dtype(backend.param_dtype) != np.float32:
            self.master = (ShardBuffer(backend, self.layout, np.float32, rank) if zero >= 1
                           else ParamBuffer(backend, self.layout, np.float32))
        self.grads = None
        if training:
            self.grads = (RotatingGrads(backend, self.layout, backend.param_dtype) if zero == 2
                          else ParamBuffer(backend, self.layout, backend.param_dtype))
        # Vl: V on the CPU; the GPU computes all Vp columns and ignores the pad
        self.Vl = backend.logit_columns(cfg.vocab_size, cfg.padded_vocab_size)
        # --dtype fp8 on a GPU: the block products keep FP8 copies of their inputs for their backward and the norms
        # and activations write only those copies, so their outputs share one slot and are never recomputed
        self.fp8_kept = bool(training and getattr(backend, "fp8_enabled", False)
                             and getattr(backend, "fp8_fused", False))
        acts, grads, stats = self.plan()
        acts = acts + [("logits", (self.chunk, self.Vl))]  # one chunk of rows; becomes dlogits in place
        self.acts = FlatBuffer(backend, acts + (grads if training else []), backend.act_dtype)
        self.stats = FlatBuffer(backend, stats + [("losses", (B, T))], backend.stat_dtype)
        self.workspace_bytes = backend.plan_workspace(self.op_shapes())
        # --dtype fp8: the block products (spec tensors marked fp8, one per layer), and the LM head (a chunk of rows
        # at a time) where the backend's fp8_head is on, run on FP8 operands; their scale state and FP8 weight
        # copies are planned here, once
        self.fp8_products, self.fp8_bytes, self.fp8_head_weight = 0, 0, None  # (the head's weight where registered)
        if training and getattr(backend, "fp8_enabled", False):
            names = [s.name for s in self.specs if s.fp8]
            if not names:
                raise UserError(f"--dtype fp8: the {family_of(cfg).title} has no FP8 path (GPT-2 and Llama 3 have "
                                "one); use --dtype bf16")
            weights = [self.params[n][l] for l in range(cfg.num_layers) for n in names]
            self.fp8_head_weight = self.params[self.HEAD_WEIGHT][:self.Vl] if backend.fp8_head else None
            self.fp8_bytes = backend.fp8_register(weights, B * T, head=self.fp8_head_weight, head_rows=self.chunk)
            self.fp8_products = len(weights) + (self.fp8_head_weight is not None)
        self.tokens = backend.zeros(B * T, np.int32).reshape(B, T)
        self.targets = backend.zeros(B * T, np.int32).reshape(B, T)
        self.loss_acc = backend.zeros(1, backend.acc_dtype)  # sum over a step's micro-batches (device side)
        self.has_targets = False
        self._prefill = None  # decoding: the model that feeds a window in one forward (prefill_model)

    # ---- what a family provides -----------------------------------------------------------------------------
    def plan(self) -> tuple[list, list, list]:
        """(activations, their gradients' scratch, statistics): lists of (name, shape) for the flat buffers (the
        logits chunk and the per-token losses are added here)."""
        raise NotImplementedError

    def op_shapes(self):
        """backends.ops.OpShapes: the sizes this model runs the backend's ops at."""
        raise NotImplementedError

    def forward(self, tokens=None, targets=None, grad_scale: float | None = None, *, return_loss: bool = True,
                state=None) -> float | None:
        """The loss with targets, else the logits (lm_head). state: decoding (no training, B = 1 for T > 1); with
        T = 1 one new token at position state.pos, with T > 1 a prefill: the first state.span tokens from position 0
        into a fresh state (the rest of the T planned are padding), the logits of the last of them only."""
        raise NotImplementedError

    def backward(self, hooks=None) -> None:
        raise NotImplementedError

    def new_decode_state(self, length: int):
        """The state decoding carries from one position to the next (a KV cache, a recurrent state), for sequences
        of up to `length` tokens (<= max_seq_len; its `capacity`: a cache's positions, unbounded for a state that
        does not grow)."""
        raise NotImplementedError

    # ---- memory plan ----------------------------------------------------------------------------------------
    def memory_plan(self) -> dict[str, int]:
        """Bytes per category on this rank (printed at start; the step allocates nothing beyond these)."""
        plan = {"parameters": self.params.nbytes() + sum(int(e.nbytes) for e in self.bf16.values())}
        if self.packed:
            plan["packed ternary weights"] = sum(int(c.nbytes) + s.nbytes for c, s, _, _ in self.packed.values())
        if self.master is not None:
            plan["master weights"] = self.master.nbytes()
        if self.grads is not None:
            plan["gradients"] = self.grads.nbytes()
        plan["activations"] = self.acts.nbytes() + self.stats.nbytes()
        plan["workspace"] = self.workspace_bytes
        if self.fp8_bytes:
            plan["fp8 weights and scratch"] = self.fp8_bytes
        return plan

    def saved(self, name: str):
        """A planned tensor from the activation or the statistics buffer (some backends keep the attention state
        in one, some in the other)."""
        return self.acts[name] if name in self.acts else self.stats[name]

    # ---- parameters -----------------------------------------------------------------------------------------
    def init_weights(self, seed: int) -> None:
        """The family's init rule from its spec, drawn on the host from `seed` so every backend starts identical."""
        self.load_params(init_params(self.specs, seed))

    def load_params(self, params: dict[str, np.ndarray]) -> None:
        """fp32 host weights -> the compute copy (rounded to nearest) and the master copy or this rank's shard; a
        packed model takes its TERNARY weights as formats.ternary.PackedTernary (codes and scales uploaded as
        they are) and its embedding rounded to bf16 (exact for a packed file's)."""
        be = self.be
        self._decode_graph = None  # a recorded decode step may point at buffers replaced here
        if self.is_packed:
            missing = [k for k in self.TERNARY if not hasattr(params.get(k), "codes")]
            if missing:
                raise UserError(f"a packed model needs packed ternary weights; {', '.join(missing)} are not")
            # in place: a prefill model sharing these weights sees the new ones
            self.packed.clear()
            self.packed.update({k: (be.asarray(params[k].codes), np.atleast_1d(params[k].scale).astype(np.float32),
                                    params[k].K, params[k].packing) for k in self.TERNARY})
            from ..formats.bf16 import fp32_to_bf16_bits
            for k, dst in self.bf16.items():
                src = np.ascontiguousarray(params[k], np.float32) if k in params else None
                if src is None or src.shape != dst.shape:
                    raise UserError(f"a packed model's {k} is {'missing' if src is None else src.shape}, want "
                                    f"{dst.shape}")
                be.upload(dst, fp32_to_bf16_bits(src).view(dst.dtype))
            params = {k: v for k, v in params.items() if k not in self.TERNARY and k not in self.bf16}
        host = self.layout.to_flat(params)  # the weights in our layout, fp32
        # uploaded a piece at a time: a whole fp32 copy on the device (6.2 GB for GPT-2 d48) would stay in the
        # memory pool's cache after the load, counted in the process's peak memory for the rest of the run
        piece, dev = 1 << 26, None
        for i in range(0, host.size, piece):
            dev = be.asarray(host[i:i + piece], np.float32)
            be.load_f32(self.params.flat[i:i + piece], dev)
            if isinstance(self.master, ParamBuffer):
                be.copy_(self.master.flat[i:i + piece], dev)
            elif self.master is not None:  # this rank's slices that fall in the piece
                for g0, l0, s in self.layout.shard(self.rank):
                    a, b = max(g0, i), min(g0 + s, i + dev.size)
                    if a < b:
                        be.copy_(self.master.flat[l0 + a - g0:l0 + b - g0], dev[a - i:b - i])
        dev = None
        be.release_cache()  # the pieces too: they stayed cached when nothing else happened to free them

    def params_numpy(self, comm=None) -> dict[str, np.ndarray]:
        """The weights as fp32 host arrays (from the master copy when there is one; a sharded master is gathered
        over `comm`, which every rank must then call)."""
        be = self.be
        if isinstance(self.master, ShardBuffer):
            # one bucket at a time through a device buffer of the largest bucket, so that a checkpoint costs
            # ~1 bucket of extra GPU memory rather than the whole fp32 model (5.8 GiB for GPT-2 d48)
            flat = np.empty(self.layout.size, np.float32)
            buf = be.zeros(max(b1 - b0 for b0, b1 in self.layout.buckets), np.float32)
            for (b0, b1), (_, l0, s) in zip(self.layout.buckets, self.layout.shard(self.rank)):
                mine = buf[self.rank * s:(self.rank + 1) * s]
                be.copy_(mine, self.master.flat[l0:l0 + s])
                comm.all_gather(mine, buf[:b1 - b0])
                flat[b0:b1] = be.to_numpy(buf[:b1 - b0])
            return self.layout.from_flat(flat)
        src = self.master if self.master is not None else self.params
        return self.layout.from_flat(be.to_numpy(src.flat))

    # ---- recomputation: which layers keep an activation that recompute level `level` would redo ------------------
    def _kept(self) -> int:
        # keeping all layers but one costs the same slots as keeping all: then none recomputes
        L = self.cfg.num_layers
        return self.keep if self.keep < L - 1 else L

    def rc_rows(self, level: int) -> int:
        """Layer slots of such an activation's buffer: one per layer when kept, else the kept layers' plus one
        that every recomputing layer shares."""
        L, k = self.cfg.num_layers, self._kept()
        return L if self.recompute < level or k >= L else k + 1

    def rc_slot(self, level: int, l: int) -> int:
        """Layer l's slot in that buffer."""
        return l if self.recompute < level or l < self._kept() else self._kept()

    def rc_redo(self, level: int, l: int) -> bool:
        """Whether layer l's backward recomputes it."""
        return self.recompute >= level and l >= self._kept()

    def fp8_rows(self, level: int) -> int:
        """rc_rows for an input of the block products only (a norm's or activation's output): one slot every layer
        shares where the products keep its FP8 copies (fp8_kept)."""
        return 1 if self.fp8_kept else self.rc_rows(level)

    def fp8_slot(self, level: int, l: int) -> int:
        """rc_slot for such an input."""
        return 0 if self.fp8_kept else self.rc_slot(level, l)

    def fp8_redo(self, level: int, l: int) -> bool:
        """rc_redo for such an input: never where the products keep its FP8 copies."""
        return not self.fp8_kept and self.rc_redo(level, l)

    def zero_grad(self) -> None:
        self.be.fill_zero(self.grads.flat)

    def set_batch(self, tokens, targets=None) -> None:
        """Copies host (B, T) token ids (and targets) into the model's device buffers."""
        self.be.set_tokens(self.tokens, tokens, training=self.training)
        if targets is not None:
            self.be.set_tokens(self.targets, targets, training=False)
        self.has_targets = targets is not None

    # ---- LM head and loss -----------------------------------------------------------------------------------
    def lm_head(self, x, dx, grad_scale: float | None, return_loss: bool, state=None) -> float | None:
        """logits = x (B, T, C) @ W[:Vl].T, W = params[HEAD_WEIGHT] (the embedding when tied), a chunk of rows at
        a time. With targets: the per-token losses (stats "losses"); with grad_scale (= d total loss / d each
        token's loss) each chunk's backward runs at once (dx rows =, W's gradient +=), so only one chunk of logits
        is ever held; returns the mean loss (None when not read back). Without targets: the logits of all rows
        (which must fit one chunk) are left in acts["logits"] and None is returned; a decoding prefill (state, T >
        1) forms only those of the last position it feeds (row 0 of acts["logits"])."""
        be, a, s = self.be, self.acts, self.stats
        N, C, R = self.B * self.T, x.shape[-1], self.chunk
        xf = x.reshape(N, C)
        if not self.has_targets:
            rows = slice(0, N) if state is None or self.T == 1 else slice(state.span - 1, state.span)
            n = rows.stop - rows.start
            if n > R:
                raise UserError(f"logits of {n} rows need logits_chunk >= {n} (it is {R})")
            self.head_forward(a["logits"][:n], xf[rows], rows)
            return None
        losses, targets = s["losses"].reshape(N), self.targets.reshape(N)
        for r0 in range(0, N, R):
            r1 = min(N, r0 + R)
            logits = a["logits"][:r1 - r0]
            self.head_forward(logits, xf[r0:r1], slice(r0, r1))
            be.fused_classifier(losses[r0:r1], logits, targets[r0:r1], self.cfg.vocab_size, grad_scale,
                                fp8_next=self.fp8_head_weight)
            if grad_scale is not None:
                self.head_backward(dx.reshape(N, C)[r0:r1], logits, xf[r0:r1], slice(r0, r1))
        return be.mean_loss(s["losses"]) if return_loss and not be.capturing else None

    def head_forward(self, logits, x, rows: slice) -> None:
        """logits (n, Vl) = the head applied to x (n, C), the rows `rows` of the batch (a plain product here; a
        family with another head overrides this and head_backward)."""
        self.be.matmul_forward(logits, x, self.params[self.HEAD_WEIGHT][:self.Vl], None)

    def head_backward(self, dx, dlogits, x, rows: slice) -> None:
        """dx (n, C) = the head's input gradient (overwritten), the head weight's gradient +=, given dlogits."""
        w = self.HEAD_WEIGHT
        self.be.matmul_backward(dx, self.grads[w][:self.Vl], None, dlogits, x, self.params[w][:self.Vl])

    # ---- decoding -------------------------------------------------------------------------------------------
    def decode_step(self, tokens, state, *, prefill_len: int | None = None) -> np.ndarray:
        """Feeds tokens (B, n) at positions state.pos.. (the model is planned for (B, 1) and no training) and
        returns the fp32 logits (B, V) that follow the last. Several tokens into a fresh state (pos 0, B = 1) are a
        prefill: one forward of prefill_model(prefill_len or n), the tokens padded after to its length (so that
        windows of different lengths share one plan); else one position at a time."""
        toks = np.asarray(tokens, dtype=np.int32).reshape(self.B, -1)
        n = toks.shape[1]
        if self.training or self.T != 1:
            raise ValueError("decode_step needs a model made with T=1 and training=False")
        if n == 0:
            raise UserError("nothing to decode: the prompt is empty")
        if state.pos + n > state.capacity:
            raise UserError(f"the sequence would reach {state.pos + n} tokens, past the "
                            f"{state.capacity} this decoding state holds (the model's context is "
                            f"{self.cfg.max_seq_len}): use a shorter prompt or fewer new tokens")
        V = self.cfg.vocab_size
        if n > 1 and state.pos == 0 and self.B == 1:
            model = self.prefill_model(max(n, prefill_len or n))
            padded = np.zeros((1, model.T), np.int32)
            padded[:, :n] = toks
            state.span = n
            try:
                model.forward(padded, state=state)
            finally:
                state.span = 1
            state.pos = n
            logits = model.acts["logits"][:1, :V]
        else:
            for t in range(n):
                if self.GRAPH_DECODE:
                    self._decode_replay(np.ascontiguousarray(toks[:, t:t + 1]), state)
                else:
                    self.forward(np.ascontiguousarray(toks[:, t:t + 1]), state=state)
                state.pos += 1
            logits = self.acts["logits"][:self.B, :V]
        return np.array(self.be.to_numpy(logits), np.float32)  # a copy: the next step overwrites the buffer

    def prefill_model(self, T: int) -> "Model":
        """The model (B = 1, T, no training) that feeds a decoding window in one forward, sharing this model's
        weights; planned on first use and again when another T is asked for (its logits: one row)."""
        if self._prefill is None or self._prefill.T != T:
            from ..config import family_of
            self._prefill = None  # its memory goes before the new plan takes its own
            self._prefill = family_of(self.cfg).model(self.cfg, self.be, 1, T, training=False,
                                                      packed=self.is_packed, logits_chunk=1, weights_of=self)
        return self._prefill

    def _decode_replay(self, tokens, state) -> None:
        """One decode step as a CUDA graph of the whole forward, recorded for `state` on its first step (which runs
        eagerly, sizing every scratch buffer); later steps upload the token and replay it."""
        self.set_batch(tokens)
        cached = getattr(self, "_decode_graph", None)
        if cached is not None and cached[0] is state:
            cached[1]()
            return
        self.forward(state=state)
        self._decode_graph = (state, self.be.capture(lambda: self.forward(state=state)))
