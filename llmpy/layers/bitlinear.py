"""BitLinear (the MatMul-free LM's ternary linear layer, docs/mmfree.md): an RMSNorm inside, per-token
int8 activations, one ternary weight matrix with one scale, and the straight-through backward of the reference.

Forward, x (M, K), W (N, K), gamma (K,):
  rstd = 1/sqrt(mean_k x^2 + eps); y = x rstd gamma
  s_x = 127 / max(max_k |y|, 1e-5) per row; q_x = clamp(round(y s_x), -128, 127)   (round half away from zero)
  s_w = 1 / max(mean |W|, 1e-5);            q_w = clamp(round(W s_w), -1, 1)      (round half to even)
  out = (q_x q_w^T) / (s_x s_w): an exact integer product, then one rescale per output.
Packed (inference, formats/ternary.py): q_w as codes, 5 per byte (base 3) or 4 per byte (2 bits), and s_w stored;
bitlinear_packed_forward gives the latent forward's result bit for bit: for a few rows (decoding) straight from the
codes (code_products), else unpacking a block of q_w's rows at a time.
Backward (straight-through: both roundings count as identity, the scales as constants; no clip mask):
  dyq = dout Wq (Wq = q_w / s_w); dW = dout^T yq (yq = q_x / s_x, recomputed); dgamma = sum_rows dyq xh (xh = x rstd);
  dx = rstd (gamma dyq - xh mean_k(xh gamma dyq)).
"""
import numpy as np

EPS = 1e-6


def round_half_away(x):
    """Round to nearest, ties away from zero (CUDA's roundf; NumPy's round is half to even)."""
    return np.copysign(np.floor(np.abs(x) + 0.5), x)


def quantize_weight(w, rows=None):
    """(q_w in {-1, 0, 1} as w's dtype, s_w): per-matrix absmean scale, round half to even. rows: how many leading
    rows count for the mean (the rest pad a vocabulary and are zero; None: all)."""
    n = w.size if rows is None else rows * w.shape[-1]
    s = 1.0 / max(float(np.abs(w).sum(dtype=np.float64)) / n, 1e-5)
    return np.clip(np.rint(w * w.dtype.type(s)), -1, 1), s


def quantize_activations(y):
    """(q_x in -128..127 as y's dtype, s_x (M, 1)): per-row absmax scale to 127, round half away from zero."""
    s = 127.0 / np.maximum(np.abs(y).max(axis=-1, keepdims=True), 1e-5)
    return np.clip(round_half_away(y * s), -128, 127), s


PER_BYTE = {"base3": 5, "2bit": 4}


def _code_tables():
    """byte -> its codes as int8 (little end first), per packing; a byte that is no code decodes to 2."""
    b = np.arange(256)
    two = np.array([0, 1, 2, -1], np.int8)[(b[:, None] >> (2 * np.arange(4))) & 3]
    three = ((b[:, None] // 3 ** np.arange(5)) % 3 - 1).astype(np.int8)
    three[b > 242] = 2
    return {"2bit": two, "base3": three}


CODES = _code_tables()
TRITS = {k: v.T.astype(np.float32) for k, v in CODES.items()}  # (per byte, 256): the trits of every byte value
CODE_ROWS = 4  # bitlinear_packed_forward of up to this many rows runs from the codes (code_products)


def unpack_codes(codes, K, packing):
    """q_w int8 (..., K) from codes uint8 (..., ceil(K / per_byte))."""
    return CODES[packing][codes].reshape(*codes.shape[:-1], -1)[..., :K]


def _normed(x, gamma, eps):
    rstd = 1.0 / np.sqrt((x * x).mean(axis=-1) + eps)
    return x * rstd[:, None] * gamma, rstd


def bitlinear_forward(out, rstd, inp, weight, gamma, eps=EPS, w_rows=None):
    # out (..., N); rstd (...) saved; inp (..., K); weight (N, K); gamma (K,); w_rows: see quantize_weight
    K = inp.shape[-1]
    x = inp.reshape(-1, K)
    y, r = _normed(x, gamma, eps)
    rstd.reshape(-1)[...] = r
    qx, sx = quantize_activations(y)
    qw, sw = quantize_weight(weight, w_rows)
    out.reshape(-1, weight.shape[0])[...] = (qx @ qw.T) / (sx * out.dtype.type(sw))


def bitlinear_backward(dinp, dweight, dgamma, dout, inp, weight, gamma, rstd, w_rows=None):
    # dinp (..., K) += ; dweight (N, K) +=; dgamma (K,) +=; dout (..., N); inp, weight, gamma, rstd as in forward
    N, K = weight.shape
    x, dy, r = inp.reshape(-1, K), dout.reshape(-1, N), rstd.reshape(-1, 1)
    qw, sw = quantize_weight(weight, w_rows)
    dyq = dy @ (qw / weight.dtype.type(sw))             # straight through the activation quantizer
    xh = x * r
    qx, sx = quantize_activations(xh * gamma)
    dweight += dy.T @ (qx / sx)                         # the quantized activations the forward multiplied
    dgamma += (dyq * xh).sum(axis=0)
    u = gamma * dyq
    dinp.reshape(-1, K)[...] += r * (u - xh * (xh * u).mean(axis=-1, keepdims=True))


def code_products(qx, codes, packing):
    """qx (M, K) @ q_w.T (M, N) straight from q_w's codes uint8 (N, nb): for each row of qx, the dot products of
    its values under each code byte's columns with the trits of all 256 byte values form a table (nb, 256); an
    output is the sum of its bytes' entries. Every term is an integer of at most 128 K < 2^24, so the fp32 sums are
    exact, as the unpacked product's are: the same bits. It reads the codes once a row and unpacks nothing."""
    N, nb = codes.shape
    per, (M, K) = PER_BYTE[packing], qx.shape
    x = np.zeros((M, nb * per), qx.dtype)
    x[:, :K] = qx
    tables = x.reshape(M, nb, per) @ TRITS[packing].astype(qx.dtype)    # (M, nb, 256)
    index = codes + (256 * np.arange(nb, dtype=np.intp))                # (N, nb): entries of the flat table
    out = np.empty((M, N), qx.dtype)
    for m in range(M):  # (einsum: 3x np.sum over short rows)
        np.einsum("ij->i", np.take(tables[m].reshape(-1), index), out=out[m])
    return out


def bitlinear_packed_forward(out, rstd, inp, codes, scale, K, packing, gamma, eps=EPS, block=2048):
    # out (..., N); rstd (...); inp (..., K); codes uint8 (N, ceil(K / per_byte)); scale s_w (a float32); gamma (K,)
    x = inp.reshape(-1, K)
    y, r = _normed(x, gamma, eps)
    rstd.reshape(-1)[...] = r
    qx, sx = quantize_activations(y)
    o = out.reshape(-1, codes.shape[0])
    den = sx * out.dtype.type(scale)
    if x.shape[0] <= CODE_ROWS:
        o[...] = code_products(qx, codes, packing) / den
        return
    for r0 in range(0, codes.shape[0], block):  # a block of rows of q_w at a time: the scratch stays small
        qw = unpack_codes(codes[r0:r0 + block], K, packing).astype(out.dtype)
        o[:, r0:r0 + block] = (qx @ qw.T) / den
