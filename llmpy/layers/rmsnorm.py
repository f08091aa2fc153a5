"""RMSNorm over the channel axis (Llama): out = x * rstd * w, rstd = 1/sqrt(mean(x^2) + eps); no mean, no bias.
The statistic is kept in the stat dtype (fp32 on the GPU) for backward."""
import numpy as np

from ._scratch import buf

EPS = 1e-5  # Llama 3's norm_eps


def rmsnorm_forward(out, rstd, inp, weight, eps=EPS):
    # inp, out (..., C); rstd (...) saved for backward; weight (C,)
    C = inp.shape[-1]
    np.einsum("...c,...c->...", inp, inp, out=rstd)          # sum of squares, no (..., C) temporary
    rstd /= C
    rstd += eps
    np.sqrt(rstd, out=rstd)
    np.reciprocal(rstd, out=rstd)
    np.multiply(inp, rstd[..., None], out=out)
    out *= weight


def rmsnorm_backward(dinp, dweight, dout, inp, weight, rstd, scratch=None):
    # dinp (..., C) += (the residual stream's gradient); dweight (C,) +=. With xh = x rstd, u = w * dout:
    # dx = rstd (u - xh mean(u xh)); dw = sum over rows of dout * xh. scratch: 2*N*C + C + N elements, N = rows
    C = inp.shape[-1]
    N = inp.size // C
    x, dy, rs = inp.reshape(N, C), dout.reshape(N, C), rstd.reshape(N, 1)
    s = buf(scratch, (2 * N * C + C + N,), inp.dtype)
    xh, u = s[:N * C].reshape(N, C), s[N * C:2 * N * C].reshape(N, C)
    vc, a = s[2 * N * C:2 * N * C + C], s[2 * N * C + C:]
    np.multiply(x, rs, out=xh)
    np.einsum("nc,nc->c", xh, dy, out=vc)
    dweight += vc
    np.multiply(dy, weight, out=u)
    np.einsum("nc,nc->n", u, xh, out=a)
    a /= C
    xh *= a[:, None]
    u -= xh
    u *= rs
    dinp.reshape(N, C)[...] += u
