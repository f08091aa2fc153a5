"""GPU training throughput and memory: llmpy's CUDA backend vs a PyTorch baseline, same GPU, model and batch.

    python benchmarks/gpu.py --model d12 --batch 64 --seq 1024 [--steps 30] [--warmup 10] [--recompute 0]
    python benchmarks/gpu.py --model llama3.2:1b --batch 8 --seq 2048
    python benchmarks/gpu.py --model mmfree:370m --batch 8 --seq 2048

Both sides train the model (any registered name) on random tokens, bf16 compute, fp32 AdamW (weight decay 0.1 on
matrices), global-norm clip 1.0. The baseline is PyTorch with bf16 autocast, SDPA (flash) attention, fused AdamW,
torch.compile: for GPT-2 nanoGPT's model (benchmarks/nanogpt.py), for Llama 3 a torchtitan-style one with
enable_gqa (benchmarks/torch_llama.py); for the MatMul-free LM the reference implementation itself, uncompiled as
its authors run it (benchmarks/torch_mmfree.py). llmpy runs its trainer's way: CUDA graphs, the host
launching step i+1 before reading step i's loss. Each side runs in its own process (clean peak
memory); warm-up steps are dropped and the median step time of the rest is reported. Peak memory is the
device memory in use by the process at its peak as the framework reports it (llmpy: CuPy's pool plus the
cuBLASLt/cuDNN workspaces inside it; PyTorch: max_memory_reserved), and the device-wide used memory (NVML's
view, context included) for both. MFU: the family's flops_per_token (GPT-2: llm.c's 6N + 6LCT; Llama 3:
torchtitan's 6N + 12 L H d T) at 989 TFLOP/s. Energy: the GPU's energy counter (NVML, read through the driver's
libnvidia-ml with ctypes; GPU index 0, the one both sides use) over the timed steps: joules a step and the mean
power. The counter moves only every ~100 ms on an H200, so a thread polls it and the mean power is taken between its
first and last move inside the window (readings at the window's ends are up to one update stale: +-3% over 20 d48
steps). Every side of these benchmarks runs at the power limit (an H200's 700 W), where a step's time is its energy
over the mean power the GPU holds.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEAK_FLOPS = 989e12


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="d12")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=30, help="timed steps (median); >= 20")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--recompute", type=int, default=1)
    ap.add_argument("--recompute-keep", type=int, default=0, help="llmpy: the first N layers keep their activations")
    ap.add_argument("--no-master-weights", action="store_true")
    ap.add_argument("--moments", choices=("fp32", "bf16"), default="fp32", help="llmpy: AdamW's moments' dtype")
    ap.add_argument("--no-graph", action="store_true")
    ap.add_argument("--fast-attention", action="store_true", help="llmpy: cuDNN's non-deterministic attention backward")
    ap.add_argument("--tune-gemm", action="store_true", help="llmpy: time cuBLASLt's top algorithms per shape")
    ap.add_argument("--sides", default="llmpy,torch", help="comma-separated: llmpy, llmpy+tune (llmpy with "
                    "--tune-gemm), llmpy+fast (with --fast-attention), llmpy+fp8 (--dtype fp8) and their "
                    "combinations; torch, torch+float8 and torch+float8rw (torchao's float8 training of the blocks' "
                    "Linears, tensorwise and rowwise scaling); each runs in its own process")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.side:
        print("RESULT " + json.dumps(measure(args)), flush=True)
        return
    res = {}
    for side in args.sides.split(","):  # all checked before the first side runs
        side_flags(side)
    for side in args.sides.split(","):
        cmd = [sys.executable, __file__, "--side", side] + _without_sides(argv or sys.argv[1:])
        _mark("start", f"{args.model}:{side}")
        p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(ROOT)] + [x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep) if x])))
        _mark("end", f"{args.model}:{side}")
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if p.returncode or not line:
            print(f"{side} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}", file=sys.stderr)
            continue
        res[side] = json.loads(line[-1][7:])
        r = res[side]  # at once, so a run cut short still shows the sides it measured
        print(f"{side}: {r['tok_s']:,.0f} tok/s, {r['step_ms']:.1f} ms a step, peak {r['peak_gib']:.2f} GiB",
              flush=True)
    report(args, res)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": res}, indent=1))


TORCH_SIDES = {"torch": None, "torch+float8": "tensorwise", "torch+float8rw": "rowwise"}  # -> torchao's recipe


def side_flags(side: str) -> set[str] | None:
    """A side's name -> its llmpy flags ("llmpy+tune+fast" -> {"tune", "fast"}), None for a torch side; exits on
    others."""
    if side in TORCH_SIDES:
        return None
    base, *flags = side.split("+")
    if base != "llmpy" or not set(flags) <= {"tune", "fast", "fp8"}:
        raise SystemExit(f"unknown side {side!r}: llmpy[+tune][+fast][+fp8], torch, torch+float8 or torch+float8rw")
    return set(flags)


def _mark(what: str, name: str) -> None:
    """Appends "HH:MM:SS start|end NAME" to $LLMPY_STAGES_FILE if set, so that a caller sampling nvidia-smi's power
    and clocks can tell which side each sample belongs to."""
    path = os.environ.get("LLMPY_STAGES_FILE")
    if path:
        with open(path, "a") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {what} {name}\n")


def _without_sides(argv: list[str]) -> list[str]:
    """argv less --sides / --side and their values (in either the `--sides X` or the `--sides=X` form)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--sides", "--side"):
            skip = True
        elif not a.startswith(("--sides=", "--side=")):
            out.append(a)
    return out


