"""GPT-2: memory plan, forward and backward, written once over a backend's layer ops.

Read top to bottom: `_plan_activations` lists every saved tensor; `forward` and `backward` are straight-line
walks over the layers (llm.c's structure, with the residual add fused into the following LayerNorm).
"""
from __future__ import annotations

import math

import numpy as np

from ..config import GPT2Config, param_shapes, RESIDUAL_PROJ
from ..errors import UserError


class FlatBuffer:
    """One contiguous allocation with named views: what makes a step allocation-free, a CUDA graph possible and
    ZeRO sharding a matter of offsets."""

    def __init__(self, backend, entries, dtype):
        self.shapes = dict(entries)
        self.offsets, n = {}, 0
        for name, shape in entries:
            self.offsets[name] = n
            n += math.prod(shape)
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
    def __init__(self, cfg: GPT2Config, backend, B: int, T: int, *, training: bool = True):
        if T > cfg.max_seq_len:
            raise UserError(f"sequence length {T} exceeds the model's maximum {cfg.max_seq_len}")
        if B < 1 or T < 1:
            raise UserError(f"batch size and sequence length must be positive (got B={B}, T={T})")
        self.cfg, self.be, self.B, self.T = cfg, backend, B, T
        self.training = training
        self.params = FlatBuffer(backend, param_shapes(cfg), backend.param_dtype)
        self.grads = FlatBuffer(backend, param_shapes(cfg), backend.param_dtype) if training else None
        self._plan_activations()
        self.workspace_bytes = backend.plan_workspace(cfg, B, T)
        self.tokens = backend.zeros(B * T, np.int32).reshape(B, T)
        self.targets = backend.zeros(B * T, np.int32).reshape(B, T)
        self.mean_loss = float("nan")

    # ---- memory plan ----------------------------------------------------------------------------------------
    def _plan_activations(self):
        cfg, be, B, T = self.cfg, self.be, self.B, self.T
        L, C, NH = cfg.num_layers, cfg.channels, cfg.num_heads
        self.Vl = be.logit_columns(cfg)  # V on the CPU; the GPU computes all Vp columns and ignores the pad
        acts = [
            ("encoded", (B, T, C)),
            ("ln1", (L, B, T, C)), ("qkv", (L, B, T, 3 * C)), ("atty", (L, B, T, C)),
            ("att", (L,) + tuple(be.attention_state_shape(B, T, NH))),
            ("residual2", (L, B, T, C)), ("ln2", (L, B, T, C)),
            ("fch", (L, B, T, 4 * C)), ("fch_gelu", (L, B, T, 4 * C)),
            ("residual3", (L, B, T, C)), ("lnf", (B, T, C)),
            ("proj", (B, T, C)),                     # attproj / fcproj outputs: consumed at once, reused
            ("logits", (B, T, self.Vl)),             # becomes dlogits in place
        ]
        stats = [(n, (L, B, T)) for n in ("ln1_mean", "ln1_rstd", "ln2_mean", "ln2_rstd")]
        stats += [("lnf_mean", (B, T)), ("lnf_rstd", (B, T)), ("losses", (B, T))]
        grads = [("dresidual", (B, T, C)), ("dbtc", (B, T, C)), ("dbt4c", (B, T, 4 * C)),
                 ("dqkv", (B, T, 3 * C))] if self.training else []
        self.acts = FlatBuffer(be, acts + grads, be.act_dtype)
        self.stats = FlatBuffer(be, stats, be.stat_dtype)

    def memory_plan(self) -> dict[str, int]:
        """Bytes per category (printed at start; the step allocates nothing beyond these)."""
        plan = {"parameters": self.params.nbytes(), "activations": self.acts.nbytes() + self.stats.nbytes(),
                "workspace": self.workspace_bytes}
        if self.grads is not None:
            plan["gradients"] = self.grads.nbytes()
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
        for name, shape in param_shapes(self.cfg):
            a = np.asarray(params[name])
            if a.shape != shape:
                raise UserError(f"parameter {name} has shape {a.shape}, the model needs {shape}")
            self.be.copy_(self.params[name], self.be.asarray(a))

    def params_numpy(self) -> dict[str, np.ndarray]:
        return {n: np.asarray(self.be.to_numpy(self.params[n]), dtype=np.float32)
                for n, _ in param_shapes(self.cfg)}

    def zero_grad(self) -> None:
        self.grads.flat[...] = 0

    # ---- forward --------------------------------------------------------------------------------------------
    def forward(self, tokens=None, targets=None, grad_scale: float | None = None) -> float:
        """Runs the model on (B, T) token ids (host arrays are copied into the device buffers; None: use what is
        there). With targets, returns the mean loss; with grad_scale (= d total loss / d each token's loss,
        e.g. 1/(B*T*grad_accum)) the classifier also leaves dlogits in place for `backward`."""
        be, cfg, a, s, p = self.be, self.cfg, self.acts, self.stats, self.params
        L, NH = cfg.num_layers, cfg.num_heads
        if tokens is not None:
            be.copy_(self.tokens, be.asarray(tokens))
        if targets is not None:
            be.copy_(self.targets, be.asarray(targets))
        be.encoder_forward(a["encoded"], self.tokens, p["wte"], p["wpe"])
        be.layernorm_forward(a["ln1"][0], s["ln1_mean"][0], s["ln1_rstd"][0], a["encoded"], p["ln1w"][0],
                             p["ln1b"][0])
        for l in range(L):
            residual = a["encoded"] if l == 0 else a["residual3"][l - 1]
            be.matmul_forward(a["qkv"][l], a["ln1"][l], p["qkvw"][l], p["qkvb"][l])
            be.attention_forward(a["atty"][l], a["att"][l], a["qkv"][l], NH)
            be.matmul_forward(a["proj"], a["atty"][l], p["attprojw"][l], p["attprojb"][l])
            be.fused_residual_layernorm_forward(a["residual2"][l], a["ln2"][l], s["ln2_mean"][l],
                                                s["ln2_rstd"][l], residual, a["proj"], p["ln2w"][l], p["ln2b"][l])
            be.matmul_forward(a["fch_gelu"][l], a["ln2"][l], p["fcw"][l], p["fcb"][l], gelu_pre=a["fch"][l])
            be.matmul_forward(a["proj"], a["fch_gelu"][l], p["fcprojw"][l], p["fcprojb"][l])
            if l + 1 < L:  # this block's residual add, fused with the next block's first LayerNorm
                be.fused_residual_layernorm_forward(a["residual3"][l], a["ln1"][l + 1], s["ln1_mean"][l + 1],
                                                    s["ln1_rstd"][l + 1], a["residual2"][l], a["proj"],
                                                    p["ln1w"][l + 1], p["ln1b"][l + 1])
            else:
                be.fused_residual_layernorm_forward(a["residual3"][l], a["lnf"], s["lnf_mean"], s["lnf_rstd"],
                                                    a["residual2"][l], a["proj"], p["lnfw"], p["lnfb"])
        # LM head tied to wte: logits (B, T, Vl) = lnf @ wte[:Vl].T
        be.matmul_forward(a["logits"], a["lnf"], p["wte"][:self.Vl], None)
        if targets is None and grad_scale is None and tokens is not None:
            self.mean_loss = float("nan")
            return self.mean_loss
        be.fused_classifier(s["losses"], a["logits"], self.targets, cfg.vocab_size, grad_scale)
        self.mean_loss = float(be.to_numpy(s["losses"]).sum(dtype=np.float64)) / (self.B * self.T)
        return self.mean_loss

    # ---- backward -------------------------------------------------------------------------------------------
    def backward(self) -> None:
        """Accumulates parameter gradients (+=) from the dlogits the last forward(grad_scale=...) left."""
        be, cfg, a, s, p, g = self.be, self.cfg, self.acts, self.stats, self.params, self.grads
        L, NH = cfg.num_layers, cfg.num_heads
        dres, dbtc, dbt4c, dqkv = a["dresidual"], a["dbtc"], a["dbt4c"], a["dqkv"]
        be.matmul_backward(dbtc, g["wte"][:self.Vl], None, a["logits"], a["lnf"], p["wte"][:self.Vl])
        dres[...] = 0
        be.layernorm_backward(dres, g["lnfw"], g["lnfb"], dbtc, a["residual3"][L - 1], p["lnfw"],
                              s["lnf_mean"], s["lnf_rstd"])
        for l in reversed(range(L)):
            residual = a["encoded"] if l == 0 else a["residual3"][l - 1]
            # MLP: dres flows unchanged into fcproj's output (the residual add)
            be.matmul_backward(dbt4c, g["fcprojw"][l], g["fcprojb"][l], dres, a["fch_gelu"][l], p["fcprojw"][l],
                               gelu_pre=a["fch"][l])
            be.matmul_backward(dbtc, g["fcw"][l], g["fcb"][l], dbt4c, a["ln2"][l], p["fcw"][l])
            be.layernorm_backward(dres, g["ln2w"][l], g["ln2b"][l], dbtc, a["residual2"][l], p["ln2w"][l],
                                  s["ln2_mean"][l], s["ln2_rstd"][l])
            # attention
            be.matmul_backward(dbtc, g["attprojw"][l], g["attprojb"][l], dres, a["atty"][l], p["attprojw"][l])
            be.attention_backward(dqkv, dbtc, a["qkv"][l], a["att"][l], NH)
            be.matmul_backward(dbtc, g["qkvw"][l], g["qkvb"][l], dqkv, a["ln1"][l], p["qkvw"][l])
            be.layernorm_backward(dres, g["ln1w"][l], g["ln1b"][l], dbtc, residual, p["ln1w"][l],
                                  s["ln1_mean"][l], s["ln1_rstd"][l])
        be.encoder_backward(g["wte"], g["wpe"], dres, self.tokens)
