"""llm.c's GPT-2 model header (`gpt2_124M.bin`): [0] magic 20240326, [1] version, [2] maxT, [3] V, [4] L, [5] NH,
[6] C, [7] Vp, the rest zero. Version 1 was the same without a padded vocabulary (no header[7], wte of V rows);
llm.c itself no longer reads it and neither do we: we reject it rather than guess, as we reject a version 3/5
header whose Vp is 0."""
from __future__ import annotations

import os

import numpy as np

from ...errors import UserError
from ...models.gpt2 import GPT2Config

MAGIC = 20240326


def parse_header(path: str | os.PathLike, h: np.ndarray, extra: bytes, versions) -> tuple[GPT2Config, int]:
    """(config, version) from the 256 header words (int64), after checking them (GPT-2 has no extra header);
    `versions`: the ones we read."""
    version = int(h[1])
    if version == 1:
        raise UserError(f"{path} is an llm.c model of version 1 (before the padded vocabulary), which llm.c no "
                        "longer reads either; re-export it with a current llm.c train_gpt2.py")
    if version not in versions:
        raise UserError(f"{path}: unsupported llm.c model version {version} (want 3 = fp32 or 5 = bf16)")
    maxT, V, L, NH, C, Vp = (int(x) for x in h[2:8])
    sizes = {"maxT": maxT, "V": V, "L": L, "NH": NH, "C": C}
    bad = [f"{k}={v}" for k, v in sizes.items() if v <= 0]
    if bad:
        raise UserError(f"{path}: llm.c header has non-positive sizes: {', '.join(bad)}")
    if Vp == 0:
        raise UserError(f"{path}: llm.c header (version {version}) has padded vocab size 0; "
                        "files of this version always record it, so the file is damaged")
    if Vp < V:
        raise UserError(f"{path}: llm.c header has padded vocab size {Vp} < vocab size {V}")
    if C % NH:
        raise UserError(f"{path}: llm.c header has channels {C} not divisible by heads {NH}")
    cfg = GPT2Config(max_seq_len=maxT, vocab_size=V, padded_vocab_size=Vp, num_layers=L, num_heads=NH, channels=C)
    return cfg, version


def header(cfg: GPT2Config, version: int) -> tuple[list[int], bytes]:
    """(the header words after which the rest are zero, no extra header)."""
    return [MAGIC, version, cfg.max_seq_len, cfg.vocab_size, cfg.num_layers, cfg.num_heads, cfg.channels,
            cfg.padded_vocab_size], b""
