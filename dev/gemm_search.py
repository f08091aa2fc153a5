"""Are there faster cuBLASLt algorithms than the ones its heuristic offers? For the GPT-2 d48 / d12 product shapes:
time the heuristic's candidates (what --tune-gemm chooses from), then every configuration cuBLASLt's algorithm
enumeration allows (algorithm ids x tiles x stages x split-K with a deterministic reduction x CTA swizzling x custom
options), each checked by cublasLtMatmulAlgoCheck, and report the best of each against the heuristic's best.
Nothing in llmpy uses these configurations unless they win here and in the step.

    python dev/gemm_search.py [--shapes d48] [--budget 40] [--json out.json]

Each configuration: one warm-up launch, then the median of 5 launches (CUDA events). `--budget` caps the seconds
spent enumerating one shape (configurations are visited id by id, the heuristic's own ids first).

Measured 2026-11-30 on one H200: the best enumerated configuration ran up to 1.125x the heuristic's first (d48
attproj forward), but tuning over them moved the d48 step only 162.3 -> 160.3 ms, within noise: not adopted
(docs/performance.md).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (name, M, N, K, transx, transy, epilogue, bias): out (M, N) = op(x) (M, K) @ op(y) (K, N), as Gemm.mm
SHAPES = {
    "d48": [("attproj fwd", 8192, 1600, 1600, False, True, "default", True),
            ("fc fwd +gelu", 8192, 6400, 1600, False, True, "gelu", True),
            ("qkv fwd", 8192, 4800, 1600, False, True, "default", True),
            ("attproj dw", 1600, 1600, 8192, True, False, "default", False)],
    "d12": [("fc fwd +gelu", 65536, 3072, 768, False, True, "gelu", True)],
}
CFG_ATTRS = ("ID", "TILE_ID", "STAGES_ID", "SPLITK_NUM", "REDUCTION_SCHEME", "CTA_SWIZZLING", "CUSTOM_OPTION",
             "INNER_SHAPE_ID", "CLUSTER_SHAPE_ID")


def planned_product(cp, g, rng, bf, M, N, K, tx, ty, epi, has_bias):
    """Random bf16 operands of one product shape (as Gemm.mm takes them) and the Gemm plan its first call made:
    (x, y, out, bias, aux, plan); plan[4] holds the heuristic's candidates (g.loaded: its whole list). The caller
    keeps bias and aux alive: the plan's descriptor points at them."""
    x = cp.asarray(rng.standard_normal((K, M) if tx else (M, K), dtype=np.float32)).astype(bf)
    y = cp.asarray(rng.standard_normal((N, K) if ty else (K, N), dtype=np.float32)).astype(bf)
    out = cp.empty((M, N), bf)
    bias = cp.zeros(N, bf) if has_bias else None
    aux = cp.empty((M, N), bf) if epi == "gelu" else None
    before = set(g._plans)
    g.mm(out, x, y, M, N, K, transx=tx, transy=ty, bias=bias, epilogue=epi, aux=aux)
    return x, y, out, bias, aux, g._plans[(set(g._plans) - before).pop()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", choices=sorted(SHAPES), action="append")
    ap.add_argument("--budget", type=float, default=15.0, help="seconds of enumeration per shape")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    import cupy as cp

    from llmpy.backends.cuda.gemm import WORKSPACE_BYTES, Gemm
    g = Gemm(cp, "bf16")
    g.loaded = True  # pinning: the heuristic's whole list (up to TUNE_CANDIDATES), as a tuned run asks for
    lt = g.lt
    C, CAP = lt.MatmulAlgoConfigAttribute, lt.MatmulAlgoCapAttribute
    import ml_dtypes
    bf = np.dtype(ml_dtypes.bfloat16)
    s = cp.cuda.get_current_stream()
    e0, e1 = cp.cuda.Event(), cp.cuda.Event()
    res = {"device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), "cublaslt": int(lt.get_version()),
           "shapes": []}

    def cfg_get(algo, attr):
        dt = np.dtype(lt.get_matmul_algo_config_attribute_dtype(int(getattr(C, attr))))
        buf = np.zeros(1, dt)
        lt.matmul_algo_config_get_attribute(algo.ctypes.data, int(getattr(C, attr)), buf.ctypes.data, buf.itemsize, 0)
        return int(buf[0])

    def cfg_set(algo, attr, v):
        dt = np.dtype(lt.get_matmul_algo_config_attribute_dtype(int(getattr(C, attr))))
        buf = np.array([v], dt)
        lt.matmul_algo_config_set_attribute(algo.ctypes.data, int(getattr(C, attr)), buf.ctypes.data, buf.itemsize)

    def cap_array(algo, attr):
        size = np.zeros(1, np.uint64)
        lt.matmul_algo_cap_get_attribute(algo.ctypes.data, int(getattr(CAP, attr)), 0, 0, size.ctypes.data)
        n = int(size[0]) // 4
        if n == 0:
            return []
        buf = np.zeros(n, np.uint32)
        lt.matmul_algo_cap_get_attribute(algo.ctypes.data, int(getattr(CAP, attr)), buf.ctypes.data, buf.nbytes,
                                         size.ctypes.data)
        return [int(v) for v in buf]

    def cap_int(algo, attr):
        dt = np.dtype(lt.get_matmul_algo_cap_attribute_dtype(int(getattr(CAP, attr))))
        buf = np.zeros(1, dt)
        lt.matmul_algo_cap_get_attribute(algo.ctypes.data, int(getattr(CAP, attr)), buf.ctypes.data, buf.itemsize, 0)
        return int(buf[0])

    rng = np.random.default_rng(0)
    for group in args.shapes or ["d48", "d12"]:
        for name, M, N, K, tx, ty, epi, has_bias in SHAPES[group]:
            x, y, out, bias, aux, plan = planned_product(cp, g, rng, bf, M, N, K, tx, ty, epi, has_bias)
            desc, la, lb, ld_, cands = plan[:5]

            def run(algo, ws=WORKSPACE_BYTES):
                lt.matmul(g.handle, desc, g._one.ctypes.data, y.data.ptr, la, x.data.ptr, lb, g._zero.ctypes.data,
                          out.data.ptr, ld_, out.data.ptr, ld_, algo.ctypes.data, g.workspace.data.ptr, ws, s.ptr)

            def timed(algo):
                try:
                    run(algo)
                    ts = []
                    for _ in range(5):
                        e0.record(s)
                        run(algo)
                        e1.record(s)
                        e1.synchronize()
                        ts.append(cp.cuda.get_elapsed_time(e0, e1))
                    return float(np.median(ts))
                except Exception:
                    cp.cuda.Device().synchronize()
                    return float("inf")
            flop = 2.0 * M * N * K
            heur = []
            for j in range(len(cands)):
                a = cands[j:j + 1].copy()  # a heuristic result starts with its algorithm (as Gemm passes it)
                ms = timed(a)
                heur.append({"i": j, "ms": ms, **{k: cfg_get(a, k) for k in CFG_ATTRS}})
            hbest = min(heur, key=lambda r: r["ms"])  # the best of the heuristic's list (what tuning chose from)
            print(f"\n== {group} {name}: M={M} N={N} K={K} {epi}{' +bias' if has_bias else ''} "
                  f"({flop / 1e9:.0f} GFLOP)", flush=True)
            for r in heur:
                print(f"  heuristic {r['i']}: {r['ms']:.4f} ms {flop / r['ms'] / 1e9:.0f} TFLOP/s  "
                      + " ".join(f"{k}={r[k]}" for k in CFG_ATTRS), flush=True)
            # the enumeration: ids the heuristic used first, then the rest
            ids = list(lt.matmul_algo_get_ids(g.handle, 68, 0, 14, 14, 14, 14, 256))
            used = [r["ID"] for r in heur]
            ids = sorted(set(ids), key=lambda i: (i not in used, i))
            t_start, tried, valid, best = time.time(), 0, 0, None
            per_id = {}
            for aid in ids:
                if time.time() - t_start > args.budget:
                    break
                a = np.zeros(1, lt.matmul_algo_dtype)
                try:
                    lt.matmul_algo_init(g.handle, 68, 0, 14, 14, 14, 14, int(aid), a.ctypes.data)
                    tiles = cap_array(a, "TILE_IDS") or [0]
                    stages = cap_array(a, "STAGES_IDS") or [0]
                    splitk = cap_int(a, "SPLITK_SUPPORT")
                    swz = cap_int(a, "CTA_SWIZZLING_SUPPORT")
                    custom = cap_int(a, "CUSTOM_OPTION_MAX")
                except Exception as ex:
                    per_id[int(aid)] = f"init/caps failed: {type(ex).__name__}"
                    continue
                clusters = sorted({r["CLUSTER_SHAPE_ID"] for r in heur} | {0})
                combos = itertools.product(tiles, stages, (1, 2) if splitk else (1,), (0, 1) if swz else (0,),
                                           range(min(custom, 1) + 1), clusters)
                n_id, best_id = 0, None
                for tile, stage, sk, sw, co, cl in combos:
                    if time.time() - t_start > args.budget:
                        break
                    b = a.copy()
                    try:
                        cfg_set(b, "TILE_ID", tile)
                        cfg_set(b, "STAGES_ID", stage)
                        cfg_set(b, "SPLITK_NUM", sk)
                        if sk > 1:
                            cfg_set(b, "REDUCTION_SCHEME", int(lt.ReductionScheme.COMPUTE_TYPE))  # no atomics
                        cfg_set(b, "CTA_SWIZZLING", sw)
                        cfg_set(b, "CUSTOM_OPTION", co)
                        cfg_set(b, "CLUSTER_SHAPE_ID", cl)
                        chk = np.zeros(1, lt.matmul_heuristic_result_dtype)
                        lt.matmul_algo_check(g.handle, desc, la, lb, ld_, ld_, b.ctypes.data, chk.ctypes.data)
                        wsn = "workspace_size" if "workspace_size" in chk.dtype.names else "workspaceSize"
                        if int(chk[0][wsn]) > WORKSPACE_BYTES:
                            continue
                    except Exception:
                        continue
                    tried += 1
                    ms = timed(b)
                    if ms == float("inf"):
                        continue
                    valid += 1
                    n_id += 1
                    row = {"ms": ms, "ID": int(aid), "TILE_ID": tile, "STAGES_ID": stage, "SPLITK_NUM": sk,
                           "CTA_SWIZZLING": sw, "CUSTOM_OPTION": co, "CLUSTER_SHAPE_ID": cl}
                    if best is None or ms < best["ms"]:
                        best = row
                    if best_id is None or ms < best_id["ms"]:
                        best_id = row
                per_id[int(aid)] = (f"{n_id} ran, best {best_id['ms']:.4f} ms tile {best_id['TILE_ID']} stages "
                                    f"{best_id['STAGES_ID']} splitK {best_id['SPLITK_NUM']}" if best_id else
                                    f"none ran (tiles {len(tiles)}, stages {len(stages)})")
            print(f"  enumerated {len(ids)} ids in {time.time() - t_start:.0f} s: {tried} configurations passed the "
                  f"check, {valid} ran", flush=True)
            for aid, txt in per_id.items():
                print(f"    id {aid}: {txt}", flush=True)
            if best:
                print(f"  best enumerated: {best['ms']:.4f} ms ({flop / best['ms'] / 1e9:.0f} TFLOP/s) vs the "
                      f"heuristic's best {hbest['ms']:.4f}: {hbest['ms'] / best['ms']:.3f}x  {best}", flush=True)
            res["shapes"].append({"group": group, "name": name, "M": M, "N": N, "K": K, "epilogue": epi,
                                  "heuristic": heur, "best": best, "per_id": per_id})
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
