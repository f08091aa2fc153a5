"""GELU, tanh approximation (GPT-2's `gelu_new`): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
import math

import numpy as np

from ._scratch import buf

GELU_SCALE = math.sqrt(2.0 / math.pi)
GELU_CUBE = 0.044715


def gelu_forward(out, inp, scratch=None):
    # out, inp (N,) any shape; out may alias nothing in inp. scratch: inp.size elements
    S, c = GELU_SCALE, GELU_CUBE
    u = buf(scratch, inp.shape, inp.dtype)
    np.multiply(inp, inp, out=u)
    u *= c * S
    u += S
    u *= inp                   # u = S (x + 0.044715 x^3)
    np.tanh(u, out=u)
    u += 1.0
    u *= 0.5
    np.multiply(inp, u, out=out)


def gelu_backward(dinp, inp, dout, scratch=None):
    # dinp = gelu'(inp) * dout, overwritten; dinp may be dout (in place). scratch: 3*inp.size elements
    # gelu'(x) = 0.5 (1 + th) + 0.5 S x (1 + 3*0.044715 x^2) (1 - th^2),  th = tanh(S (x + 0.044715 x^3))
    #          = (1 + th) (0.5 + a (1 - th)),  a = 0.5 S x (1 + 3*0.044715 x^2)
    S, c = GELU_SCALE, GELU_CUBE
    s = buf(scratch, (3,) + inp.shape, inp.dtype)
    a, th, d = s[0], s[1], s[2]
    np.multiply(inp, inp, out=a)
    np.multiply(a, c * S, out=th)
    th += S
    th *= inp
    np.tanh(th, out=th)
    a *= 1.5 * c * S
    a += 0.5 * S
    a *= inp
    np.subtract(1.0, th, out=d)
    d *= a
    d += 0.5
    th += 1.0
    d *= th                    # d = gelu'(x)
    np.multiply(d, dout, out=dinp)
