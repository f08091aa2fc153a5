"""Linear layer: out = inp @ weight.T + bias, weight (OC, K) as in llm.c (PyTorch's nn.Linear layout)."""
import numpy as np

from ._scratch import buf


def matmul_forward(out, inp, weight, bias=None):
    # inp (..., K); weight (OC, K); bias (OC,) or None; out (..., OC)
    OC, K = weight.shape
    np.matmul(inp.reshape(-1, K), weight.T, out=out.reshape(-1, OC))
    if bias is not None:
        out += bias


def matmul_backward(dinp, dweight, dbias, dout, inp, weight, scratch=None, accumulate=True):
    # dinp (..., K) overwritten (None: not needed); dweight (OC, K) += (None: not needed, inp unused); dbias (OC,)
    # += (None: no bias); accumulate=False: dweight and dbias are overwritten instead (a step's first micro-batch)
    # scratch: OC*K + OC + N elements, N = rows (an added product is formed there first: NumPy's matmul has no
    # beta=1)
    OC, K = weight.shape
    d2 = dout.reshape(-1, OC)
    N = d2.shape[0]
    if dinp is not None:
        np.matmul(d2, weight, out=dinp.reshape(-1, K))
    s = buf(scratch, (OC * K + OC + N,), weight.dtype)
    if dweight is not None:
        tmp = s[:OC * K].reshape(OC, K) if accumulate else dweight
        np.matmul(d2.T, inp.reshape(-1, K), out=tmp)
        if accumulate:
            dweight += tmp
    if dbias is not None:
        colsum_add(dbias, d2, scratch=s[OC * K:], accumulate=accumulate)


def colsum_add(dbias, x, scratch=None, accumulate=True):
    # dbias (C,) += the column sums of x (..., C), as a GEMV with a vector of ones (3x np.add.reduce's speed);
    # accumulate=False: dbias = the sums. scratch: C + N elements, N = rows
    C = dbias.shape[0]
    x2 = x.reshape(-1, C)
    s = buf(scratch, (C + x2.shape[0],), x2.dtype)
    vb, ones = (s[:C] if accumulate else dbias), s[C:]
    ones[...] = 1.0
    np.matmul(ones, x2, out=vb)
    if accumulate:
        dbias += vb
