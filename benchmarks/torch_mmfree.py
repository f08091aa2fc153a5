"""The MatMul-free LM baseline: the reference implementation itself (ridgerchu/matmulfreellm's `mmfreelm` package,
HGRNBitForCausalLM with its fused Triton BitLinear, recurrence and cross-entropy), run as its authors ship it (no
torch.compile), with bf16 autocast over fp32 weights, fused AdamW (weight decay on the >= 2-D tensors), clip 1.0.
Benchmarks only; never imported by llmpy, never copied into this repository.

The reference code is read from an ignored folder: $LLMPY_MMFREE_REF, default build/ref/mmfreelm (e.g. `git archive`
of the upstream repository's mmfreelm/). It needs torch, triton, transformers and einops. It does not run on
Triton 3.x as published (`tl.math.round` is gone there): we run a temporary copy in which that call is
`tl.extra.cuda.libdevice.round` (the same rounding, half away from zero), the only change."""
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
COMPILE = False  # as the authors run it


def import_reference():
    src = Path(os.environ.get("LLMPY_MMFREE_REF", ROOT / "build" / "ref" / "mmfreelm"))
    if not (src / "__init__.py").is_file():
        raise SystemExit(f"the reference's mmfreelm package is not at {src} (set LLMPY_MMFREE_REF)")
    tmp = Path(tempfile.mkdtemp(prefix="mmfreelm-"))
    shutil.copytree(src, tmp / "mmfreelm")
    for f in (tmp / "mmfreelm").rglob("*.py"):
        text = f.read_text()
        if "tl.math.round(" in text:
            f.write_text(text.replace("tl.math.round(", "tl.extra.cuda.libdevice.round("))
    sys.path.insert(0, str(tmp))
    import mmfreelm
    from mmfreelm.models.hgrn_bit.configuration_hgrn_bit import HGRNBitConfig
    return mmfreelm.HGRNBitForCausalLM, HGRNBitConfig


class TorchMMFree(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        Model, Config = import_reference()
        self.model = Model(Config(vocab_size=cfg.vocab_size, hidden_size=cfg.channels,
                                  num_hidden_layers=cfg.num_layers, intermediate_size=cfg.ffn_hidden,
                                  max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                                  use_cache=False))

    def forward(self, x, y):
        # the reference shifts its labels itself (the last position ignored): pass the inputs as labels
        return self.model(input_ids=x, labels=x).loss

    def optimizer(self, lr, weight_decay=0.1):
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=True)
