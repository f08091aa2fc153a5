"""Per-kernel device time of one training step or one decoded token, any family: CUPTI's view through torch.profiler.

    python dev/kernel_profile.py --what train --model mmfree:370m --batch 8 --seq 2048 [--recompute 1]
    python dev/kernel_profile.py --what decode --model mmfree:1.3b --packed both --tokens 16
    python dev/kernel_profile.py --what train --model d12 --batch 64 --seq 1024 --mode eager --json k.json

Our kernels run through CuPy (NVRTC), cuBLASLt and cuDNN, not through torch; but CUPTI, which torch.profiler drives,
traces every kernel of the process. Inside `torch.profiler.profile(activities=[ProfilerActivity.CUDA])` the script
runs the same calls as dev/gpu_profile.py (`TrainStep.run`: eager after warm-up, and the CUDA-graph-replayed
step the trainer normally runs) or benchmarks/mmfree_decode.py (`decode_step`, one CUDA graph per token where the
family has GRAPH_DECODE; latent and/or packed ternary weights). A one-thread marker kernel launched on the backend's
stream before each step/token (and after the last) delimits the units in the device timeline.

Output, per measurement: a markdown table of kernels by device time (kernel, calls, ms per step/token, share, mean
µs; names shortened: arguments dropped, __nv_bfloat16 -> bf16, long template arguments elided, so
`bitlinear_quantize<bf16>` stays distinct), memcpy/memset rows, the kernel count per unit, the sum of kernel time
against the span from the first kernel's start to the last kernel's end (the difference: idle gaps between kernels,
i.e. launch latency and host work), and the marker-to-marker time. --json writes everything (full kernel names too).

Each measurement runs in its own child process (one profiler per process: CUPTI state left by an earlier profiler
in the same process has been seen to stop later collection). Graph mode first profiles replays of graphs captured before the
profiler started; if CUPTI reports no kernels there, it retries with the profiler running across the capture, and if
that sees none either, decoding falls back to eager (GRAPH_DECODE off) and says so. Needs a CUDA build of torch
(its CUPTI) next to the GPU extras.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = "llmpy_profile_marker"
_GENERIC = {"Kernel", "Kernel2", "device_kernel", "kernel", "KernelWrapper"}  # wrappers named by their template arg


# ---- kernel names ------------------------------------------------------------------------------------------------
def _split_args(name: str) -> str:
    """The name without its trailing argument list "(...)" (demangled kernels carry one) and a leading "void "."""
    name = name.strip()
    if name.endswith(")"):
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                if i > 0:
                    name = name[:i]
                break
    return name.removeprefix("void ")


def short_name(name: str, width: int = 60) -> str:
    """A readable kernel name: no arguments or return type, namespaces dropped from the function, __nv_bfloat16 ->
    bf16, template arguments kept when short (bitlinear_quantize<bf16>), elided when long; a generic wrapper
    (cutlass::Kernel2<...>) is named by its first template argument."""
    base = _split_args(name)
    lt = base.find("<")
    func, targs = (base[:lt], base[lt + 1:base.rfind(">")]) if lt > 0 and base.endswith(">") else (base, None)
    func = func.split("::")[-1] if "::" in func else func
    if targs is not None:
        targs = targs.replace("__nv_bfloat16", "bf16").replace("__half", "f16")
        targs = re.sub(r"\b[A-Za-z_]\w*::", "", targs)
        targs = re.sub(r"\(([-\d]+)\)", r"\1", targs).replace(" ", "")  # (int)4 -> 4
        if func in _GENERIC:
            first = re.split(r"[<,]", targs, maxsplit=1)[0]
            func, targs = first, None
        elif len(targs) > 24:
            targs = targs[:20] + "…"
    s = func if targs is None else f"{func}<{targs}>"
    return s if len(s) <= width else s[:width - 1] + "…"


# ---- device activities -----------------------------------------------------------------------------------------
def events_from_trace(path: Path) -> list[dict]:
    """[{kind: kernel|memcpy|memset, name, start, end (µs)}] from torch's exported chrome trace."""
    raw = path.read_bytes()
    data = json.loads(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)
    kinds = {"kernel": "kernel", "gpu_memcpy": "memcpy", "gpu_memset": "memset"}
    out = []
    for e in data.get("traceEvents", data if isinstance(data, list) else []):
        kind = kinds.get(str(e.get("cat", "")).lower())
        if kind and e.get("ph") == "X":
            t = float(e["ts"])
            out.append({"kind": kind, "name": e.get("name", "?"), "start": t, "end": t + float(e.get("dur", 0.0))})
    return sorted(out, key=lambda e: e["start"])


