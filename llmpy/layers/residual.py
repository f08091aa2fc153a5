"""Residual connection: out = inp1 + inp2 (the gradient passes through to both inputs)."""
import numpy as np


def residual_forward(out, inp1, inp2):
    # all (B,T,C)
    np.add(inp1, inp2, out=out)


def residual_backward(dinp1, dinp2, dout):
    # all (B,T,C); both input gradients accumulate
    dinp1 += dout
    dinp2 += dout