def report(args, res):
    print(f"\n{time.strftime('%Y-%m-%d')}  {args.model} B={args.batch} T={args.seq} bf16 (+fp8/float8 sides: the "
          f"blocks' products on FP8), "
          f"median of {args.steps} steps after {args.warmup} warm-up; llmpy: recompute {args.recompute}"
          f"{f' (keep {args.recompute_keep})' if args.recompute_keep else ''}, "
          f"{'no ' if args.no_master_weights else ''}fp32 master weights, {args.moments} moments"
          f"{', FAST (non-deterministic) attention backward' if args.fast_attention else ''}")
    print("| | tok/s | step ms | peak GiB (framework) | device used GiB | MFU |")
    print("|---|---|---|---|---|---|")
    for side, r in res.items():
        print(f"| {side} | {r['tok_s']:,.0f} | {r['step_ms']:.1f} | {r['peak_gib']:.2f} | {r['device_gib']:.2f} | "
              f"{r['mfu'] * 100:.1f}% |")
    if "plan_gib" in res.get("llmpy", {}):
        print("llmpy memory plan (GiB): " + ", ".join(f"{k} {v:.2f}" for k, v in res["llmpy"]["plan_gib"].items()))
    for side in res:
        for base in (t for t in TORCH_SIDES if t in res and side.startswith("llmpy")):
            a, b = res[side], res[base]
            print(f"{side} / {base}: speed {a['tok_s'] / b['tok_s']:.3f}x, peak memory "
                  f"{a['peak_gib'] / b['peak_gib']:.3f}x (device used {a['device_gib'] / b['device_gib']:.3f}x)")
    for side, r in res.items():
        if r.get("joules_per_step") is not None:
            print(f"{side}: {r['joules_per_step']:.1f} J a step, {r['watts']:.0f} W mean over the timed steps "
                  f"({r['mean_step_ms']:.1f} ms a step on average; GPU 0's energy counter read at the window's ends, "
                  f"each reading up to one update stale)")
        if r.get("power"):
            p = r["power"]
            print(f"  {side}: {p['watts']:.0f} W mean between the counter's first and last update in the window "
                  f"({p['span_s']:.2f} s; it updates every ~{p['update_ms']:.0f} ms) = "
                  f"{p['watts'] * r['mean_step_ms'] / 1e3:.1f} J a step at the mean step")
    tuned = [side for side in res if res[side].get("tuned")]
    for r in res[tuned[0]]["tuned"] if tuned else []:  # the first tuned side's choices (--json: every side's)
        if r["index"]:
            print(f"  {tuned[0]} tuned {r['shape']}: algorithm {r['index']} of {r['candidates']}, "
                  f"{r['first_ms']:.3f} -> {r['chosen_ms']:.3f} ms")