def events_from_profiler(prof) -> list[dict]:
    """The same from prof.events() (the fallback when the trace has none): device-side FunctionEvents."""
    from torch.autograd import DeviceType
    out = []
    for e in prof.events():
        if e.device_type != DeviceType.CUDA:
            continue
        low = e.name.lower()
        kind = "memcpy" if low.startswith("memcpy") else "memset" if low.startswith("memset") else "kernel"
        out.append({"kind": kind, "name": e.name, "start": float(e.time_range.start),
                    "end": float(e.time_range.end)})
    return sorted(out, key=lambda e: e["start"])


def _union(intervals) -> float:
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    return total + (cur_e - cur_s if cur_e is not None else 0.0)


def aggregate(events: list[dict], units: int, width: int) -> dict:
    """Splits the timeline at the marker kernels into units and sums per kernel; times per unit in ms."""
    marks = [e for e in events if e["kind"] == "kernel" and _split_args(e["name"]) == MARKER]
    body = [e for e in events if not (e["kind"] == "kernel" and _split_args(e["name"]) == MARKER)]
    note = None
    if len(marks) == units + 1:
        bounds = [m["start"] for m in marks]
        per_unit = [[e for e in body if bounds[i] <= e["start"] < bounds[i + 1]] for i in range(units)]
        between = [(bounds[i + 1] - bounds[i]) / 1e3 for i in range(units)]
    else:  # markers missing: the whole profile is one block divided evenly
        note = f"found {len(marks)} marker kernels, expected {units + 1}: the whole profile is used"
        per_unit, between = [body], []
    inside = [e for u in per_unit for e in u]
    kern = [e for e in inside if e["kind"] == "kernel"]
    n = units
    by = defaultdict(lambda: [0, 0.0])
    for e in inside:
        key = _split_args(e["name"]) if e["kind"] == "kernel" else f"[{e['kind']}] {e['name']}"
        by[key][0] += 1
        by[key][1] += e["end"] - e["start"]
    ksum = sum(e["end"] - e["start"] for e in kern)
    rows = []
    for key, (calls, us) in sorted(by.items(), key=lambda kv: -kv[1][1]):
        is_kernel = not key.startswith("[")
        rows.append({"name": key, "short": short_name(key, width) if is_kernel else key[:width], "kernel": is_kernel,
                     "calls_per_unit": calls / n, "ms_per_unit": us / 1e3 / n,
                     "share": us / ksum if ksum and is_kernel else None, "mean_us": us / calls})
    spans, busy, counts = [], [], []
    for u in per_unit:
        k = [e for e in u if e["kind"] == "kernel"]
        counts.append(len(k))
        if k:
            spans.append((max(e["end"] for e in k) - min(e["start"] for e in k)) / 1e3)
            busy.append(_union((e["start"], e["end"]) for e in k) / 1e3)
    if len(per_unit) == 1 and n > 1:  # no markers: per-unit figures are the block's divided by n
        spans, busy, counts = [s / n for s in spans], [b / n for b in busy], [c / n for c in counts]
    span = statistics.median(spans) if spans else 0.0
    res = {"units": n, "kernels_per_unit": len(kern) / n, "kernels_per_unit_min_max": [min(counts), max(counts)],
           "kernel_sum_ms": ksum / 1e3 / n, "kernel_busy_ms": statistics.median(busy) if busy else 0.0,
           "kernel_span_ms": span, "marker_to_marker_ms": statistics.median(between) if between else None,
           "other_ms": sum(r["ms_per_unit"] for r in rows if not r["kernel"]),
           "other_calls": sum(r["calls_per_unit"] for r in rows if not r["kernel"]), "rows": rows}
    res["idle_ms"] = max(span - res["kernel_busy_ms"], 0.0)
    # the idle time before each kernel (since the latest end of any earlier kernel), split by whether a memset ran
    # in between (cuBLASLt's 4-byte flag before each of its cooperative nvjet products)
    # and by the pair (the kernel that ended last before it, the kernel): which transitions leave the GPU idle
    gaps = {"after_memset": [0, 0.0], "other": [0, 0.0]}
    pairs = defaultdict(lambda: [0, 0.0])
    for u in per_unit:
        prev_end, prev_name, memset = None, None, False
        for e in sorted(u, key=lambda e: e["start"]):
            if e["kind"] == "memset":
                memset = True
            elif e["kind"] == "kernel":
                name = short_name(e["name"], 40)
                if prev_end is not None:
                    g = max(0.0, e["start"] - prev_end)
                    for acc in (gaps["after_memset" if memset else "other"], pairs[(prev_name, name)]):
                        acc[0] += 1
                        acc[1] += g
                if prev_end is None or e["end"] >= prev_end:
                    prev_end, prev_name = e["end"], name
                memset = False
    res["gaps"] = {k: {"count_per_unit": c / n, "ms_per_unit": us / 1e3 / n} for k, (c, us) in gaps.items()}
    res["gap_pairs"] = [{"before": a, "kernel": b, "count_per_unit": c / n, "ms_per_unit": us / 1e3 / n}
                        for (a, b), (c, us) in sorted(pairs.items(), key=lambda kv: -kv[1][1])[:12]]
    if note:
        res["note"] = note
    # short names that coincide for different kernels: number them
    seen = defaultdict(int)
    for r in rows:
        seen[r["short"]] += 1
        if seen[r["short"]] > 1:
            r["short"] = f"{r['short']} #{seen[r['short']]}"
    return res


