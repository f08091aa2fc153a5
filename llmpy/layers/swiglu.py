"""SwiGLU (Llama's MLP nonlinearity) on the output of one fused projection: inp (..., 2F) = [up | gate] = [W3 x |
W1 x] (llm.c's row order of the fused weight), out (..., F) = up * silu(gate), silu(a) = a sigmoid(a)."""
import numpy as np

from ._scratch import buf


def swiglu_forward(out, inp, scratch=None):
    # out (..., F); inp (..., 2F). scratch: out.size elements
    F = out.shape[-1]
    up, gate = inp[..., :F], inp[..., F:]
    s = buf(scratch, out.shape, inp.dtype)
    np.negative(gate, out=s)
    np.exp(s, out=s)
    s += 1.0
    np.divide(gate, s, out=s)                                # silu(gate) = gate / (1 + exp(-gate))
    np.multiply(up, s, out=out)


def swiglu_backward(dinp, inp, dout, scratch=None):
    # dinp (..., 2F) overwritten; inp (..., 2F) as in forward; dout (..., F). With sg = sigmoid(gate):
    # dup = dout silu(gate); dgate = dout up sg (1 + gate (1 - sg)). scratch: 2 * dout.size elements
    F = dout.shape[-1]
    up, gate = inp[..., :F], inp[..., F:]
    dup, dgate = dinp[..., :F], dinp[..., F:]
    s = buf(scratch, (2,) + dout.shape, inp.dtype)
    sg, t = s[0], s[1]
    np.negative(gate, out=sg)
    np.exp(sg, out=sg)
    sg += 1.0
    np.reciprocal(sg, out=sg)                                # sigmoid(gate)
    np.multiply(gate, sg, out=t)
    np.multiply(dout, t, out=dup)                            # dout * silu(gate)
    np.subtract(1.0, sg, out=t)
    t *= gate
    t += 1.0
    t *= sg
    t *= up
    np.multiply(dout, t, out=dgate)
