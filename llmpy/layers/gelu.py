"""GELU, tanh approximation (GPT-2's `gelu_new`): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
import math

import numpy as np

from ._scratch import buf

GELU_SCALE = math.sqrt(2.0 / math.pi)
GELU_CUBE = 0.044715


def gelu_forward(out, inp, scratch=None):
    # out, inp (N,) any shape; out may alias nothing in inp. scratch: inp.size elements
    u = buf(scratch, inp.shape, inp.dtype)
    np.multiply(inp, inp, out=u)
    u *= GELU_CUBE
    u += 1.0
    u *= inp
    u *= GELU_SCALE            # u = S (x + 0.044715 x^3)
    np.tanh(u, out=u)
    u += 1.0
    np.multiply(inp, u, out=out)
    out *= 0.5


def gelu_backward(dinp, inp, dout, scratch=None):
    # dinp = gelu'(inp) * dout, overwritten; dinp may be dout (in place). scratch: 3*inp.size elements
    # gelu'(x) = 0.5 (1 + th) + 0.5 S x (1 + 3*0.044715 x^2) (1 - th^2),  th = tanh(S (x + 0.044715 x^3))
    s = buf(scratch, (3,) + inp.shape, inp.dtype)
    a, th, sech2 = s[0], s[1], s[2]
    np.multiply(inp, inp, out=a)
    np.multiply(a, GELU_CUBE, out=th)
    th += 1.0
    th *= inp
    th *= GELU_SCALE
    np.tanh(th, out=th)
    a *= 3.0 * GELU_CUBE
    a += 1.0
    a *= inp
    a *= GELU_SCALE            # a = S x (1 + 3*0.044715 x^2)
    np.multiply(th, th, out=sech2)
    np.subtract(1.0, sech2, out=sech2)
    a *= sech2
    a *= 0.5
    th += 1.0
    th *= 0.5
    a += th                    # a = gelu'(x)
    np.multiply(a, dout, out=dinp)
