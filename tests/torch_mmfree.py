"""A PyTorch re-implementation of the MatMul-free LM as the reference code computes it (ridgerchu/matmulfreellm,
`modeling_hgrn_bit.py`, `layers/hgrn_bit.py`, `ops/fusedbitnet.py`; formulas in docs/mmfree.md), for
tests only: fp32, autograd through the straight-through estimator (x + (q(x) - x).detach()), the recurrence a plain
loop. Parameters carry the HF checkpoint's key names, so a state dict of a released model loads as it is."""
import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-6


def rmsnorm(x, w, eps=EPS):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def quant_act(y):
    """int8 absmax per token, round half away from zero, back to y's scale."""
    s = 127.0 / y.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    z = y * s
    return (torch.sign(z) * torch.floor(z.abs() + 0.5)).clamp(-128, 127) / s


def quant_weight(w):
    """ternary absmean per matrix, torch.round (half to even), back to w's scale."""
    s = 1.0 / w.abs().mean().clamp(min=1e-5)
    return (w * s).round().clamp(-1, 1) / s


class BitLinear(nn.Module):
    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_out, n_in))
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(torch.ones(n_in))

    def forward(self, x):
        y = rmsnorm(x, self.norm.weight)
        yq = y + (quant_act(y) - y).detach()
        wq = self.weight + (quant_weight(self.weight) - self.weight).detach()
        return yq @ wq.t()


class Norm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return rmsnorm(x, self.weight)


class MLGRU(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.i_proj, self.f_proj, self.g_proj, self.o_proj = (BitLinear(d, d) for _ in range(4))
        self.g_norm = Norm(d)

    def forward(self, u, lower_bound):
        ai, af, ag = self.i_proj(u), self.f_proj(u), self.g_proj(u)
        f = torch.sigmoid(af)
        f = lower_bound + (1 - lower_bound) * f
        c = F.silu(ai) * (1 - f)
        h, hs = torch.zeros_like(c[:, 0]), []
        for t in range(u.shape[1]):
            h = f[:, t] * h + c[:, t]
            hs.append(h)
        h = torch.stack(hs, 1)
        return self.o_proj(self.g_norm(ag) * F.silu(h))


class GLU(nn.Module):
    def __init__(self, d, inter):
        super().__init__()
        self.gate_proj, self.down_proj = BitLinear(d, 2 * inter), BitLinear(inter, d)

    def forward(self, v):
        gate, up = self.gate_proj(v).chunk(2, -1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, d, inter):
        super().__init__()
        self.attn_norm, self.attn, self.mlp_norm, self.mlp = Norm(d), MLGRU(d), Norm(d), GLU(d, inter)

    def forward(self, h, lower_bound):
        h = h + self.attn(self.attn_norm(h), lower_bound)
        return h + self.mlp(self.mlp_norm(h))


class HGRNBitLM(nn.Module):
    def __init__(self, vocab, d, layers, inter):
        super().__init__()
        self.model = nn.Module()
        self.model.embeddings = nn.Embedding(vocab, d)
        self.model.lower_bounds = nn.Parameter(torch.zeros(layers, d))
        self.model.layers = nn.ModuleList(Block(d, inter) for _ in range(layers))
        self.model.norm = Norm(d)
        self.lm_head = BitLinear(d, vocab)

    def forward(self, ids):
        S = self.model.lower_bounds.softmax(0)
        lam = S.cumsum(0) - S[0]
        h = self.model.embeddings(ids)
        for l, block in enumerate(self.model.layers):
            h = block(h, lam[l])
        return self.lm_head(self.model.norm(h))
