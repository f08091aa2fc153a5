"""The PyTorch baseline for Llama 3 GPU throughput, as a careful PyTorch user writes it (torchtitan's structure):
nn.Embedding / nn.Linear(bias=False) modules, RMSNorm, RoPE with Llama 3.1 scaling (real-valued, Meta's pairing),
grouped-query attention through F.scaled_dot_product_attention(..., is_causal=True, enable_gqa=True) (no repeated
K/V), SwiGLU, tied or untied head; trained with bf16 autocast over fp32 weights, fused AdamW (weight decay on the
>= 2-D tensors), clip 1.0 and torch.compile. Benchmarks only; never imported by llmpy."""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def rope_cos_sin(cfg):
    from llmpy.layers.rope import rope_frequencies  # the same frequencies (a fact of the model, not llmpy's code)
    f = rope_frequencies(cfg.head_size, cfg.rope_theta, cfg.rope_factor, cfg.rope_low_freq_factor,
                         cfg.rope_high_freq_factor, cfg.rope_original_context)
    ang = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float32), torch.tensor(np.asarray(f)))
    return torch.cos(ang), torch.sin(ang)  # (maxT, hs/2)


def rope(x, cos, sin):
    # x (B, T, heads, hs), pairs (x[2i], x[2i+1]) rotated by t f_i
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], -1).flatten(-2).type_as(x)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C, d, F_ = cfg.channels, cfg.head_size, cfg.ffn_hidden
        self.H, self.K, self.d, self.eps = cfg.num_heads, cfg.num_kv_heads, d, cfg.norm_eps
        self.wq, self.wk = nn.Linear(C, self.H * d, bias=False), nn.Linear(C, self.K * d, bias=False)
        self.wv, self.wo = nn.Linear(C, self.K * d, bias=False), nn.Linear(self.H * d, C, bias=False)
        self.w1, self.w3 = nn.Linear(C, F_, bias=False), nn.Linear(C, F_, bias=False)
        self.w2 = nn.Linear(F_, C, bias=False)
        self.attn_norm, self.ffn_norm = nn.RMSNorm(C, eps=self.eps), nn.RMSNorm(C, eps=self.eps)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        h = self.attn_norm(x)
        q = rope(self.wq(h).view(B, T, self.H, self.d), cos, sin).transpose(1, 2)
        k = rope(self.wk(h).view(B, T, self.K, self.d), cos, sin).transpose(1, 2)
        v = self.wv(h).view(B, T, self.K, self.d).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.wo(y.transpose(1, 2).reshape(B, T, -1))
        h = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class TorchLlama(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C, L = cfg.channels, cfg.num_layers
        self.tok = nn.Embedding(cfg.padded_vocab_size, C)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(L))
        self.norm = nn.RMSNorm(C, eps=cfg.norm_eps)
        self.out = nn.Linear(C, cfg.padded_vocab_size, bias=False)
        if cfg.tied:
            self.out.weight = self.tok.weight
        cos, sin = rope_cos_sin(cfg)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * L) if name.endswith(("wo.weight", "w2.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx, targets):
        T = idx.shape[1]
        x = self.tok(idx)
        cos, sin = self.cos[:T], self.sin[:T]
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = self.out(self.norm(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))

    def optimizer(self, lr, weight_decay=0.1):
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=True)