# ---- one measurement (a child process) -----------------------------------------------------------------------------
class Session:
    """torch.profiler over CUDA activities, markers on the backend's stream, the device events afterwards."""

    def __init__(self, be, args):
        import torch
        if not torch.cuda.is_available():
            raise SystemExit("kernel_profile needs a CUDA build of torch (its profiler drives CUPTI)")
        torch.cuda.init()
        self.torch, self.be, self.args = torch, be, args
        self.mark = be.cp.RawKernel(f'extern "C" __global__ void {MARKER}(int i) {{}}', MARKER)
        self.prof = None
        self.marker(-1)  # compiled and loaded now, not inside the profile

    def marker(self, i: int) -> None:
        import numpy as np
        self.mark((1,), (1,), (np.int32(i),))  # on the current stream: the backend's

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile
        self.be.synchronize()
        self.prof = profile(activities=[ProfilerActivity.CUDA])
        self.prof.__enter__()
        return self

    def __exit__(self, *exc):
        self.be.cp.cuda.Device().synchronize()
        self.torch.cuda.synchronize()
        self.prof.__exit__(*exc)

    def events(self) -> tuple[list[dict], str]:
        """The profile's device activities: from the exported chrome trace, else from prof.events()."""
        keep = self.args.trace_dir
        d = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="kprof-"))
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"trace-{os.getpid()}-{time.time_ns()}.json"
        ev = []
        try:
            self.prof.export_chrome_trace(str(path))
            ev = events_from_trace(path)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            print(f"reading the chrome trace failed ({type(e).__name__}: {e}); using prof.events()", file=sys.stderr)
        finally:
            if not keep:
                path.unlink(missing_ok=True)
                d.rmdir()
        if ev:
            return ev, f"chrome trace {path}" if keep else "chrome trace"
        return events_from_profiler(self.prof), "prof.events()"


def child(args, job: dict) -> dict:
    sys.path.insert(0, str(ROOT))
    from llmpy.backends import get_backend
    from llmpy.config import config_from_name
    cfg = config_from_name(args.model)
    be = get_backend("cuda", "bf16")
    sess = Session(be, args)
    around = job["strategy"] == "around"
    res = dict(job)
    if args.what == "train":
        warm, unit, n, info = _train(args, cfg, be, job)
    else:
        warm, unit, n, info = _decode(args, cfg, be, job)
    res.update(info)
    if not around:
        warm()
    host = []
    with sess:
        if around:
            warm()
        be.synchronize()
        for i in range(n):
            sess.marker(i)
            t0 = time.perf_counter()
            unit(i)
            host.append(time.perf_counter() - t0)
        sess.marker(n)
    ev, source = sess.events()
    res.update(aggregate(ev, n, args.name_width))
    res["source"], res["host_ms"] = source, statistics.median(host) * 1e3
    res["device"] = be.cp.cuda.runtime.getDeviceProperties(be.cp.cuda.Device().id)["name"]
    if isinstance(res["device"], bytes):
        res["device"] = res["device"].decode()
    return res


