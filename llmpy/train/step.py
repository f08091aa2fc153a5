"""One optimizer step, the same on every backend: grad_accum micro-batches (forward with the fused classifier,
the loss summed on the device, backward), then the gradient norm and AdamW, then the step's bookkeeping.

On CUDA each kind of micro-batch (the first, which writes the gradients instead of adding to them; a middle one;
the last, which also reduces them over ranks) and the update are captured once as CUDA graphs and replayed: a
step then costs the host a token upload per micro-batch and a few graph launches. The first step runs eagerly (it
compiles the kernels and makes the cuBLASLt/cuDNN plans, which cannot happen during capture); the graphs replay
exactly the same kernels, so graph and eager runs give bitwise identical results.
"""
from __future__ import annotations

import time

import numpy as np

from ..distributed.dataparallel import GradReducer


class TrainStep:
    def __init__(self, model, opt, grad_accum: int = 1, *, grad_clip: float = 0.0, graph: bool = True,
                 comm=None):
        self.model, self.opt, self.be = model, opt, model.be
        self.A, self.grad_clip = grad_accum, grad_clip
        self.comm = comm if comm is not None and comm.world > 1 else None
        world = self.comm.world if self.comm else 1
        # d(step loss)/d(each token's loss); the 1/world makes the ranks' summed gradients their average
        self.scale = 1.0 / (model.B * model.T * grad_accum * world)
        self.loss_out = self.be.zeros(1, self.be.acc_dtype)
        self.use_graph = graph and self.be.name == "cuda"
        self.reducer = GradReducer(self) if self.comm else None
        # the step's micro-batches: (first, last) -> the function that runs one (a CUDA graph from the second step)
        self._micro_fns = {k: (lambda k=k: self._micro(*k)) for k in self._variants()}
        self._update_fn = self._update
        self.steps_run = 0
        # --dtype fp8: the model registered FP8 products; their weights' FP8 copies are made now (a fresh run: each
        # scaled by its own amax) and after every update
        self.fp8 = getattr(model, "fp8_products", 0) > 0
        if self.fp8:
            self.be.fp8_quantize_weights()

    def _variants(self) -> list[tuple[bool, bool]]:
        """(first, last) of the step's micro-batches, each kind once."""
        return [(True, True)] if self.A == 1 else [(True, False)] + [(False, False)] * (self.A > 2) + [(False, True)]

    def _micro(self, first: bool, last: bool):
        m = self.model
        # the first micro-batch writes the gradients instead of adding to zeros (ZeRO-2 zeroes its rotating buffers
        # layer by layer as before)
        fresh = first and m.zero != 2
        if first and self.fp8:
            self.be.fp8_begin_step()  # the step's amax and clamp count start at zero
        if fresh:
            self.be.fresh_grads(m.grads.flat)
        m.forward(grad_scale=self.scale, return_loss=False)
        self.be.loss_accumulate(m.loss_acc, m.stats["losses"], self.scale)
        # data parallel: reduce the gradients of the step's last micro-batch (ZeRO-2: of every micro-batch,
        # into the rank's shard, since its gradient buffers only hold two layers)
        reduce = self.reducer is not None and (last or m.zero == 2)
        m.backward(self.reducer if reduce else None)
        if fresh:
            self.be.settle_grads()

    def _update(self):
        m, be = self.model, self.be
        if self.comm is not None:
            self.comm.all_reduce(m.loss_acc)  # the step's mean loss over all ranks (1/world is in the scale)
        self.opt.apply()
        if self.fp8:  # the step's amax (the largest over the ranks) into the scales; the new weights quantized
            if self.comm is not None:
                self.comm.all_max(be.fp8.pending)
            be.fp8_end_step()
        be.copy_(self.loss_out, m.loss_acc)
        be.fill_zero(m.loss_acc)
        if m.zero == 2:  # (the other layouts' gradients count as zero at the next step's first micro-batch)
            m.zero_grad()
            be.fill_zero(self.opt.gshard.flat)

    def launch(self, batches, lr: float):
        """Enqueues one step; returns at once with a handle whose `.result()` gives (mean loss, gradient norm).
        batches: grad_accum pairs of host (B, T) int arrays. The host may prepare and launch the next step
        before reading this one's result (the GPU then never waits for the host). AdamW skips the update when
        the loss or the norm is not finite."""
        t0 = time.perf_counter()
        if self.use_graph and self.steps_run == 1:
            self._micro_fns = {k: self.be.capture(lambda k=k: self._micro(*k)) for k in self._variants()}
            self._update_fn = self.be.capture(self._update)
        self.opt.set_step(lr, self.grad_clip)
        n = 0  # batches may be a generator over one loader buffer: consume each before drawing the next
        for x, y in batches:
            self.model.set_batch(x, y)
            n += 1
            self._micro_fns[(n == 1, n == self.A)]()
        if n != self.A:
            raise ValueError(f"expected {self.A} micro-batches, got {n}")
        self._update_fn()
        self.steps_run += 1
        extra = (self.be.fp8.overflows,) if self.fp8 else ()
        return _StepResult(self.be.async_read(self.loss_out, self.opt.norm, *extra), t0,
                           asynchronous=self.be.name == "cuda")

    def run(self, batches, lr: float) -> tuple[float, float]:
        """launch + result."""
        return self.launch(batches, lr).result()


class _StepResult:
    """started: when launch() began. ready: when the step's result existed, as the host sees it: the CPU computes
    inside launch(), so that is when launch() returned; a GPU step is known done when result() stops waiting
    (the loop reads step s after launching s+1, so the host is then waiting for the device)."""

    def __init__(self, readback, started: float, asynchronous: bool):
        self._rb, self.started, self._async = readback, started, asynchronous
        self.ready = None if asynchronous else time.perf_counter()
        self.fp8_clamped = None  # --dtype fp8: FP8 operand values clamped to their format's largest in the step

    def result(self) -> tuple[float, float]:
        loss, norm, *extra = self._rb.result()
        if self._async:
            self.ready = time.perf_counter()
        if extra:
            self.fp8_clamped = int(np.asarray(extra[0])[0])
        return float(np.asarray(loss)[0]), float(np.asarray(norm)[0])
