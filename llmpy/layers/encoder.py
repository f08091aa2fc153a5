"""Token + position embedding: out[b,t] = wte[tokens[b,t]] + wpe[t]."""
import numpy as np


def encoder_forward(out, tokens, wte, wpe):
    # out (B,T,C); tokens (B,T) int; wte (Vp,C), out's dtype or bf16 (a packed model's table: rows widened, exactly);
    # wpe (maxT,C), or None for a model without a position table
    T = tokens.shape[1]
    # ids are checked where they enter (data/loader.py); mode="clip" lets take write straight into out ("raise"
    # copies)
    if wte.dtype == out.dtype:
        np.take(wte, tokens, axis=0, out=out, mode="clip")
    else:
        out[...] = np.take(wte, tokens, axis=0, mode="clip")
    if wpe is not None:
        out += wpe[:T]


def encoder_backward(dwte, dwpe, dout, tokens):
    # dwte (Vp,C) +=, dwpe (maxT,C) += (None: no position table), dout (B,T,C), tokens (B,T)
    B, T, C = dout.shape
    for b in range(B if dwpe is not None else 0):  # B row-adds into (T,C): no (T,C) temporary
        dwpe[:T] += dout[b]
    # Scatter-add rows into the token table. ufunc.at applies repeats in index order: deterministic.
    np.add.at(dwte, tokens.reshape(-1), dout.reshape(B * T, C))
