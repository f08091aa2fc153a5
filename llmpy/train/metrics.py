"""metrics.jsonl (one JSON object per event) and the loss-curve PNG."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..formats.atomic import atomic_write, atomic_write_bytes


class MetricsLog:
    """Appends one JSON line per event, flushed at once (a crash loses at most the line being written).
    `keep_before`: on resume, events of steps >= it are dropped first, since the resumed run writes them again."""

    def __init__(self, path: str | os.PathLike, keep_before: int = 0):
        self.path = Path(path)
        kept = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue  # a line torn by a crash
                if keep_before and ev.get("step", 0) < keep_before:
                    kept.append(line + "\n")
        atomic_write_bytes(self.path, "".join(kept).encode())
        self._f = open(self.path, "a", buffering=1)

    def write(self, event: dict) -> None:
        self._f.write(json.dumps(event) + "\n")

    def events(self) -> list[dict]:
        self._f.flush()
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def close(self) -> None:
        self._f.close()


def plot_losses(metrics_path: str | os.PathLike, png_path: str | os.PathLike) -> None:
    """Train loss per step and val loss at its evaluations, on one axis."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    train = [(e["step"], e["train_loss"]) for e in events if "train_loss" in e]
    val = [(e["step"], e["val_loss"]) for e in events if "val_loss" in e]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), lw=1, label="train")
    if val:
        ax.plot(*zip(*val), "o-", ms=3, label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(png_path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