def _train(args, cfg, be, job):
    import numpy as np

    from llmpy.config import family_of
    from llmpy.train.optim import AdamW
    from llmpy.train.step import TrainStep
    B, T = args.batch, args.seq
    be.gemm.tune = args.tune_gemm
    model = family_of(cfg).model(cfg, be, B, T, recompute=args.recompute, recompute_keep=args.recompute_keep,
                                 master_weights=not args.no_master_weights)
    model.init_weights(0)
    opt = AdamW(model, weight_decay=0.1, moments=args.moments)
    graph = job["mode"] == "graph"
    st = TrainStep(model, opt, 1, grad_clip=1.0, graph=graph)
    w = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T + 1)).astype(np.int32)
    batch = [(w[:, :-1], w[:, 1:])]

    def warm():  # step 0 eager (compiles, plans), step 1 captures the graphs when graph=True
        for _ in range(max(args.warmup, 3 if graph else 1)):
            st.run(batch, 1e-4)

    def unit(i):
        st.run(batch, 1e-4)

    return warm, unit, args.steps, {"unit": "step", "graph_used": st.use_graph}


def _decode(args, cfg, be, job):
    import numpy as np

    from llmpy.config import family_of
    from llmpy.models.decode import decoder
    from llmpy.models.params import init_params
    params = init_params(family_of(cfg).spec(cfg), 0)
    if job["weights"] == "packed":
        from llmpy.formats.ternary import read_ternary, write_ternary
        with tempfile.TemporaryDirectory() as d:
            write_ternary(Path(d) / "t.safetensors", cfg, params)
            _, params = read_ternary(Path(d) / "t.safetensors")
    m = decoder(cfg, params, be)
    graph = job["mode"] == "graph" and type(m).GRAPH_DECODE
    if not graph:
        m.GRAPH_DECODE = False  # the instance attribute wins over the class's: every token runs eagerly
    cap = min(cfg.max_seq_len, max(2048, args.warmup_tokens + args.tokens + 1))
    st = m.new_decode_state(cap)
    toks = np.random.default_rng(0).integers(0, cfg.vocab_size, args.warmup_tokens + args.tokens)

    def warm():  # the first token runs eagerly and records the graph
        for t in toks[:args.warmup_tokens]:
            m.decode_step(np.array([[t]]), st)

    def unit(i):
        m.decode_step(np.array([[toks[args.warmup_tokens + i]]]), st)  # reads the logits back: complete

    info = {"unit": "token", "graph_used": bool(graph)}
    if job["mode"] == "graph" and not type(m).GRAPH_DECODE:
        info["note_family"] = f"{type(m).__name__} has no graph decode (GRAPH_DECODE False): eager"
    return warm, unit, args.tokens, info


# ---- the parent: one child per measurement, the graph fallbacks, the report ---------------------------------------
def run_job(args, argv_base: list[str], job: dict) -> dict | None:
    if args.in_process:
        return child(args, job)
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv_base, "--child", json.dumps(job)]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode or not line:
        print(f"measurement {job} failed (exit {p.returncode}):\n{p.stdout[-3000:]}", file=sys.stderr)
        return None
    return json.loads(line[-1][7:])


def _graph_blind(r: dict, eager: dict | None) -> bool:
    """Whether a graph-mode measurement missed the kernels inside the replays: fewer than half the eager count when
    that is known, else fewer than 10 (any step or token of any family launches more)."""
    return r["kernels_per_unit"] < (0.5 * eager["kernels_per_unit"] if eager else 10)


