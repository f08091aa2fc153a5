"""GPT-2: memory plan, forward and backward, written once over a backend's layer ops.

Read top to bottom: `_plan_activations` lists every saved tensor; `forward` and `backward` are straight-line
walks over the layers (llm.c's structure, with the residual add fused into the following LayerNorm).
"""
from __future__ import annotations

import math

import numpy as np

from ..config import GPT2Config, param_shapes, RESIDUAL_PROJ
from ..errors import UserError
from .params import ALIGN, ParamBuffer, ParamLayout, RotatingGrads, ShardBuffer


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

    def nbytes(self) -> int:
        return self.size * self.flat.dtype.itemsize


class GPT2:
    def __init__(self, cfg: GPT2Config, backend, B: int, T: int, *, training: bool = True, recompute: int = 0,
                 master_weights: bool = True, logits_chunk: int = 8192, rank: int = 0, world: int = 1,
                 zero: int = 0):
        """recompute: 0 keeps every activation; 1 recomputes the GELU output in backward; 2 also the two
        LayerNorm outputs of each block (from the saved mean/rstd): less memory for more compute.
        master_weights: keep fp32 master weights when the compute copy is lower precision (else AdamW updates
        the bf16 weights directly, with stochastic rounding). logits_chunk: rows of logits formed at a time.
        rank/world/zero: data parallelism; zero >= 1 keeps only this rank's shard of the master weights, zero 2
        also keeps the layers' gradients in two rotating bucket buffers (see models/params.py)."""
        if T > cfg.max_seq_len:
            raise UserError(f"sequence length {T} exceeds the model's maximum {cfg.max_seq_len}")
        if B < 1 or T < 1:
            raise UserError(f"batch size and sequence length must be positive (got B={B}, T={T})")
        if recompute not in (0, 1, 2):
            raise UserError(f"--recompute must be 0, 1 or 2 (got {recompute})")
        self.cfg, self.be, self.B, self.T = cfg, backend, B, T
        self.training, self.recompute = training, recompute
        self.chunk = min(B * T, max(1, logits_chunk))
        if zero not in (0, 1, 2):
            raise UserError(f"--zero must be 0, 1 or 2 (got {zero})")
        self.rank, self.world, self.zero = rank, world, zero
        self.layout = ParamLayout(cfg, world)
        self.params = ParamBuffer(backend, self.layout, backend.param_dtype)
        # fp32 master weights when the compute copy is lower precision (AdamW updates these); ZeRO shards them
        self.master = None
        if training and master_weights and np.dtype(backend.param_dtype) != np.float32:
            self.master = (ShardBuffer(backend, self.layout, np.float32, rank) if zero >= 1
                           else ParamBuffer(backend, self.layout, np.float32))
        self.grads = None
        if training:
            self.grads = (RotatingGrads(backend, self.layout, backend.param_dtype) if zero == 2
                          else ParamBuffer(backend, self.layout, backend.param_dtype))
        self._plan_activations()
        self.workspace_bytes = backend.plan_workspace(cfg, B, T)
        self.tokens = backend.zeros(B * T, np.int32).reshape(B, T)
        self.targets = backend.zeros(B * T, np.int32).reshape(B, T)
        self.loss_acc = backend.zeros(1, backend.acc_dtype)  # sum over a step's micro-batches (device side)
        self.has_targets = False

    # ---- memory plan ----------------------------------------------------------------------------------------
    def _plan_activations(self):
        cfg, be, B, T = self.cfg, self.be, self.B, self.T
        L, C, NH = cfg.num_layers, cfg.channels, cfg.num_heads
        self.Vl = be.logit_columns(cfg)  # V on the CPU; the GPU computes all Vp columns and ignores the pad
        att_shape, att_kind = be.attention_state(B, T, NH, cfg.head_size)
        # recomputed activations live in one (B, T, .) buffer shared by all layers instead of one per layer
        Lg = 1 if self.recompute >= 1 else L
        Lln = 1 if self.recompute >= 2 else L
        acts = [
            ("encoded", (B, T, C)),
            ("ln1", (Lln, B, T, C)), ("qkv", (L, B, T, 3 * C)), ("atty", (L, B, T, C)),
            ("residual2", (L, B, T, C)), ("ln2", (Lln, B, T, C)),
            ("fch", (L, B, T, 4 * C)), ("fch_gelu", (Lg, B, T, 4 * C)),
            ("residual3", (L, B, T, C)), ("lnf", (B, T, C)),
            ("proj", (B, T, C)),                     # attproj / fcproj outputs: consumed at once, reused
            ("logits", (self.chunk, self.Vl)),       # one chunk of rows; becomes dlogits in place
        ]
        stats = [(n, (L, B, T)) for n in ("ln1_mean", "ln1_rstd", "ln2_mean", "ln2_rstd")]
        stats += [("lnf_mean", (B, T)), ("lnf_rstd", (B, T)), ("losses", (B, T))]
        (acts if att_kind == "act" else stats).append(("att", (L,) + tuple(att_shape)))
        grads = [("dresidual", (B, T, C)), ("dbtc", (B, T, C)), ("dbt4c", (B, T, 4 * C)),
                 ("dqkv", (B, T, 3 * C))] if self.training else []
        self.acts = FlatBuffer(be, acts + grads, be.act_dtype)
        self.stats = FlatBuffer(be, stats, be.stat_dtype)

    def _ln1(self, l):
        return self.acts["ln1"][0 if self.recompute >= 2 else l]

    def _ln2(self, l):
        return self.acts["ln2"][0 if self.recompute >= 2 else l]

    def _fch_gelu(self, l):
        return self.acts["fch_gelu"][0 if self.recompute >= 1 else l]

    def memory_plan(self) -> dict[str, int]:
        """Bytes per category on this rank (printed at start; the step allocates nothing beyond these)."""
        plan = {"parameters": self.params.nbytes()}
        if self.master is not None:
            plan["master weights"] = self.master.nbytes()
        if self.grads is not None:
            plan["gradients"] = self.grads.nbytes()
        plan["activations"] = self.acts.nbytes() + self.stats.nbytes()
        plan["workspace"] = self.workspace_bytes
        return plan

    # ---- parameters -----------------------------------------------------------------------------------------
    def init_weights(self, seed: int) -> None:
        """GPT-2 init: N(0, 0.02) matrices, residual projections N(0, 0.02/sqrt(2L)), zero biases, unit LN gains;
        the padded vocabulary rows stay zero. Drawn on the host from `seed` so every backend starts identical."""
        rng = np.random.default_rng(seed)
        out = {}
        for name, shape in param_shapes(self.cfg):
            if name.startswith("ln") and name.endswith("w"):
                out[name] = np.ones(shape, np.float32)
            elif len(shape) == 1 or name.endswith("b"):
                out[name] = np.zeros(shape, np.float32)
            else:
                std = 0.02 / math.sqrt(2 * self.cfg.num_layers) if name in RESIDUAL_PROJ else 0.02
                out[name] = (rng.standard_normal(shape, dtype=np.float32) * np.float32(std))
        out["wte"][self.cfg.vocab_size:] = 0.0
        self.load_params(out)

    def load_params(self, params: dict[str, np.ndarray]) -> None:
        """fp32 host weights -> the compute copy (rounded to nearest) and the master copy or this rank's shard."""
        be = self.be
        dev = be.asarray(self.layout.to_flat(params), np.float32)  # the weights in our layout, one upload
        be.load_f32(self.params.flat, dev)
        if isinstance(self.master, ParamBuffer):
            be.copy_(self.master.flat, dev)
        elif self.master is not None:
            for g0, l0, s in self.layout.shard(self.rank):
                be.copy_(self.master.flat[l0:l0 + s], dev[g0:g0 + s])

    def params_numpy(self, comm=None) -> dict[str, np.ndarray]:
        """The weights as fp32 host arrays (from the master copy when there is one; a sharded master is gathered
        over `comm`, which every rank must then call)."""
        be = self.be
        if isinstance(self.master, ShardBuffer):
            # one bucket at a time through a device buffer of the largest bucket, so that a checkpoint costs
            # ~1 bucket of extra GPU memory rather than the whole fp32 model (5.8 GiB for d48)
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

    def zero_grad(self) -> None:
        self.be.fill_zero(self.grads.flat)

    def set_batch(self, tokens, targets=None) -> None:
        """Copies host (B, T) token ids (and targets) into the model's device buffers."""
        self.be.set_tokens(self.tokens, tokens, training=self.training)
        if targets is not None:
            self.be.set_tokens(self.targets, targets, training=False)
        self.has_targets = targets is not None

    # ---- forward --------------------------------------------------------------------------------------------
    def forward(self, tokens=None, targets=None, grad_scale: float | None = None, *,
                return_loss: bool = True) -> float | None:
        """Runs the model on (B, T) token ids: host arrays given here are copied in first (else the buffers
        `set_batch` filled are used). With targets, the per-token losses are computed and their mean returned
        (None while a CUDA graph is being captured: nothing runs then); with grad_scale (= d total loss / d
        each token's loss, e.g. 1/(B*T*grad_accum)) the classifier also leaves dlogits in place for backward.
        Without targets only the logits are computed (in the `logits` activation) and None is returned.
        return_loss=False skips reading the loss back (on a GPU that read waits for the device)."""
        be, cfg, a, s, p = self.be, self.cfg, self.acts, self.stats, self.params
        L, NH = cfg.num_layers, cfg.num_heads
        if tokens is not None:
            self.set_batch(tokens, targets)
        be.encoder_forward(a["encoded"], self.tokens, p["wte"], p["wpe"])
        be.layernorm_forward(self._ln1(0), s["ln1_mean"][0], s["ln1_rstd"][0], a["encoded"], p["ln1w"][0],
                             p["ln1b"][0])
        for l in range(L):
            residual = a["encoded"] if l == 0 else a["residual3"][l - 1]
            be.matmul_forward(a["qkv"][l], self._ln1(l), p["qkvw"][l], p["qkvb"][l])
            be.attention_forward(a["atty"][l], s_or_a(self, "att")[l], a["qkv"][l], NH)
            be.matmul_forward(a["proj"], a["atty"][l], p["attprojw"][l], p["attprojb"][l])
            be.fused_residual_layernorm_forward(a["residual2"][l], self._ln2(l), s["ln2_mean"][l],
                                                s["ln2_rstd"][l], residual, a["proj"], p["ln2w"][l], p["ln2b"][l])
            be.matmul_forward(self._fch_gelu(l), self._ln2(l), p["fcw"][l], p["fcb"][l], gelu_pre=a["fch"][l])
            be.matmul_forward(a["proj"], self._fch_gelu(l), p["fcprojw"][l], p["fcprojb"][l])
            if l + 1 < L:  # this block's residual add, fused with the next block's first LayerNorm
                be.fused_residual_layernorm_forward(a["residual3"][l], self._ln1(l + 1), s["ln1_mean"][l + 1],
                                                    s["ln1_rstd"][l + 1], a["residual2"][l], a["proj"],
                                                    p["ln1w"][l + 1], p["ln1b"][l + 1])
            else:
                be.fused_residual_layernorm_forward(a["residual3"][l], a["lnf"], s["lnf_mean"], s["lnf_rstd"],
                                                    a["residual2"][l], a["proj"], p["lnfw"], p["lnfb"])
        # LM head tied to wte, in chunks of rows: logits (rows, Vl) = lnf @ wte[:Vl].T; with grad_scale each
        # chunk's backward (dlnf rows into dbtc, dwte +=) runs at once, so only one chunk of logits is ever held
        N, C, R = self.B * self.T, cfg.channels, self.chunk
        lnf, wte = a["lnf"].reshape(N, C), p["wte"][:self.Vl]
        if not self.has_targets:
            if N > R:
                raise UserError(f"logits of {N} rows need logits_chunk >= {N} (it is {R})")
            be.matmul_forward(a["logits"], lnf, wte, None)
            return None
        losses, targets = s["losses"].reshape(N), self.targets.reshape(N)
        for r0 in range(0, N, R):
            r1 = min(N, r0 + R)
            logits = a["logits"][:r1 - r0]
            be.matmul_forward(logits, lnf[r0:r1], wte, None)
            be.fused_classifier(losses[r0:r1], logits, targets[r0:r1], cfg.vocab_size, grad_scale)
            if grad_scale is not None:
                be.matmul_backward(a["dbtc"].reshape(N, C)[r0:r1], self.grads["wte"][:self.Vl], None, logits,
                                   lnf[r0:r1], wte)
        return be.mean_loss(s["losses"]) if return_loss and not be.capturing else None

    # ---- backward -------------------------------------------------------------------------------------------
    def backward(self, hooks=None) -> None:
        """Accumulates parameter gradients (+=), starting from the dlnf that forward(grad_scale=...) left in dbtc
        (the LM head's own backward ran chunk by chunk inside that forward). `hooks` (data parallelism) hears
        before_layer(l) / after_layer(l) around each layer's backward and done() at the end: layer l's
        gradients are complete at after_layer(l), the head's (wte, wpe, lnf) at done()."""
        be, cfg, a, s, p, g = self.be, self.cfg, self.acts, self.stats, self.params, self.grads
        L, NH = cfg.num_layers, cfg.num_heads
        dres, dbtc, dbt4c, dqkv = a["dresidual"], a["dbtc"], a["dbt4c"], a["dqkv"]
        be.fill_zero(dres)
        be.layernorm_backward(dres, g["lnfw"], g["lnfb"], dbtc, a["residual3"][L - 1], p["lnfw"],
                              s["lnf_mean"], s["lnf_rstd"])
        for l in reversed(range(L)):
            if hooks is not None:
                hooks.before_layer(l)
            residual = a["encoded"] if l == 0 else a["residual3"][l - 1]
            if self.recompute >= 1:
                be.gelu_forward(self._fch_gelu(l), a["fch"][l])
            if self.recompute >= 2:
                be.layernorm_forward(self._ln2(l), s["ln2_mean"][l], s["ln2_rstd"][l], a["residual2"][l],
                                     p["ln2w"][l], p["ln2b"][l])
            # MLP: dres flows unchanged into fcproj's output (the residual add)
            be.matmul_backward(dbt4c, g["fcprojw"][l], g["fcprojb"][l], dres, self._fch_gelu(l), p["fcprojw"][l],
                               gelu_pre=a["fch"][l])
            be.matmul_backward(dbtc, g["fcw"][l], g["fcb"][l], dbt4c, self._ln2(l), p["fcw"][l])
            be.layernorm_backward(dres, g["ln2w"][l], g["ln2b"][l], dbtc, a["residual2"][l], p["ln2w"][l],
                                  s["ln2_mean"][l], s["ln2_rstd"][l])
            # attention
            be.matmul_backward(dbtc, g["attprojw"][l], g["attprojb"][l], dres, a["atty"][l], p["attprojw"][l])
            be.attention_backward(dqkv, dbtc, a["qkv"][l], s_or_a(self, "att")[l], NH, out=a["atty"][l])
            if self.recompute >= 2:
                be.layernorm_forward(self._ln1(l), s["ln1_mean"][l], s["ln1_rstd"][l], residual, p["ln1w"][l],
                                     p["ln1b"][l])
            be.matmul_backward(dbtc, g["qkvw"][l], g["qkvb"][l], dqkv, self._ln1(l), p["qkvw"][l])
            be.layernorm_backward(dres, g["ln1w"][l], g["ln1b"][l], dbtc, residual, p["ln1w"][l],
                                  s["ln1_mean"][l], s["ln1_rstd"][l])
            if hooks is not None:
                hooks.after_layer(l)
        be.encoder_backward(g["wte"], g["wpe"], dres, self.tokens)
        if hooks is not None:
            hooks.done()


def s_or_a(model: GPT2, name: str):
    """A planned tensor from the activation or the statistics buffer (the attention state lives in either)."""
    return model.acts[name] if name in model.acts.shapes else model.stats[name]
