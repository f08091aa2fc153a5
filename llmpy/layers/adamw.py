"""AdamW (Loshchilov & Hutter), decoupled weight decay, on flat arrays in place: llm.c's update."""
import math

import numpy as np


def adamw_update(p, g, m, v, a, b, *, lr, beta1, beta2, eps, bc1, bc2, weight_decay, scale=1.0):
    """AdamW on flat arrays, in place (a, b: scratch of the same size), llm.c's formula with clipping folded in:
    m = b1 m + (1-b1) s g;  v = b2 v + (1-b2) (s g)^2;  p -= lr (m bc1 / (sqrt(v bc2) + eps) + wd p),
    s the clip scale, bc1 = 1/(1-b1^t), bc2 = 1/(1-b2^t). sqrt(bc2) is factored out of the denominator (one
    pass fewer); p is rounded once per step."""
    np.multiply(g, (1.0 - beta1) * scale, out=a)
    m *= beta1
    m += a
    np.multiply(g, g, out=a)
    a *= (1.0 - beta2) * scale * scale
    v *= beta2
    v += a
    r = math.sqrt(bc2)
    np.sqrt(v, out=a)
    a += eps / r                               # (sqrt(v bc2) + eps) / sqrt(bc2)
    np.divide(m, a, out=a)
    a *= lr * bc1 / r                          # lr m_hat / (sqrt(v_hat) + eps)
    if weight_decay:
        np.multiply(p, lr * weight_decay, out=b)
        a += b
    p -= a
