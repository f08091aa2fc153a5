"""LayerNorm over the channel axis: out = (x - mean) * rstd * w + b, rstd = 1/sqrt(var + eps), eps = 1e-5."""
import numpy as np

from ._scratch import buf

EPS = 1e-5


def layernorm_forward(out, mean, rstd, inp, weight, bias, eps=EPS):
    # inp, out (..., C); mean, rstd (...) saved for backward; weight, bias (C,)
    C = inp.shape[-1]
    np.einsum("...c->...", inp, out=mean)                     # (einsum: faster than np.mean over short rows)
    mean /= C
    np.subtract(inp, mean[..., None], out=out)               # out = x - mean
    np.einsum("...c,...c->...", out, out, out=rstd)          # sum of squares, no (..., C) temporary
    rstd /= C
    rstd += eps
    np.sqrt(rstd, out=rstd)
    np.reciprocal(rstd, out=rstd)
    out *= rstd[..., None]
    out *= weight
    out += bias


def layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd, scratch=None):
    # dinp (..., C) += (it is the residual stream's gradient); dweight, dbias (C,) +=
    # scratch: 2*N*C + C + 2*N elements, N = rows
    C = inp.shape[-1]
    N = inp.size // C
    x, dy = inp.reshape(N, C), dout.reshape(N, C)
    mu, rs = mean.reshape(N, 1), rstd.reshape(N, 1)
    s = buf(scratch, (2 * N * C + C + 2 * N,), inp.dtype)
    norm, dnorm = s[:N * C].reshape(N, C), s[N * C:2 * N * C].reshape(N, C)
    vc, a, b = s[2 * N * C:2 * N * C + C], s[2 * N * C + C:2 * N * C + C + N], s[2 * N * C + C + N:]
    np.subtract(x, mu, out=norm)
    norm *= rs                                               # normalised input
    np.einsum("nc->c", dy, out=vc)
    dbias += vc
    np.einsum("nc,nc->c", norm, dy, out=vc)
    dweight += vc
    np.multiply(dy, weight, out=dnorm)                       # gradient w.r.t. the normalised input
    np.einsum("nc->n", dnorm, out=a)
    np.einsum("nc,nc->n", dnorm, norm, out=b)
    a /= C
    b /= C
    dnorm -= a[:, None]
    norm *= b[:, None]
    dnorm -= norm
    dnorm *= rs
    dinp.reshape(N, C)[...] += dnorm
