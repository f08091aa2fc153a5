"""Data parallel on 2 GPUs (`llmpy launch`): DP, ZeRO-1 and ZeRO-2 runs of 20 steps against a 1-GPU run with the
same global batch (gradient accumulation), for GPT-2, Llama 3 and the MatMul-free LM, and GPT-2 and Llama 3 with
--dtype fp8; per-rank memory falls with the ZeRO stage; resume of a ZeRO run (fp8 too); --tune-gemm's choices
shared by the ranks and replayed.
Needs 2 GPUs of one host; skipped elsewhere."""
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from llmpy.data.shards import write_shard
from streams import phrase_stream

pytestmark = pytest.mark.gpu


def gpus() -> int:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount()
    except Exception:
        return 0


needs2 = pytest.mark.skipif(gpus() < 2, reason="needs 2 GPUs")
STEPS = 20


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("multi")
    r = np.random.default_rng(0)
    stream = phrase_stream(r, 12000, phrases=40, length=11)
    write_shard(d / "tr_000.bin", stream[:120000])
    write_shard(d / "va_000.bin", stream[120000:])
    return d


def train(data, out, *, nproc=1, extra=(), init="l4h4c256t128"):
    cmd = [sys.executable, "-m", "llmpy"]
    if nproc > 1:
        cmd += ["launch", "--nproc-per-node", str(nproc), "--timeout", "120", "--"]
    cmd += ["train", "--init", init, "--train-data", str(data / "tr_*.bin"), "--val-data",
            str(data / "va_*.bin"), "--batch-size", "8", "--seq-len", "128", "--steps", str(STEPS), "--no-shuffle",
            "--val-every", "10", "--val-batches", "4", "--sample-tokens", "4", "--no-progress", "--lr", "1e-3",
            "--out", str(out), "--device", "cuda", *extra]
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    print(f"\n  {out.name}: {nproc} process(es), {' '.join(extra)}: exit {p.returncode} after "
          f"{time.perf_counter() - t0:.1f} s", flush=True)  # with -s: where the time goes on the device
    assert p.returncode == 0, f"{' '.join(cmd)}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    ev = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return ev, p.stdout


def losses(ev):
    return np.array([e["train_loss"] for e in ev if "train_loss" in e])


def plan_total(stdout) -> float:
    m = re.search(r"total ([\d.]+) (GiB|MiB)", stdout)
    return float(m.group(1)) * (1024 if m.group(2) == "GiB" else 1)


@needs2
@pytest.mark.parametrize("init,dtype", [("l4h4c256t128", "bf16"), ("llama3:l4d256h4k2f512t128r8", "bf16"),
                                        ("mmfree:l4d256i512t128", "bf16"), ("l4h4c256t128", "fp8"),
                                        ("llama3:l4d256h4k2f512t128r8", "fp8")])
def test_dp_and_zero_match_one_gpu_with_accumulation(data, tmp_path, init, dtype):
    """fp8: the ranks combine their amax by max, so their scales are one GPU's with two micro-batches."""
    dt = ("--dtype", dtype)
    ref, _ = train(data, tmp_path / "one", extra=dt + ("--grad-accum", "2"), init=init)
    base = losses(ref)
    assert base[-1] < base[0] - 1.0, "the reference run should learn"
    totals = {}
    for zero in (0, 1, 2):
        ev, out = train(data, tmp_path / f"z{zero}", nproc=2, extra=dt + ("--zero", str(zero)), init=init)
        got = losses(ev)
        diff = np.abs(got - base).max()
        print(f"\n{init} {dtype} ZeRO-{zero}: max |loss - 1-GPU loss| over {STEPS} steps = {diff:.2e}; plan "
              f"{plan_total(out):.1f} MiB")
        assert len(got) == STEPS and diff <= 2e-2
        vals = [e["val_loss"] for e in ev if "val_loss" in e]
        assert len(vals) == 3 and abs(vals[-1] - [e["val_loss"] for e in ref if "val_loss" in e][-1]) <= 2e-2
        totals[zero] = plan_total(out)
    assert totals[0] > totals[1] > totals[2], f"per-rank memory should fall with the ZeRO stage: {totals}"


@needs2
@pytest.mark.parametrize("zero,init,dtype", [(0, "l4h4c256t128", "bf16"), (2, "l4h4c256t128", "bf16"),
                                             (2, "mmfree:l4d256i512t128", "bf16"),
                                             (2, "llama3:l4d256h4k2f512t128r8", "fp8")])
def test_resume_is_bitwise_with_two_ranks(data, tmp_path, zero, init, dtype):
    """fp8: the scale state (amax histories, scales) resumes with the ZeRO shards."""
    z = ("--zero", str(zero), "--dtype", dtype)
    full, _ = train(data, tmp_path / "full", nproc=2, extra=z, init=init)
    train(data, tmp_path / "part", nproc=2, extra=z + ("--stop-at", "9"), init=init)
    cmd = [sys.executable, "-m", "llmpy", "launch", "--nproc-per-node", "2", "--", "train", "--resume",
           str(tmp_path / "part"), "--no-progress"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=dict(os.environ, NCCL_NVLS_ENABLE="0"))
    assert p.returncode == 0, p.stderr[-3000:]
    resumed = [json.loads(line) for line in open(tmp_path / "part" / "metrics.jsonl")]
    key = [(e["step"], e.get("train_loss"), e.get("val_loss")) for e in full]
    assert [(e["step"], e.get("train_loss"), e.get("val_loss")) for e in resumed] == key


@needs2
@pytest.mark.parametrize("zero", [0, 2])
def test_tuned_products_agree_across_ranks_and_replay(data, tmp_path, zero):
    """--tune-gemm with 2 ranks: every rank runs rank 0's choices from the first step, so a fresh 2-rank run given
    the tuned run's checkpoint (--gemm-algos) equals it bitwise; the tuned run learns as the untuned one does."""
    from llmpy.formats.checkpoint import load_checkpoint
    z = ("--zero", str(zero))
    tuned, out = train(data, tmp_path / "t", nproc=2, extra=z + ("--tune-gemm",))
    assert "tune-gemm: timed" in out
    ck = tmp_path / "t" / "checkpoint.safetensors"
    assert load_checkpoint(ck).state["gemm_algos"]["algos"], "a tuned run must record (rank 0's) choices"
    replay, _ = train(data, tmp_path / "r", nproc=2, extra=z + ("--gemm-algos", str(ck)))
    key = [(e["step"], e.get("train_loss"), e.get("val_loss")) for e in tuned]
    assert [(e["step"], e.get("train_loss"), e.get("val_loss")) for e in replay] == key
    plain, _ = train(data, tmp_path / "p", nproc=2, extra=z)
    assert abs(losses(plain)[-1] - losses(tuned)[-1]) < 0.05


@needs2
def test_a_dead_rank_stops_the_job(data, tmp_path):
    """One rank is killed mid-run: the launcher must stop the other and fail within the timeout."""
    cmd = [sys.executable, "-m", "llmpy", "launch", "--nproc-per-node", "2", "--timeout", "30", "--grace", "5",
           "--", "train", "--init", "l4h4c256t128", "--train-data", str(data / "tr_*.bin"), "--batch-size", "8",
           "--seq-len", "128", "--steps", "100000", "--val-every", "0", "--sample-tokens", "0", "--no-progress",
           "--out", str(tmp_path / "dead"), "--device", "cuda"]
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", LLMPY_FAULT_INJECT="1:5")  # rank 1 dies at step 5
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode != 0
    assert "rank 1" in (p.stdout + p.stderr)
