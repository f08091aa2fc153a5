"""The MatMul-free LM (Zhu et al. 2024, HGRN-Bit; ridgerchu/matmulfreellm `modeling_hgrn_bit.py`): its config,
parameter spec, activation plan, forward and backward over a backend's declared ops. Formulas: docs/mmfree.md;
the layers: layers/bitlinear.py and layers/mlgru.py.

Every dense product is a BitLinear (an RMSNorm inside, int8 activations, ternary weights with one scale per matrix):
the token mixer's i, f, g, o projections, the GLU's fused d -> 2I gate/up projection and its down projection, and
the LM head. Full precision: the untied token embedding (no positions), the block norms, the MLGRU recurrence and
its lower bounds lam (L, d), computed from one parameter P every forward. A block:
  u = RMSNorm(h); a_i, a_f, a_g = BL_i(u), BL_f(u), BL_g(u); h += BL_o(MLGRU(a_i, a_f, a_g; lam_l))
  v = RMSNorm(h); h += BL_down(up * silu(gate)), [up | gate] = BL_gate(v)
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..backends.ops import OpShapes
from ..errors import UserError
from .base import Family, Model, ModelConfig, pad_vocab
from .decode import RecurrentState
from .params import ParamBuffer, ParamSpec

MMFREE_VOCAB = 32000  # the released models' vocabulary (Mistral-7B-v0.1's SentencePiece)
NAMES = ("mmfree:370m, mmfree:1.3b, mmfree:2.7b (the released shapes, vocab 32000), or mmfree:lLdD[iI][vV][tT] "
         "such as mmfree:l2d64v256t32 (layers, dim, GLU width (default 256 ceil(8d/3 / 256)), vocab (default "
         "50257, GPT-2's tokenizer), context (2048))")


def default_intermediate(d: int) -> int:
    """The reference's GLU width: I = 256 ceil(int(8d/3) / 256) (2816 at d = 1024)."""
    return 256 * -(-int(d * 8 / 3) // 256)


@dataclass(frozen=True)
class MMFreeConfig(ModelConfig):
    family = "mmfree"
    max_seq_len: int = 2048                 # maxT: no positions; bounds the planned buffers and a decoding window
    vocab_size: int = MMFREE_VOCAB          # V
    padded_vocab_size: int = MMFREE_VOCAB   # Vp
    num_layers: int = 24                    # L
    channels: int = 1024                    # d
    ffn_hidden: int = 2816                  # I
    norm_eps: float = 1e-6                  # every RMSNorm, the ones inside BitLinear and the gate norm too

    def __post_init__(self):
        self.check_fields()
        if min(self.max_seq_len, self.vocab_size, self.num_layers, self.channels, self.ffn_hidden) < 1:
            raise UserError(f"model config has a non-positive size: {self}")
        if self.padded_vocab_size < self.vocab_size:
            raise UserError(f"padded vocab {self.padded_vocab_size} < vocab {self.vocab_size}")
        if not self.norm_eps > 0:
            raise UserError(f"norm eps must be positive: {self}")

    def num_params(self) -> int:
        """Real parameters: the vocabulary padding rows left out (the released models' count)."""
        pad = (self.padded_vocab_size - self.vocab_size) * self.channels * 2
        return sum(math.prod(s.shape) for s in spec(self)) - pad

    def flops_per_token(self, T: int) -> int:
        """6 N (N every parameter, the embedding included, as Llama's torchtitan convention; there is no attention
        term: the recurrence is elementwise). The BitLinear products run as int8 x ternary on the GPU."""
        return 6 * self.num_params()

    def describe(self) -> str:
        return (f"MatMul-free LM L={self.num_layers} d={self.channels} I={self.ffn_hidden} maxT={self.max_seq_len} "
                f"V={self.vocab_size}")


# a BitLinear's weight and its inner norm's gain: (our name, HF module under model.layers.{l}.)
BITLINEARS = (("iw", "attn.i_proj"), ("fw", "attn.f_proj"), ("gw", "attn.g_proj"), ("ow", "attn.o_proj"),
              ("gatew", "mlp.gate_proj"), ("downw", "mlp.down_proj"))


def spec(cfg: MMFreeConfig) -> list[ParamSpec]:
    """Init as the reference: the token mixer's BitLinears xavier-uniform with gain 2^-2.5, the GLU's, the head and
    the embedding N(0, 0.02), the down projection's std also / sqrt(2L), every gain 1, P 0. gatew's rows are
    [up; gate] (our SwiGLU's order; HF's gate_proj is [gate; up], formats/hf/mmfree.py swaps the halves). Each
    BitLinear weight `Xw` has its inner norm's gain `Xn`. Weight decay on the matrices and the embedding."""
    L, d, I, Vp = cfg.num_layers, cfg.channels, cfg.ffn_hidden, cfg.padded_vocab_size
    xavier = 2 ** -2.5 * math.sqrt(6 / (d + d))  # U(-a, a) bound of xavier_uniform, gain 2^-2.5, fan in = out = d
    m = "model.layers.{l}."

    def layer(name, shape, hf, **kw):
        return ParamSpec(name, (L, *shape), per_layer=True, hf=m + hf, **kw)

    def bitlinear(name, hf, rows, cols, **init):
        return [layer(name, (rows, cols), hf + ".weight", decay=True, **init),
                layer(name[:-1] + "n", (cols,), hf + ".norm.weight", init="ones")]

    return [
        ParamSpec("wte", (Vp, d), decay=True, init="normal", std=0.02, vocab_rows=cfg.vocab_size,
                  hf="model.embeddings.weight"),
        ParamSpec("lm_head", (Vp, d), decay=True, init="normal", std=0.02, vocab_rows=cfg.vocab_size,
                  hf="lm_head.weight"),
        ParamSpec("lm_headn", (d,), init="ones", hf="lm_head.norm.weight"),
        ParamSpec("lower_bounds", (L, d), hf="model.lower_bounds"),   # P: global (its gradient comes last)
        layer("ln1w", (d,), "attn_norm.weight", init="ones"),
        *bitlinear("iw", "attn.i_proj", d, d, init="uniform", std=xavier),
        *bitlinear("fw", "attn.f_proj", d, d, init="uniform", std=xavier),
        *bitlinear("gw", "attn.g_proj", d, d, init="uniform", std=xavier),
        layer("gnormw", (d,), "attn.g_norm.weight", init="ones"),
        *bitlinear("ow", "attn.o_proj", d, d, init="uniform", std=xavier),
        layer("ln2w", (d,), "mlp_norm.weight", init="ones"),
        *bitlinear("gatew", "mlp.gate_proj", 2 * I, d, init="normal", std=0.02),
        *bitlinear("downw", "mlp.down_proj", d, I, init="normal", std=0.02 / math.sqrt(2 * L)),
        ParamSpec("lnfw", (d,), init="ones", hf="model.norm.weight"),
    ]


_PUBLISHED = {"370m": (1024, 24), "1.3b": (2048, 24), "2.7b": (2560, 32)}  # name -> (d, L); docs/mmfree.md
_SMALL = re.compile(r"l(\d+)d(\d+)(?:i(\d+))?(?:v(\d+))?(?:t(\d+))?")


def config_from_name(prefix: str, name: str) -> MMFreeConfig:
    """A released shape (`mmfree:370m`, vocab 32000) or a small config `mmfree:l2d64[i192][v256][t32]`."""
    s = name.strip().lower()
    if s in _PUBLISHED:
        d, L = _PUBLISHED[s]
        return MMFreeConfig(num_layers=L, channels=d, ffn_hidden=default_intermediate(d))
    m = _SMALL.fullmatch(s)
    if m:
        d, v = int(m.group(2)), int(m.group(4) or 50257)
        return MMFreeConfig(num_layers=int(m.group(1)), channels=d,
                            ffn_hidden=int(m.group(3) or default_intermediate(d)), vocab_size=v,
                            padded_vocab_size=pad_vocab(v), max_seq_len=int(m.group(5) or 2048))
    raise UserError(f"unknown model config {name!r} for {prefix}: use {NAMES}")


class MMFree(Model):
    """recompute: 0 keeps every activation; 1 recomputes the GLU's SwiGLU output in backward; 2 also its gate/up
    BitLinear (fc, 2I wide: the largest activation) and the recurrent states h (fp32), one layer's buffer each
    (a BitLinear forward and a scan forward per layer more). The BitLinears never store their normalized or
    quantized inputs: they keep one rstd per row and recompute the rest in backward."""
    RECOMPUTE = (0, 1, 2)
    HEAD_WEIGHT = "lm_head"
    TERNARY = ("lm_head", "iw", "fw", "gw", "ow", "gatew", "downw")
    GRAPH_DECODE = True  # no positions: every decode step is the same launches
    # batch-1 packed decoding in one kernel (_decode_in_one_kernel) when True: bit for bit the per-op kernels for one
    # state (tests/test_cuda_mmfree_decode.py), and the batched GPU tests pass with it on (their fp32 case once
    # failed: the fp32 embedding lookup used array temporaries, which a captured batch step kept writing after a
    # new plan reused their memory; now a kernel, encoder_forward_widen)
    persistent_decode = True

    # ---- memory plan ----------------------------------------------------------------------------------------
    def plan(self):
        cfg, B, T = self.cfg, self.B, self.T
        L, d, I = cfg.num_layers, cfg.channels, cfg.ffn_hidden
        Lg, Lf = self.rc_rows(1), self.rc_rows(2)
        acts = [
            ("encoded", (B, T, d)),
            ("ln1", (L, B, T, d)),                                  # u: the input of BL_i, BL_f, BL_g
            ("ai", (L, B, T, d)), ("af", (L, B, T, d)), ("ag", (L, B, T, d)),
            ("o", (L, B, T, d)),                                    # MLGRU's output: BL_o's input
            ("residual2", (L, B, T, d)), ("ln2", (L, B, T, d)),
            ("fc", (Lf, B, T, 2 * I)), ("sw", (Lg, B, T, I)),
            ("residual3", (L, B, T, d)), ("lnf", (B, T, d)),
            ("proj", (B, T, d)),                                    # BL_o / BL_down outputs: consumed at once
        ]
        stats = [("ln1_rstd", (L, B, T)), ("ln2_rstd", (L, B, T)), ("lnf_rstd", (B, T)),
                 ("ifg_rstd", (L, B, T)),                           # BL_i, BL_f, BL_g's inner norm (one input)
                 ("g_rstd", (L, B, T)), ("o_rstd", (L, B, T)), ("fc_rstd", (L, B, T)), ("down_rstd", (L, B, T)),
                 ("head_rstd", (B, T)),
                 ("h", (Lf, B, T, d)),                              # the recurrent states, fp32
                 ("lam", (L, d)), ("dlam", (L, d))]                 # lower bounds and their gradient, fp32
        grads = [("dresidual", (B, T, d)), ("dbtc", (B, T, d)), ("dai", (B, T, d)), ("daf", (B, T, d)),
                 ("dag", (B, T, d)), ("do", (B, T, d)), ("dfc", (B, T, 2 * I)), ("dsw", (B, T, I))]
        return acts, grads, stats

    def op_shapes(self) -> OpShapes:
        cfg, d, I = self.cfg, self.cfg.channels, self.cfg.ffn_hidden
        return OpShapes(self.B, self.T, d, 0, 0, 0, cfg.vocab_size, self.Vl,  # no attention
                        linears=((d, d), (2 * I, d), (d, I), (self.Vl, d)))

    def _sw(self, l):
        return self.acts["sw"][self.rc_slot(1, l)]

    def _fc(self, l):
        return self.acts["fc"][self.rc_slot(2, l)]

    def _h(self, l):
        return self.stats["h"][self.rc_slot(2, l)]

    def _bitlinear(self, out, rstd, x, w, gamma, l=None, w_rows=None):
        """BitLinear `w` (layer l; None: a global weight) from the latent weights, or from the packed codes."""
        if w in self.packed:
            codes, scale, K, packing = self.packed[w]
            i = 0 if l is None else l
            self.be.bitlinear_packed_forward(out, rstd, x, codes[i] if l is not None else codes[:out.shape[-1]],
                                             float(scale[i]), K, packing, gamma, self.cfg.norm_eps)
        else:
            W = self._latent(w, l)
            self.be.bitlinear_forward(out, rstd, x, W if w_rows is None else W[:out.shape[-1]], gamma,
                                      self.cfg.norm_eps, w_rows)

    def _latent(self, w, l):
        """The latent weight a BitLinear quantizes: the fp32 master copy when this rank holds it whole (as the
        reference quantizes its fp32 weights under bf16 autocast), else the compute copy."""
        src = self.master if isinstance(self.master, ParamBuffer) else self.params
        return src[w] if l is None else src[w][l]

    # ---- forward --------------------------------------------------------------------------------------------
    def forward(self, tokens=None, targets=None, grad_scale: float | None = None, *, return_loss: bool = True,
                state: RecurrentState | None = None) -> float | None:
        """As GPT-2's forward (models/gpt2.py): the mean loss with targets (and the LM head's backward with
        grad_scale), else the logits; state: decoding from its recurrent states, which are advanced (T > 1: a
        prefill of state.span tokens, the rest padding)."""
        be, cfg, a, s, p = self.be, self.cfg, self.acts, self.stats, self.params
        L, eps = cfg.num_layers, cfg.norm_eps
        if tokens is not None:
            self.set_batch(tokens, targets)
        be.encoder_forward(a["encoded"], self.tokens, self.bf16["wte"] if self.is_packed else p["wte"], None)
        if state is not None and self.T == 1 and self._decode_in_one_kernel(state):
            return None  # the logits are in acts["logits"][0], the state advanced
        be.lower_bounds_forward(s["lam"], p["lower_bounds"])
        be.rmsnorm_forward(a["ln1"][0], s["ln1_rstd"][0], a["encoded"], p["ln1w"][0], eps)
        for l in range(L):
            residual = a["encoded"] if l == 0 else a["residual3"][l - 1]
            u = a["ln1"][l]
            if "iw" in self.packed:  # i, f, g: three packed BitLinears of one input (one launch when decoding)
                (ci, si, K, pk), (cf, sf, _, _), (cg, sg, _, _) = (self.packed[w] for w in ("iw", "fw", "gw"))
                be.bitlinear_packed_forward3((a["ai"][l], a["af"][l], a["ag"][l]), s["ifg_rstd"][l], u,
                                             (ci[l], cf[l], cg[l]), (float(si[l]), float(sf[l]), float(sg[l])), K,
                                             pk, (p["in"][l], p["fn"][l], p["gn"][l]), eps)
            else:
                self._bitlinear(a["ai"][l], s["ifg_rstd"][l], u, "iw", p["in"][l], l)
                self._bitlinear(a["af"][l], s["ifg_rstd"][l], u, "fw", p["fn"][l], l)
                self._bitlinear(a["ag"][l], s["ifg_rstd"][l], u, "gw", p["gn"][l], l)
            # decoding (T = 1) writes the new state over the old one in place: no copy (each channel reads its h0
            # before it writes h)
            step = state is not None and self.T == 1
            be.mlgru_forward(a["o"][l], state.h[l].reshape(self.B, 1, -1) if step else self._h(l), s["g_rstd"][l],
                             a["ai"][l], a["af"][l], a["ag"][l], s["lam"][l], p["gnormw"][l],
                             None if state is None else state.h[l], eps)
            if state is not None and not step:  # the new state: the last position fed's
                be.copy_(state.h[l], self._h(l)[:, state.span - 1])
            self._bitlinear(a["proj"], s["o_rstd"][l], a["o"][l], "ow", p["on"][l], l)
            be.fused_residual_rmsnorm_forward(a["residual2"][l], a["ln2"][l], s["ln2_rstd"][l], residual,
                                              a["proj"], p["ln2w"][l], eps)
            if "gatew" in self.packed:  # inference: the product straight to its SwiGLU (one launch when decoding)
                codes, scale, K, pk = self.packed["gatew"]
                be.bitlinear_packed_swiglu_forward(self._sw(l), s["fc_rstd"][l], a["ln2"][l], codes[l],
                                                   float(scale[l]), K, pk, p["gaten"][l], eps)
            else:
                self._bitlinear(self._fc(l), s["fc_rstd"][l], a["ln2"][l], "gatew", p["gaten"][l], l)
                be.swiglu_forward(self._sw(l), self._fc(l))
            self._bitlinear(a["proj"], s["down_rstd"][l], self._sw(l), "downw", p["downn"][l], l)
            if l + 1 < L:  # this block's residual add, fused with the next block's first RMSNorm
                be.fused_residual_rmsnorm_forward(a["residual3"][l], a["ln1"][l + 1], s["ln1_rstd"][l + 1],
                                                  a["residual2"][l], a["proj"], p["ln1w"][l + 1], eps)
            else:
                be.fused_residual_rmsnorm_forward(a["residual3"][l], a["lnf"], s["lnf_rstd"], a["residual2"][l],
                                                  a["proj"], p["lnfw"], eps)
        return self.lm_head(a["lnf"], a["dbtc"] if self.training else None, grad_scale, return_loss, state)

    # the ternary LM head (its own inner norm) for base.Model.lm_head's chunks of rows; the weight scale averages
    # over the real vocabulary rows only (the padding rows are zero)
    def head_forward(self, logits, x, rows):
        self._bitlinear(logits, self.stats["head_rstd"].reshape(-1)[rows], x, "lm_head", self.params["lm_headn"],
                        w_rows=self.cfg.vocab_size)

    def head_backward(self, dx, dlogits, x, rows):
        be, p, g = self.be, self.params, self.grads
        be.fill_zero(dx)  # BitLinear's backward accumulates into its input's gradient
        be.bitlinear_backward(dx, g["lm_head"][:self.Vl], g["lm_headn"], dlogits, x,
                              self._latent("lm_head", None)[:self.Vl], p["lm_headn"],
                              self.stats["head_rstd"].reshape(-1)[rows], self.cfg.vocab_size)

    # ---- backward -------------------------------------------------------------------------------------------
    def backward(self, hooks=None) -> None:
        """Accumulates parameter gradients (+=) from the dlnf the LM head left in dbtc; hooks as in GPT-2's."""
        be, cfg, a, s, p, g = self.be, self.cfg, self.acts, self.stats, self.params, self.grads
        L = cfg.num_layers
        dres, dbtc, dfc, dsw, do = a["dresidual"], a["dbtc"], a["dfc"], a["dsw"], a["do"]
        dai, daf, dag = a["dai"], a["daf"], a["dag"]
        be.fill_zero(dres)
        be.fill_zero(s["dlam"])
        be.rmsnorm_backward(dres, g["lnfw"], dbtc, a["residual3"][L - 1], p["lnfw"], s["lnf_rstd"])
        for l in reversed(range(L)):
            if hooks is not None:
                hooks.before_layer(l)
            residual = a["encoded"] if l == 0 else a["residual3"][l - 1]
            if self.rc_redo(2, l):  # the same kernels on the same inputs: bitwise the forward's values
                self._bitlinear(self._fc(l), s["fc_rstd"][l], a["ln2"][l], "gatew", p["gaten"][l], l)
            if self.rc_redo(1, l):
                be.swiglu_forward(self._sw(l), self._fc(l))
            # GLU: dres flows unchanged into BL_down's output (the residual add)
            be.fill_zero(dsw)
            be.bitlinear_backward(dsw, g["downw"][l], g["downn"][l], dres, self._sw(l), self._latent("downw", l),
                                  p["downn"][l], s["down_rstd"][l])
            be.swiglu_backward(dfc, self._fc(l), dsw)
            be.fill_zero(dbtc)
            be.bitlinear_backward(dbtc, g["gatew"][l], g["gaten"][l], dfc, a["ln2"][l], self._latent("gatew", l),
                                  p["gaten"][l], s["fc_rstd"][l])
            be.rmsnorm_backward(dres, g["ln2w"][l], dbtc, a["residual2"][l], p["ln2w"][l], s["ln2_rstd"][l])
            # token mixer
            be.fill_zero(do)
            be.bitlinear_backward(do, g["ow"][l], g["on"][l], dres, a["o"][l], self._latent("ow", l), p["on"][l],
                                  s["o_rstd"][l])
            if self.rc_redo(2, l):
                be.mlgru_forward(a["o"][l], self._h(l), s["g_rstd"][l], a["ai"][l], a["af"][l], a["ag"][l],
                                 s["lam"][l], p["gnormw"][l], None, cfg.norm_eps)
            be.mlgru_backward(dai, daf, dag, s["dlam"][l], g["gnormw"][l], do, a["ai"][l], a["af"][l], a["ag"][l],
                              s["lam"][l], p["gnormw"][l], self._h(l), s["g_rstd"][l])
            be.fill_zero(dbtc)
            u = a["ln1"][l]
            for dx, w in ((dai, "iw"), (daf, "fw"), (dag, "gw")):  # three projections of one input: dbtc +=
                n = w[:-1] + "n"
                be.bitlinear_backward(dbtc, g[w][l], g[n][l], dx, u, self._latent(w, l), p[n][l], s["ifg_rstd"][l])
            be.rmsnorm_backward(dres, g["ln1w"][l], dbtc, residual, p["ln1w"][l], s["ln1_rstd"][l])
            if hooks is not None:
                hooks.after_layer(l)
        be.lower_bounds_backward(g["lower_bounds"], s["dlam"], p["lower_bounds"])
        be.encoder_backward(g["wte"], None, dres, self.tokens)
        if hooks is not None:
            hooks.done()

    # ---- decoding -------------------------------------------------------------------------------------------
    def _decode_in_one_kernel(self, state: RecurrentState) -> bool:
        """A packed model's batch-1 decode step as one persistent kernel (backends/cuda/mmfree.py decode_step_plan,
        kernels/mmfree_decode.cu): every layer and the head, bit for bit the per-op path below, which runs instead
        where it does not apply (more rows, latent weights, no such kernel, shapes that do not fit) or with
        persistent_decode off. The plan (argument tables on the device) is made on the step that runs eagerly
        before a capture, for this state."""
        be, cfg = self.be, self.cfg
        ops = getattr(be, "mmfree", None)
        if (not self.persistent_decode or self.B != 1 or ops is None or not hasattr(ops, "decode_step_plan")
                or any(w not in self.packed for w in self.TERNARY)
                or len({self.packed[w][3] for w in self.TERNARY}) != 1):
            return False
        cached = getattr(self, "_one_kernel_plan", None)
        if cached is None or cached[0] is not state:
            if be.capturing:  # the plan uploads its tables; the eager step before a capture makes it
                return False
            p, a, L = self.params, self.acts, cfg.num_layers
            per = {"base3": 5, "2bit": 4}[self.packed["iw"][3]]
            arrays = {"enc": a["encoded"], "logits": a["logits"], "h": state.h, "ln1": p["ln1w"], "ln2": p["ln2w"],
                      "gnorm": p["gnormw"], "lnf": p["lnfw"], "headn": p["lm_headn"],
                      "gains": tuple(p[w[:-1] + "n"] for w in self.TERNARY[1:]),
                      "codes": tuple(self.packed[w][0] for w in self.TERNARY[1:] + self.TERNARY[:1])}
            scales = [[float(self.packed[w][1][l]) for w in self.TERNARY[1:]] for l in range(L)]
            plan = ops.decode_step_plan(dict(L=L, d=cfg.channels, I=cfg.ffn_hidden, Vl=self.Vl, per=per), arrays,
                                        scales, float(self.packed["lm_head"][1][0]), cfg.norm_eps)
            cached = self._one_kernel_plan = (state, plan)
        plan = cached[1]
        if plan is None:
            return False
        be.lower_bounds_forward(plan["lam"], self.params["lower_bounds"])  # into the kernel's own (aligned) buffer
        ops.decode_step_run(plan)
        return True

    def new_decode_state(self, length: int) -> RecurrentState:
        """Every layer's recurrent state (L, B, d), fp32: the same size at any length (no capacity to bound)."""
        cfg = self.cfg
        return RecurrentState.allocate(self.be, (cfg.num_layers, self.B, cfg.channels))


FAMILY = Family(name="mmfree", title="MatMul-free LM", config=MMFreeConfig, model=MMFree, spec=spec,
                parse=config_from_name, names=NAMES)
