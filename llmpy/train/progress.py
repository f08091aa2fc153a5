"""What a person sees while a run trains: on a terminal a tqdm bar (loss, tokens/s, lr, ETA); without one (stderr is
not a terminal, or --no-progress) one llm.c-style line per step on stdout; at the end a summary.

Each step's time is its own: from when it could start (launched, and the previous step done) to when its result
existed; evaluation, checkpoints and samples between steps are not in it (train/step.py says how the time a
step is done is known on each device).
"""
from __future__ import annotations

import sys

PEAK_FLOPS = 989e12  # H100/H200 SXM dense bf16 (llm.c's MFU convention)


class Progress:
    def __init__(self, *, start: int, last: int, steps: int, show: bool, lines: bool, tokens_per_step: int,
                 flops_per_token: float | None = None, world: int = 1):
        """start, last: the steps done when this invocation begins and when it will end, of `steps` planned.
        show: this process prints (rank 0). flops_per_token: the model's training FLOPs per token (GPU runs print
        MFU), world: GPUs sharing the tokens."""
        self.steps, self.show, self.lines = steps, show, lines
        self.tokens_per_step, self.flops, self.world = tokens_per_step, flops_per_token, world
        self.timed: list[tuple[int, float]] = []  # (step number, seconds)
        self.bar = None
        if show and not lines:
            from tqdm import tqdm
            self.bar = tqdm(total=last, initial=start, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr)

    def mfu(self, tokens_per_s: float) -> float | None:
        return None if not self.flops else self.flops * tokens_per_s / self.world / PEAK_FLOPS

    def step(self, step: int, loss: float, norm: float, lr: float, seconds: float) -> float:
        """Shows step number `step` (the steps done once it is: the first is 1) and returns its tokens/s."""
        tps = self.tokens_per_step / max(seconds, 1e-9)
        self.timed.append((step, seconds))
        mfu = self.mfu(tps)
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f} | {tps:,.0f} tok/s | lr {lr:.2e}", refresh=False)
            self.bar.update(1)  # refreshes with the postfix just set
        elif self.show:
            print(f"step {step}/{self.steps} | loss {loss:.4f} | norm {norm:.2f} | lr {lr:.1e} | "
                  f"{seconds * 1e3:.1f} ms | {tps:,.0f} tok/s" + (f" | MFU {mfu:.1%}" if mfu is not None else ""),
                  flush=True)
        return tps

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        elif self.show:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def summary(self, wall: float, val_losses: list[tuple[int, float]]) -> str:
        """Steps run, wall time, mean tokens/s of the timed steps (the first is left out when there are others:
        it warms up, and on a GPU compiles), MFU on a GPU, the best val loss."""
        parts = [f"{len(self.timed)} steps in {wall:.1f} s"]
        timed = self.timed[1:] if len(self.timed) > 1 else self.timed
        if timed:
            tps = self.tokens_per_step * len(timed) / max(sum(s for _, s in timed), 1e-9)
            first, last = timed[0][0], timed[-1][0]
            parts.append(f"{tps:,.0f} tok/s (mean of step{'s' if last > first else ''} {first}"
                         + (f"..{last}" if last > first else "") + ", evaluation and checkpoints left out)")
            if self.mfu(tps) is not None:
                parts.append(f"MFU {self.mfu(tps):.1%}")
        if val_losses:
            step, loss = min(val_losses, key=lambda sv: sv[1])
            parts.append(f"best val loss {loss:.4f} (step {step})")
        return "summary: " + " | ".join(parts)
