"""Where llmpy keeps downloads and prepared data."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError


def cache_dir() -> Path:
    """`$LLMPY_CACHE` if set, else `~/.cache/llmpy`; created on first use."""
    env = os.environ.get("LLMPY_CACHE")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "llmpy"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the cache folder {path}: {e.strerror} (set LLMPY_CACHE to another folder)")
    return path