def flops_per_token(cfg, T):
    return cfg.flops_per_token(T)


class EnergyCounter:
    """NVML's total energy counter of GPU 0 (millijoules since the driver loaded), through ctypes (no Python NVML
    package needed); mj() is None where the library or the counter is missing."""

    def __init__(self):
        self.lib, self.dev = None, ctypes.c_void_p()
        try:
            lib = ctypes.CDLL("libnvidia-ml.so.1")
            if lib.nvmlInit_v2() == 0 and lib.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(self.dev)) == 0:
                self.lib = lib
        except (OSError, AttributeError):
            pass

    def mj(self):
        if self.lib is None:
            return None
        v = ctypes.c_ulonglong()
        return v.value if self.lib.nvmlDeviceGetTotalEnergyConsumption(self.dev, ctypes.byref(v)) == 0 else None


class PowerTrace:
    """Polls an EnergyCounter from a thread (every `period` s) between start() and stop(), keeping (time, mJ) each
    time the counter moves; stop() returns power_profile of them."""

    def __init__(self, counter, period=0.002):
        import threading
        self.counter, self.period, self.points = counter, period, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        if self.counter.mj() is not None:
            self._thread.start()
        return self

    def _run(self):
        last = None
        while not self._stop.is_set():
            v = self.counter.mj()
            if v is not None and v != last:
                self.points.append((time.perf_counter(), v))
                last = v
            time.sleep(self.period)

    def stop(self):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        return power_profile(self.points)


