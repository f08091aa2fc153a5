"""A nanoGPT-style GPT-2 in PyTorch: the baseline for benchmarks and the oracle for tests. Never imported by
llmpy. Parameter names and layouts follow llmpy's (llm.c's) 16 tensors, so weights load without renaming."""
import math

import torch
import torch.nn.functional as F


class TorchGPT2(torch.nn.Module):
    def __init__(self, cfg, params=None, dtype=torch.float32):
        super().__init__()
        self.cfg = cfg
        from llmpy.models.gpt2 import spec
        for name, shape in ((s.name, s.shape) for s in spec(cfg)):
            t = torch.zeros(shape, dtype=dtype) if params is None else torch.tensor(params[name], dtype=dtype)
            self.register_parameter(name, torch.nn.Parameter(t))
        if params is None:
            self.reset_parameters()

    def reset_parameters(self):
        L = self.cfg.num_layers
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.startswith("ln") and name.endswith("w"):
                    p.fill_(1.0)
                elif name.endswith("b"):
                    p.zero_()
                else:
                    std = 0.02 / math.sqrt(2 * L) if name in ("attprojw", "fcprojw") else 0.02
                    p.normal_(0.0, std)
            self.wte[self.cfg.vocab_size:].zero_()

    def forward(self, idx, targets=None):
        cfg = self.cfg
        B, T = idx.shape
        C, NH = cfg.channels, cfg.num_heads
        x = self.wte[idx] + self.wpe[:T]
        for l in range(cfg.num_layers):
            h = F.layer_norm(x, (C,), self.ln1w[l], self.ln1b[l], 1e-5)
            q, k, v = F.linear(h, self.qkvw[l], self.qkvb[l]).split(C, dim=2)
            q, k, v = (t.view(B, T, NH, C // NH).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            y = y.transpose(1, 2).contiguous().view(B, T, C)
            x = x + F.linear(y, self.attprojw[l], self.attprojb[l])
            h = F.layer_norm(x, (C,), self.ln2w[l], self.ln2b[l], 1e-5)
            h = F.gelu(F.linear(h, self.fcw[l], self.fcb[l]), approximate="tanh")
            x = x + F.linear(h, self.fcprojw[l], self.fcprojb[l])
        x = F.layer_norm(x, (C,), self.lnfw, self.lnfb, 1e-5)
        logits = F.linear(x, self.wte)
        if targets is None:
            return logits, None
        V = cfg.vocab_size  # padded columns never receive probability
        loss = F.cross_entropy(logits[..., :V].reshape(-1, V).float(), targets.reshape(-1))
        return logits, loss

    def optimizer(self, lr, betas, eps, weight_decay, fused=False):
        from llmpy.models.gpt2 import spec
        decayed = {s.name for s in spec(self.cfg) if s.decay}  # the same tensors as llmpy's AdamW
        decay = [p for n, p in self.named_parameters() if n in decayed]
        other = [p for n, p in self.named_parameters() if n not in decayed]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)
