"""Batch-1 decode of the packed MatMul-free LM: the decode step as one persistent kernel (kernels/mmfree_decode.cu)
against the per-op kernels (persistent_decode off), side by side in one run on the same random packed weights
(random codes and scales: the speed does not depend on the values). Checks that the two give the same logits and
recurrent states bit for bit over the first --check tokens, then times each: the device time of a token's CUDA
graph (events around --replays back-to-back replays) and the wall time of a decode_step (token upload, replay,
logits read back: what `llmpy sample` pays). MBU: the code bytes a token reads (the kernel's: base 3 transcribed to
2-bit when it reads fields) / device time / the HBM peak.

    python dev/mmfree_decode_step.py [--model mmfree:1.3b] [--packing base3] [--peak-tbs 3.35] [--json f.json]

Absolute times only mean anything on the GPU, with its date."""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def random_packed(cfg, packing, seed=0):
    """The model's parameters as a packed file holds them: random ternary codes (valid bytes of `packing`) and
    scales for the TERNARY weights, bf16-representable norms, embedding and lower bounds."""
    import numpy as np

    from llmpy.config import family_of
    from llmpy.formats.bf16 import bf16_bits_to_fp32, fp32_to_bf16_bits
    from llmpy.formats.ternary import PackedTernary
    from llmpy.models.mmfree import MMFree

    r = np.random.default_rng(seed)
    out = {}
    for s in family_of(cfg).spec(cfg):
        if s.name in MMFree.TERNARY:
            *lead, K = s.shape
            per = 5 if packing == "base3" else 4
            shape = (*lead, -(-K // per))
            if packing == "base3":
                codes = r.integers(0, 243, shape, dtype=np.uint8)
            else:  # four 2-bit fields of 0, 1 or 3 (-1)
                f = r.choice(np.array([0, 1, 3], np.uint8), (*shape, 4))
                codes = (f[..., 0] | f[..., 1] << 2 | f[..., 2] << 4 | f[..., 3] << 6).astype(np.uint8)
            scale = r.uniform(20, 40, lead[:1] if s.per_layer else ()).astype(np.float32)
            out[s.name] = PackedTernary(codes, scale, K, packing)
        else:
            v = (0.02 * r.standard_normal(s.shape) if s.name == "wte" else
                 (s.init == "ones") + 0.1 * r.standard_normal(s.shape)).astype(np.float32)
            out[s.name] = bf16_bits_to_fp32(fp32_to_bf16_bits(v))
    return out


def differing(new, old):
    """The intermediate rows of the last decode step where the two paths differ: the kernel's scratch against the
    per-op path's activations of the last layer (its ai, af, ag, the SwiGLU output, the residuals, down's output)."""
    import numpy as np

    be, L, a = new.be, new.cfg.num_layers, old.acts
    ours = new._one_kernel_plan[1]["scratch"]
    theirs = {"ai": a["ai"][L - 1], "af": a["af"][L - 1], "ag": a["ag"][L - 1], "sw": old._sw(L - 1),
              "r2": a["residual2"][L - 1], "pd": a["proj"], "r1": a["residual3"][L - 2] if L > 1 else a["encoded"]}
    return [k for k, v in theirs.items()
            if not np.array_equal(be.to_numpy(ours[k]).reshape(-1), be.to_numpy(v).reshape(-1))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mmfree:1.3b")
    ap.add_argument("--packing", default="base3", choices=["base3", "2bit"])
    ap.add_argument("--check", type=int, default=8, help="tokens compared bit for bit")
    ap.add_argument("--tokens", type=int, default=64, help="decode_step calls timed")
    ap.add_argument("--replays", type=int, default=200, help="graph replays timed")
    ap.add_argument("--table", action="store_true", help="the code-table inner loop, not the 2-bit fields")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--peak-tbs", type=float, help="HBM peak, TB/s (default: H200 4.8, else H100 SXM's 3.35)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import cupy as cp
    import numpy as np

    from llmpy.backends import get_backend
    from llmpy.config import config_from_name
    from llmpy.models.decode import decoder

    gpu = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    peak = args.peak_tbs or (4.8 if "H200" in gpu else 3.35)
    cfg = config_from_name(args.model)
    t0 = time.perf_counter()
    params = random_packed(cfg, args.packing)
    print(f"random packed weights in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    be = get_backend("cuda", "bf16")
    new, old = decoder(cfg, params, be), decoder(cfg, params, be)
    new.persistent_decode, old.persistent_decode = True, False
    be.mmfree.decode_fields = not args.table
    models = {"per-op kernels": old, "one kernel": new}
    states = {k: m.new_decode_state(cfg.max_seq_len) for k, m in models.items()}
    toks = np.random.default_rng(0).integers(0, cfg.vocab_size, args.check + args.tokens + 4)
    same = True
    for i in range(args.check):
        outs = [m.decode_step(np.array([[toks[i]]]), states[k]) for k, m in models.items()]
        hs = [be.to_numpy(st.h) for st in states.values()]
        ok = np.array_equal(outs[0].view(np.uint32), outs[1].view(np.uint32)) and np.array_equal(
            hs[0].view(np.uint32), hs[1].view(np.uint32))
        same &= ok
        if not ok:
            print(f"token {i}: logits max |diff| {np.abs(outs[0] - outs[1]).max():.3e}, state max |diff| "
                  f"{np.abs(hs[0] - hs[1]).max():.3e}; last layer's rows that differ: {differing(new, old)}")
    ran = getattr(new, "_one_kernel_plan", (None, None))[1] is not None
    if not ran:
        print(f"the one kernel does not apply: {getattr(be.mmfree, 'decode_step_why', '?')}")
    fields = ran and bool(int(cp.asnumpy(new._one_kernel_plan[1]["A"])[-1]))
    print(f"{args.model} {args.packing} ({'2-bit fields' if fields else 'code table'}), {time.strftime('%Y-%m-%d')}, "
          f"{gpu}: one kernel {'ran' if ran else 'DID NOT RUN'}; "
          f"logits and states over {args.check} tokens {'bit for bit equal' if same else 'DIFFER'}")
    code_bytes = sum(int(c[:new.Vl].nbytes if w == "lm_head" else c.nbytes)
                     for w, (c, _, _, _) in new.packed.items())
    read = {"per-op kernels": code_bytes, "one kernel": code_bytes}
    if ran:  # the codes the kernel reads (base 3 transcribed to 2-bit for the fields loop); the head's Vl rows
        *mats, head = new._one_kernel_plan[1]["arrays"]["codes"]
        read["one kernel"] = sum(int(c.nbytes) for c in mats) + int(head[:new.Vl].nbytes)
    res = {}
    for k, m in models.items():
        st = states[k]
        graph = m._decode_graph[1]
        a, b = cp.cuda.Event(), cp.cuda.Event()
        for _ in range(5):
            graph()
        a.record(be.stream)
        for _ in range(args.replays):
            graph()
        b.record(be.stream)
        b.synchronize()
        dev = cp.cuda.get_elapsed_time(a, b) / args.replays  # ms a token
        walls = []
        for t in toks[args.check:args.check + args.tokens]:
            w0 = time.perf_counter()
            m.decode_step(np.array([[t]]), st)
            walls.append(time.perf_counter() - w0)
        wall = statistics.median(walls) * 1e3
        res[k] = (dev, wall)
        print(f"{k:>15}: device {dev:.3f} ms/token ({1e3 / dev:,.0f} tok/s, MBU "
              f"{read[k] / (dev * 1e-3) / (peak * 1e12):.1%} of {read[k] / 1e6:.1f} MB); decode_step {wall:.3f} ms "
              f"({1e3 / wall:,.0f} tok/s)")
    if ran:  # where a token's time goes: block 0's phase timestamps, averaged over the layers
        plan, L = new._one_kernel_plan[1], cfg.num_layers
        buf = cp.zeros((4 * L + 1, 4), np.int64)
        ops = be.mmfree
        ops.decode_step_profile(plan, buf)
        cp.cuda.runtime.deviceSynchronize()  # the table's update lands before the replay reads it
        new._decode_graph[1]()
        cp.cuda.runtime.deviceSynchronize()
        ops.decode_step_profile(plan, None)
        t = cp.asnumpy(buf).astype(np.float64) / 1e3  # us
        span = t[-1, 3] - t[0, 0]
        print(f"block 0's phases (us, mean over layers; token {span:.1f} us in the kernel): kind: barrier wait, "
              f"staging + quantizing, rows")
        for kind, name in enumerate(("A i/f/g", "B MLGRU + o", "C gate/up", "D down")):
            ph = t[:4 * L].reshape(L, 4, 4)[:, kind]
            print(f"  {name:>12}: {np.mean(ph[:, 1] - ph[:, 0]):6.2f} {np.mean(ph[:, 2] - ph[:, 1]):6.2f} "
                  f"{np.mean(ph[:, 3] - ph[:, 2]):6.2f}")
        h = t[4 * L]
        print(f"  {'H head':>12}: {h[1] - h[0]:6.2f} {h[2] - h[1]:6.2f} {h[3] - h[2]:6.2f}")
    (d0, w0), (d1, w1) = res["per-op kernels"], res["one kernel"]
    if args.json:
        import json
        Path(args.json).write_text(json.dumps({
            "model": args.model, "packing": args.packing, "gpu": gpu, "date": time.strftime("%Y-%m-%d"),
            "bit_for_bit": bool(same), "one_kernel_ran": bool(ran), "fields": fields, "code_bytes": code_bytes,
            **{k: {"device_ms": v[0], "decode_step_ms": v[1]} for k, v in res.items()}}, indent=1))
    print(f"codes {code_bytes / 1e6:.1f} MB a token (peak {peak} TB/s); one kernel / per-op: {d0 / d1:.2f}x device, "
          f"{w0 / w1:.2f}x decode_step")


if __name__ == "__main__":
    main()
