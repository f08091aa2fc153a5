"""The CPU backend: binds the NumPy reference layers, composes the fused ops the GPU backend runs as single
kernels, and owns one preallocated workspace so that a training step allocates nothing."""
from __future__ import annotations

import numpy as np

from .. import layers as Lr
from ..errors import UserError

_DTYPES = {"fp32": np.float32, "fp64": np.float64}


class CPUBackend:
    name = "cpu"
    xp = np

    def __init__(self, dtype: str = "fp32"):
        if dtype not in _DTYPES:
            raise UserError(f"the cpu device supports --dtype fp32 only (got {dtype})")
        self.dtype_name = dtype
        self.act_dtype = self.param_dtype = self.stat_dtype = np.dtype(_DTYPES[dtype])
        self.acc_dtype = np.dtype(np.float64)         # loss sums and the gradient norm
        self.ws = None
        self.capturing = False

    # ---- memory ---------------------------------------------------------------------------------------------
    def zeros(self, n, dtype):
        return np.zeros(n, dtype)

    def to_numpy(self, x) -> np.ndarray:
        return np.asarray(x)

    def asarray(self, x, dtype=None):
        return np.asarray(x, dtype=dtype)

    def copy_(self, dst, src):
        np.copyto(dst, src, casting="unsafe")

    def load_f32(self, dst, src_f32):
        np.copyto(dst, src_f32, casting="unsafe")

    def fill_zero(self, x):
        x[...] = 0

    def synchronize(self):
        pass

    def set_tokens(self, dst, host, *, training=True):
        np.copyto(dst, host, casting="unsafe")

    def capture(self, fn):
        return fn  # no graphs on the CPU: "replaying" is running

    def logit_columns(self, cfg) -> int:
        return cfg.vocab_size                        # only the real vocabulary: padded columns never exist

    def attention_state(self, B, T, NH, hs) -> tuple:
        return (B, NH, T, T), "act"                  # the saved softmax, in the activation buffer

    def plan_workspace(self, cfg, B, T):
        """One flat scratch buffer, large enough for the hungriest op (all ops run one after another)."""
        C, NH, V, N = cfg.channels, cfg.num_heads, self.logit_columns(cfg), B * T
        need = max(
            3 * N * 4 * C,                           # gelu backward
            2 * N * C + C + 2 * N,                   # layernorm backward
            V * C + V, 4 * C * C + 4 * C,            # matmul backward: classifier, MLP
            B * NH * T * T + N * C + B * NH * T,     # attention backward (forward needs less)
            2 * N,                                   # classifier
            3 * cfg.padded_vocab_size * C,           # AdamW temporaries for the largest tensor (wte)
        )
        self.ws = np.empty(need, self.act_dtype)
        return need * self.act_dtype.itemsize

    # ---- layers ---------------------------------------------------------------------------------------------
    def encoder_forward(self, out, tokens, wte, wpe):
        Lr.encoder_forward(out, tokens, wte, wpe)

    def encoder_backward(self, dwte, dwpe, dout, tokens):
        Lr.encoder_backward(dwte, dwpe, dout, tokens)

    def layernorm_forward(self, out, mean, rstd, inp, w, b):
        Lr.layernorm_forward(out, mean, rstd, inp, w, b)

    def fused_residual_layernorm_forward(self, residual, out, mean, rstd, inp1, inp2, w, b):
        # residual = inp1 + inp2; out = layernorm(residual)
        Lr.residual_forward(residual, inp1, inp2)
        Lr.layernorm_forward(out, mean, rstd, residual, w, b)

    def layernorm_backward(self, dinp, dw, db, dout, inp, w, mean, rstd):
        Lr.layernorm_backward(dinp, dw, db, dout, inp, w, mean, rstd, scratch=self.ws)

    def matmul_forward(self, out, inp, w, b, gelu_pre=None):
        # gelu_pre given: gelu_pre = inp @ w.T + b is saved and out = gelu(gelu_pre)
        if gelu_pre is None:
            Lr.matmul_forward(out, inp, w, b)
        else:
            Lr.matmul_forward(gelu_pre, inp, w, b)
            Lr.gelu_forward(out, gelu_pre, scratch=self.ws)

    def matmul_backward(self, dinp, dw, db, dout, inp, w, gelu_pre=None):
        # gelu_pre given: dinp = (dout @ w) * gelu'(gelu_pre), the GELU backward of the layer below
        Lr.matmul_backward(dinp, dw, db, dout, inp, w, scratch=self.ws)
        if gelu_pre is not None:
            Lr.gelu_backward(dinp, gelu_pre, dinp, scratch=self.ws)

    def attention_forward(self, out, state, qkv, num_heads):
        Lr.attention_forward(out, state, qkv, num_heads, scratch=self.ws)

    def attention_backward(self, dqkv, dout, qkv, state, num_heads, out=None):
        Lr.attention_backward(dqkv, dout, qkv, state, num_heads, scratch=self.ws)

    def fused_classifier(self, losses, logits, targets, vocab_size, dloss=None):
        Lr.fused_classifier(losses, logits[..., :vocab_size].reshape(-1, vocab_size), targets, dloss,
                            scratch=self.ws)

    def gelu_forward(self, out, inp):
        Lr.gelu_forward(out, inp, scratch=self.ws)

    def loss_accumulate(self, acc, losses, scale):
        acc[0] += scale * float(losses.sum(dtype=np.float64))

    def mean_loss(self, losses) -> float:
        return float(losses.sum(dtype=np.float64)) / losses.size

    # ---- optimizer ------------------------------------------------------------------------------------------
    def grad_norm(self, out, flat):
        """out[0] = sqrt(sum of squares), accumulated in float64 in a fixed order (deterministic)."""
        out[0] = np.sqrt(np.einsum("i,i->", flat, flat, dtype=np.float64))

    def adamw(self, p, master, g, m, v, hp, norm, weight_decay, offset):
        """One AdamW step over one tensor (flat views), in place, in llm.c's formula order:
        m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  p -= lr (m_hat / (sqrt(v_hat) + eps) + wd p).
        hp = [lr, beta1, beta2, eps, 1/(1-beta1^t), 1/(1-beta2^t), grad_clip, seed]; norm[0] the global grad
        norm (clipping scales g by grad_clip/norm when above; a non-finite norm skips the update)."""
        lr, beta1, beta2, eps, bc1, bc2, clip = (float(x) for x in hp[:7])
        gn = float(norm[0])
        if not np.isfinite(gn):
            return
        n = g.size
        a, b, gs = (self.ws[k * n:(k + 1) * n] for k in range(3))
        if clip > 0 and gn > clip:
            np.multiply(g, clip / gn, out=gs)
            g = gs
        m *= beta1
        np.multiply(g, 1.0 - beta1, out=a)
        m += a
        v *= beta2
        np.multiply(g, 1.0 - beta2, out=a)
        a *= g
        v += a
        np.multiply(v, bc2, out=a)
        np.sqrt(a, out=a)
        a += eps
        np.multiply(m, bc1, out=b)
        np.divide(b, a, out=a)
        if weight_decay:
            np.multiply(p, weight_decay, out=b)
            a += b
        a *= lr
        p -= a
