"""metrics.jsonl (one JSON object per event) and the loss-curve PNG."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..formats.atomic import atomic_write, atomic_write_bytes


def read_events(path: str | os.PathLike) -> tuple[list[dict], int]:
    """(the events of a metrics.jsonl, how many lines were damaged and skipped): a line torn by a crash, bytes
    that are not UTF-8, JSON that is not an event object with a step >= 0 never stop a resume or a plot."""
    events, damaged = [], 0
    for line in Path(path).read_bytes().decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            ev = json.loads(line)
        except ValueError:
            ev = None
        step = ev.get("step") if isinstance(ev, dict) else None
        if isinstance(step, int) and not isinstance(step, bool) and step >= 0:
            events.append(ev)
        else:
            damaged += 1
    return events, damaged


class MetricsLog:
    """Appends one JSON line per event, flushed at once (a crash loses at most the line being written). Every
    event's "step" is the number of steps done: a train loss is logged at the step it was computed in (the first
    is 1), a val loss or task score at the steps done before it was computed (0: the initial weights).
    `done`: on resume, the steps the checkpoint has done; the events up to that point are kept (the train losses
    of steps 1..done, the evaluations before the done-th step: the resumed run writes the later ones again), read
    from `source` (the resumed run's metrics, when it continues into a new folder) or from `path`; `damaged`
    counts the lines that could not be read and were dropped."""

    def __init__(self, path: str | os.PathLike, done: int = 0, source: str | os.PathLike | None = None):
        self.path = Path(path)
        source = Path(source) if source is not None else self.path
        kept, self.damaged = [], 0
        if done and source.is_file():
            events, self.damaged = read_events(source)
            events = _steps_done(events)
            kept = [json.dumps(e) + "\n" for e in events
                    if e["step"] < done or (e["step"] == done and "train_loss" in e)]
        atomic_write_bytes(self.path, "".join(kept).encode())
        self._f = open(self.path, "a", buffering=1)

    def write(self, event: dict) -> None:
        self._f.write(json.dumps(event) + "\n")

    def events(self) -> list[dict]:
        self._f.flush()
        return read_events(self.path)[0]

    def close(self) -> None:
        self._f.close()


def _steps_done(events: list[dict]) -> list[dict]:
    """Events with their train losses numbered by steps done. Logs of earlier versions gave a train loss the number
    of steps done before its step (the first at 0, which no train loss has now): such a log is renumbered once, when
    a resume rewrites it."""
    if not any(e["step"] == 0 and "train_loss" in e for e in events):
        return events
    return [dict(e, step=e["step"] + 1) if "train_loss" in e else e for e in events]


def plot_losses(metrics_path: str | os.PathLike, png_path: str | os.PathLike) -> None:
    """Train loss per step and val loss at its evaluations, on one axis; with multiple-choice evaluations
    (`eval_task` events), their accuracy (acc_norm solid, acc dashed) per task on a second panel."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events, _ = read_events(metrics_path)

    def series(key, evs=events):
        return [(e["step"], e[key]) for e in evs if isinstance(e.get(key), (int, float))]
    train, val = series("train_loss"), series("val_loss")
    tasks = sorted({e["eval_task"] for e in events if isinstance(e.get("eval_task"), str)})
    fig, axes = plt.subplots(1, 2 if tasks else 1, figsize=(12 if tasks else 7, 4), dpi=110, squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train), lw=1, label="train")
    if val:
        ax.plot(*zip(*val), "o-", ms=3, label="val")
    ax.set_xlabel("steps done")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    if tasks:
        ax = axes[0][1]
        for i, task in enumerate(tasks):
            evs = [e for e in events if e.get("eval_task") == task]
            color = f"C{i}"
            for key, style in (("acc_norm", "o-"), ("acc", "x--")):
                pts = series(key, evs)
                if pts:
                    ax.plot(*zip(*pts), style, ms=3, color=color, label=f"{os.path.basename(task)} {key}")  # a task file: its name
        ax.set_xlabel("steps done")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(png_path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