def power_profile(points):
    """From (seconds, mJ) readings taken when the counter moved: its median update interval and the mean power
    between its first and last move in the window. The counter moves only every ~100 ms on an H200, so a reading at
    an arbitrary moment is up to one update stale; between two moves it is exact (to the polling period). Single
    updates are not reported: their energy and their time do not line up that well. None with under 3 points."""
    if len(points) < 3:
        return None
    (t0, e0), (t1, e1) = points[0], points[-1]
    dt = sorted(b[0] - a[0] for a, b in zip(points, points[1:]))
    return {"update_ms": round(dt[len(dt) // 2] * 1e3, 2), "span_s": round(t1 - t0, 3),
            "watts": round((e1 - e0) / 1e3 / (t1 - t0), 1)}


def watts(e0, e1, seconds):
    """Mean power between two readings of EnergyCounter.mj() `seconds` apart (None if either is missing)."""
    return None if e0 is None or e1 is None or seconds <= 0 else round((e1 - e0) / 1e3 / seconds, 1)


def joules_per_step(e0, e1, steps):
    """Joules a step between two readings of EnergyCounter.mj() over `steps` steps (None if either is missing)."""
    return None if e0 is None or e1 is None or steps < 1 else round((e1 - e0) / 1e3 / steps, 2)


def device_used_gib():
    try:
        import cupy
        free, total = cupy.cuda.runtime.memGetInfo()
        return (total - free) / 2**30
    except Exception:
        import torch
        free, total = torch.cuda.mem_get_info()
        return (total - free) / 2**30


def measure(args) -> dict:
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from llmpy.config import config_from_name
    cfg = config_from_name(args.model)
    B, T = args.batch, args.seq
    rng = np.random.default_rng(0)
    data = [rng.integers(0, cfg.vocab_size, (B, T + 1)).astype(np.int32) for _ in range(8)]
    times, extra = [], {}
    energy, e0, e1, w0, w1 = EnergyCounter(), None, None, None, None
    trace = PowerTrace(energy)  # started with the timed steps
    flags = side_flags(args.side)
    if flags is not None:
        import cupy

        from llmpy.backends import get_backend
        from llmpy.config import family_of
        from llmpy.train.optim import AdamW
        from llmpy.train.step import TrainStep
        be = get_backend("cuda", "fp8" if "fp8" in flags else "bf16")
        be.fast_attention = args.fast_attention or "fast" in flags
        be.gemm.tune = args.tune_gemm or "tune" in flags
        model = family_of(cfg).model(cfg, be, B, T, recompute=args.recompute, recompute_keep=args.recompute_keep,
                                     master_weights=not args.no_master_weights)
        model.init_weights(0)
        opt = AdamW(model, weight_decay=0.1, moments=args.moments)
        st = TrainStep(model, opt, 1, grad_clip=1.0, graph=not args.no_graph)
        plan = model.memory_plan()
        plan["optimizer"] = opt.nbytes()
        extra["plan_gib"] = {k: round(v / 2**30, 3) for k, v in plan.items()}
        print("memory plan (GiB): " + ", ".join(f"{k} {v / 2**30:.2f}" for k, v in plan.items()), file=sys.stderr)
        prev, t_prev = None, time.perf_counter()
        for i in range(args.warmup + args.steps + 1):
            h = None
            if i < args.warmup + args.steps:
                b = data[i % len(data)]
                h = st.launch([(b[:, :-1], b[:, 1:])], 1e-4)
            if prev is not None:
                prev.result()  # step i-1 is done; step i is already queued behind it
                now = time.perf_counter()
                times.append(now - t_prev)
                t_prev = now
                if len(times) == args.warmup:  # the timed steps start here
                    e0, w0, trace = energy.mj(), time.perf_counter(), PowerTrace(energy).start()
            prev = h
        e1, w1 = energy.mj(), time.perf_counter()
        extra["power"] = trace.stop()
        pool = cupy.get_default_memory_pool()
        peak = pool.total_bytes() / 2**30
        if be.gemm.tune:
            print(be.gemm.tuning_summary(), file=sys.stderr)
            extra["tuned"] = [{"shape": k, "candidates": n, "index": i, "first_ms": round(t0, 4),
                               "chosen_ms": round(t1, 4)} for k, n, i, t0, t1 in be.gemm.tuned]
    else:
        import torch

        torch.manual_seed(0)
        torch.backends.cuda.matmul.allow_tf32 = True
        if type(cfg).family == "llama3":
            from benchmarks.torch_llama import TorchLlama as Baseline
        elif type(cfg).family == "mmfree":
            from benchmarks.torch_mmfree import TorchMMFree as Baseline
        else:
            from benchmarks.nanogpt import NanoGPT as Baseline
        model = Baseline(cfg).cuda()
        recipe = TORCH_SIDES[args.side]
        if recipe is not None:  # torchao's float8 training on the blocks' Linears (not the LM head)
            from torchao.float8 import Float8LinearConfig, convert_to_float8_training
            convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe),
                                       module_filter_fn=lambda mod, fqn: fqn not in ("lm_head", "out"))
        opt = model.optimizer(1e-4)
        fwd = torch.compile(model) if getattr(sys.modules[Baseline.__module__], "COMPILE", True) else model
        td = [torch.tensor(b, dtype=torch.long, device="cuda") for b in data]
        for i in range(args.warmup + args.steps):
            b = td[i % len(td)]
            torch.cuda.synchronize()
            if i == args.warmup:  # the timed steps start here
                e0, w0, trace = energy.mj(), time.perf_counter(), PowerTrace(energy).start()
            t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = fwd(b[:, :-1], b[:, 1:])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss.item()
            times.append(time.perf_counter() - t0)
        e1, w1 = energy.mj(), time.perf_counter()
        extra["power"] = trace.stop()
        peak = torch.cuda.max_memory_reserved() / 2**30
    step = statistics.median(times[args.warmup:])
    tok_s = B * T / step
    return {"tok_s": tok_s, "step_ms": step * 1e3, "peak_gib": peak, "device_gib": device_used_gib(),
            "mfu": tok_s * flops_per_token(cfg, T) / PEAK_FLOPS, "joules_per_step": joules_per_step(e0, e1, args.steps),
            "mean_step_ms": None if w0 is None else (w1 - w0) / args.steps * 1e3,
            "watts": None if w0 is None else watts(e0, e1, w1 - w0),
            **extra}


if __name__ == "__main__":
    main()