def measure_all(args, argv_base: list[str]) -> tuple[list[dict], list[str]]:
    modes = ["eager", "graph"] if args.mode == "both" else [args.mode]
    weights = [None] if args.what == "train" else (["latent", "packed"] if args.packed == "both" else
                                                  ["packed" if args.packed == "yes" else "latent"])
    results, notes = [], []
    for wt in weights:
        done = {}
        for mode in modes:
            job = {"what": args.what, "mode": mode, "weights": wt, "strategy": "after"}
            r = run_job(args, argv_base, job)
            if r is not None and mode == "graph" and r.get("graph_used") and _graph_blind(r, done.get("eager")):
                notes.append(f"{wt or 'train'}: CUPTI saw {r['kernels_per_unit']:g} kernels per {r['unit']} in replays "
                             "of graphs captured before the profiler started; retrying with the profiler running "
                             "across the capture")
                r = run_job(args, argv_base, dict(job, strategy="around"))
                if r is not None and _graph_blind(r, done.get("eager")):
                    notes.append(f"{wt or 'train'}: CUPTI does not see the kernels inside graph replays here")
                    if args.what == "decode" and "eager" not in done:
                        notes.append(f"{wt}: falling back to eager decoding (GRAPH_DECODE off)")
                        r = run_job(args, argv_base, dict(job, mode="eager"))
            if r is not None:
                done[r["mode"]] = r
                results.append(r)
        if "eager" in done and "graph" in done:
            e, g = done["eager"], done["graph"]
            notes.append(f"{wt or 'train'}: graph replay {g['kernels_per_unit']:g} kernels per {g['unit']} seen by "
                         f"CUPTI vs {e['kernels_per_unit']:g} eager; kernel sum {g['kernel_sum_ms']:.3f} vs "
                         f"{e['kernel_sum_ms']:.3f} ms, span {g['kernel_span_ms']:.3f} vs {e['kernel_span_ms']:.3f} ms")
    return results, notes


