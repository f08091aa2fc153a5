"""Training: `config` (TrainConfig, every setting and its default), `loop` (set-up, resume, the step loop, the
finish), `step` (one optimizer step, graph-replayable), `optim` (AdamW, learning-rate schedules), `checkpointing`
(the training state on disk, and what a resume may do), `metrics` (metrics.jsonl and the loss plot), `setup` (initial
weights, data, warnings), `rundir` (the run folder's lock, orphans, config.json), `progress` (bar, step lines,
summary)."""
from .config import TrainConfig
from .loop import TrainResult, run

__all__ = ["TrainConfig", "TrainResult", "run"]
