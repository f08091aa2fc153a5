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
        self.ws = None

    # ---- memory ---------------------------------------------------------------------------------------------
    def zeros(self, n, dtype):
        return np.zeros(n, dtype)

    def to_numpy(self, x) -> np.ndarray:
        return np.asarray(x)

    def asarray(self, x, dtype=None):
        return np.asarray(x, dtype=dtype)

    def copy_(self, dst, src):
        np.copyto(dst, src, casting="unsafe")

    def synchronize(self):
        pass

    def logit_columns(self, cfg) -> int:
        return cfg.vocab_size                        # only the real vocabulary: padded columns never exist

    def attention_state_shape(self, B, T, NH) -> tuple:
        return (B, NH, T, T)                         # the saved softmax

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

    def attention_backward(self, dqkv, dout, qkv, state, num_heads):
        Lr.attention_backward(dqkv, dout, qkv, state, num_heads, scratch=self.ws)

    def fused_classifier(self, losses, logits, targets, vocab_size, dloss=None):
        Lr.fused_classifier(losses, logits[..., :vocab_size].reshape(-1, vocab_size), targets, dloss,
                            scratch=self.ws)

    # ---- optimizer ------------------------------------------------------------------------------------------
    def sumsq(self, x) -> float:
        """Sum of squares of a flat buffer, accumulated in float64 in a fixed order (deterministic)."""
        return float(np.einsum("i,i->", x, x, dtype=np.float64))

    def adamw(self, p, g, m, v, *, lr, beta1, beta2, eps, weight_decay, t, grad_scale=1.0):
        """One AdamW step over one tensor (flat views), in place, following llm.c's formula order:
        m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  p -= lr (m_hat / (sqrt(v_hat) + eps) + wd p)."""
        n = g.size
        a, b, gs = (self.ws[k * n:(k + 1) * n] for k in range(3))
        if grad_scale != 1.0:
            np.multiply(g, grad_scale, out=gs)
            g = gs
        m *= beta1
        np.multiply(g, 1.0 - beta1, out=a)
        m += a
        v *= beta2
        np.multiply(g, 1.0 - beta2, out=a)
        a *= g
        v += a
        np.divide(v, 1.0 - beta2 ** t, out=a)
        np.sqrt(a, out=a)
        a += eps
        np.divide(m, 1.0 - beta1 ** t, out=b)
        np.divide(b, a, out=a)
        if weight_decay:
            np.multiply(p, weight_decay, out=b)
            a += b
        a *= lr
        p -= a