def report(args, results: list[dict], notes: list[str]) -> None:
    what = (f"B={args.batch} T={args.seq} recompute {args.recompute}" if args.what == "train"
            else f"batch 1, {args.tokens} tokens after {args.warmup_tokens}")
    dev = results[0].get("device", "") if results else ""
    print(f"\n{time.strftime('%Y-%m-%d')}  {dev}  {args.model} {args.what} ({what}), bf16")
    for r in results:
        u = r["unit"]
        label = f"{r['mode']}" + (f", {r['weights']} weights" if r.get("weights") else "")
        label += f", graph replay (profiler started {r['strategy']} capture)" if r.get("graph_used") else ""
        print(f"\n### {args.what} {label}: per {u}, {r['units']} {u}s profiled ({r['source']})")
        for k in ("note", "note_family"):
            if r.get(k):
                print(f"note: {r[k]}")
        print(f"| kernel | calls | ms/{u} | share | mean µs |")
        print("|---|---|---|---|---|")
        kernels = [x for x in r["rows"] if x["kernel"]]
        shown = kernels if args.top <= 0 else kernels[:args.top]
        for x in shown:
            print(f"| {x['short']} | {x['calls_per_unit']:g} | {x['ms_per_unit']:.3f} | {100 * x['share']:.1f}% | "
                  f"{x['mean_us']:.1f} |")
        rest = kernels[len(shown):]
        if rest:
            print(f"| ({len(rest)} more kernels) | {sum(x['calls_per_unit'] for x in rest):g} | "
                  f"{sum(x['ms_per_unit'] for x in rest):.3f} | "
                  f"{100 * sum(x['share'] for x in rest):.1f}% | |")
        for x in r["rows"]:
            if not x["kernel"]:
                print(f"| {x['short']} | {x['calls_per_unit']:g} | {x['ms_per_unit']:.3f} | | {x['mean_us']:.1f} |")
        span, busy = r["kernel_span_ms"], r["kernel_busy_ms"]
        lo, hi = r["kernels_per_unit_min_max"]
        print(f"kernels per {u}: {r['kernels_per_unit']:g}" + (f" (min {lo}, max {hi})" if lo != hi else "")
              + f"; kernel time sum {r['kernel_sum_ms']:.3f} ms, busy {busy:.3f} ms; span first kernel start to last "
              f"kernel end {span:.3f} ms: idle gaps {r['idle_ms']:.3f} ms ({100 * r['idle_ms'] / span if span else 0:.1f}%"
              f" of the span); memcpy/memset {r['other_calls']:g} per {u}, {r['other_ms']:.3f} ms")
        gp = r.get("gaps")
        if gp:
            print("gaps before kernels: " + "; ".join(
                f"{k.replace('_', ' ')} {v['count_per_unit']:g} kernels, {v['ms_per_unit']:.3f} ms" for k, v in gp.items()))
            print("largest idle transitions (the kernel that ended last -> the next kernel: count, ms per "
                  f"{u}, mean us): " + "; ".join(
                      f"{x['before']} -> {x['kernel']}: {x['count_per_unit']:g}, {x['ms_per_unit']:.3f}, "
                      f"{1e3 * x['ms_per_unit'] / x['count_per_unit']:.1f}" for x in r.get("gap_pairs", [])[:8]))
        m2m = r.get("marker_to_marker_ms")
        print(f"marker to marker (the whole {u} on the device clock, host included) "
              + (f"{m2m:.3f} ms" if m2m is not None else "n/a") + f"; host time of the call {r['host_ms']:.3f} ms")
    if notes:
        print()
        for n in notes:
            print(f"note: {n}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mmfree:370m")
    ap.add_argument("--what", choices=("train", "decode"), default="train")
    ap.add_argument("--batch", type=int, default=8, help="train: micro-batch B")
    ap.add_argument("--seq", type=int, default=2048, help="train: sequence length T")
    ap.add_argument("--recompute", type=int, default=0, help="train: the family's recompute level")
    ap.add_argument("--recompute-keep", type=int, default=0, help="train: the first N layers keep their activations")
    ap.add_argument("--no-master-weights", action="store_true", help="train: no fp32 master copy")
    ap.add_argument("--moments", choices=("fp32", "bf16"), default="fp32", help="train: AdamW's moments' dtype")
    ap.add_argument("--tune-gemm", action="store_true", help="train: time cuBLASLt's top algorithms per shape")
    ap.add_argument("--mode", choices=("eager", "graph", "both"), default="both",
                    help="eager launches or CUDA graph replay (train: TrainStep(graph=...); decode: GRAPH_DECODE)")
    ap.add_argument("--packed", nargs="?", const="yes", default="no", choices=("no", "yes", "both"),
                    help="decode: packed ternary weights (--packed), the latent ones (default) or both")
    ap.add_argument("--steps", type=int, default=1, help="train: profiled steps (figures are per step)")
    ap.add_argument("--warmup", type=int, default=3, help="train: warm-up steps (graph mode: >= 3)")
    ap.add_argument("--tokens", type=int, default=8, help="decode: profiled tokens (figures are per token)")
    ap.add_argument("--warmup-tokens", type=int, default=4, help="decode: tokens before (>= 2: eager, capture)")
    ap.add_argument("--top", type=int, default=40, help="kernel rows shown (0: all; --json has all)")
    ap.add_argument("--name-width", type=int, default=60)
    ap.add_argument("--trace-dir", help="keep the chrome traces here (open in ui.perfetto.dev)")
    ap.add_argument("--in-process", action="store_true", help="no child processes (no graph fallbacks)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if min(args.batch, args.seq, args.steps, args.tokens) < 1 or args.warmup_tokens < 2:
        raise SystemExit("--batch, --seq, --steps, --tokens must be positive and --warmup-tokens >= 2")
    if args.child:
        print("RESULT " + json.dumps(child(args, json.loads(args.child))), flush=True)
        return
    if args.what == "train" and args.packed != "no":
        raise SystemExit("--packed is for --what decode (a packed model does not train)")
    base = ["--model", args.model, "--what", args.what, "--batch", str(args.batch), "--seq", str(args.seq),
            "--recompute", str(args.recompute), "--recompute-keep", str(args.recompute_keep), "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--tokens", str(args.tokens), "--warmup-tokens", str(args.warmup_tokens),
            "--name-width", str(args.name_width), "--moments", args.moments] + (
                ["--trace-dir", args.trace_dir] if args.trace_dir else []) + (
                ["--no-master-weights"] if args.no_master_weights else [])
    results, notes = measure_all(args, base)
    if not results:
        raise SystemExit("no measurement succeeded (see the errors above)")
    report(args, results, notes)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "date": time.strftime("%Y-%m-%d"),
                                               "results": results, "notes": notes}, indent=1))


if __name__ == "__main__":
    main()
