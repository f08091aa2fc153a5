"""The MatMul-free LM's token mixer, MLGRU (docs/mmfree.md), around its three input projections:

  f = sigmoid(a_f), raised by the layer's lower bound lam: f = lam + (1 - lam) f   (lam = 0 in layer 0)
  c = silu(a_i) (1 - f);  h_t = f_t h_{t-1} + c_t  (h_0 = the state: zeros, or a decoder's)
  o = RMSNorm(a_g; gamma, eps) * (h sigmoid(h))   (the norm on the gate, SiLU on the state)
The recurrence is elementwise over channels (heads are only a reshape). The lower bounds of all layers come from one
(L, d) parameter P: lam = cumsum(softmax(P over layers)) - softmax(P)_0.
"""
import numpy as np

EPS = 1e-6


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _gates(ai, af, lam):
    f = _sigmoid(af)
    f = lam + (1.0 - lam) * f
    return f, ai * _sigmoid(ai) * (1.0 - f)


def mlgru_forward(o, h, rstd, ai, af, ag, lam, gamma, h0=None, eps=EPS):
    # o (B, T, d); h (B, T, d) every state, saved; rstd (B, T) of the gate norm, saved; ai, af, ag (B, T, d);
    # lam (d,); gamma (d,); h0 (B, d) or None
    B, T, d = ai.shape
    f, c = _gates(ai, af, lam)
    prev = np.zeros((B, d), h.dtype) if h0 is None else h0
    for t in range(T):  # sequential; the GPU runs it as a parallel (associative) scan
        h[:, t] = f[:, t] * prev + c[:, t]
        prev = h[:, t]
    rstd[...] = 1.0 / np.sqrt((ag * ag).mean(axis=-1) + eps)
    o[...] = ag * rstd[..., None] * gamma * (h * _sigmoid(h))


def mlgru_backward(dai, daf, dag, dlam, dgamma, do, ai, af, ag, lam, gamma, h, rstd):
    # dai, daf, dag (B, T, d) overwritten; dlam (d,) +=; dgamma (d,) +=; do (B, T, d); the rest as saved
    B, T, d = ai.shape
    f, _ = _gates(ai, af, lam)
    sh = _sigmoid(h)
    ah = ag * rstd[..., None]
    z = ah * gamma
    dh = do * z * (sh + h * sh * (1.0 - sh))            # through o = z silu(h)
    delta = np.empty_like(dh)                           # dL/dh_t, summed back through the recurrence
    nxt = np.zeros((B, d), dh.dtype)
    for t in reversed(range(T)):
        delta[:, t] = dh[:, t] + nxt
        nxt = f[:, t] * delta[:, t]
    hprev = np.concatenate([np.zeros((B, 1, d), h.dtype), h[:, :-1]], axis=1)
    si = _sigmoid(ai)
    df = delta * hprev - ai * si * delta                # h_t = f h_{t-1} + silu(a_i)(1 - f)
    dai[...] = si * (1.0 + ai * (1.0 - si)) * (1.0 - f) * delta
    sf = _sigmoid(af)
    daf[...] = df * (1.0 - lam) * sf * (1.0 - sf)
    dlam += (df * (1.0 - sf)).sum(axis=(0, 1))
    dz = do * h * sh
    dgamma += (dz * ah).sum(axis=(0, 1))
    u = gamma * dz
    dag[...] = rstd[..., None] * (u - ah * (ah * u).mean(axis=-1, keepdims=True))


def lower_bounds_forward(lam, P):
    # lam (L, d) = cumsum(S) - S_0, S = softmax(P) over the layer axis; P (L, d)
    e = np.exp(P - P.max(axis=0, keepdims=True))
    S = e / e.sum(axis=0, keepdims=True)
    lam[...] = np.cumsum(S, axis=0) - S[0]


def lower_bounds_backward(dP, dlam, P):
    # dP (L, d) +=; dlam (L, d)
    e = np.exp(P - P.max(axis=0, keepdims=True))
    S = e / e.sum(axis=0, keepdims=True)
    dS = np.cumsum(dlam[::-1], axis=0)[::-1].copy()    # dS_j = sum_{l >= j} dlam_l ...
    dS[0] -= dlam.sum(axis=0)                           # ... minus every dlam_l through the - S_0
    dP += S * (dS - (S * dS).sum(axis=0, keepdims=True))
