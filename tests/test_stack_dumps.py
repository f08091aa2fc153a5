"""`kill -USR1` on a training process writes every thread's Python stack to $LLMPY_STACKS (how a hung data-parallel
rank is located, see docs/multi-gpu.md)."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from llmpy.data.shards import write_shard


@pytest.mark.slow
def test_sigusr1_writes_the_training_stack(tmp_path):
    write_shard(tmp_path / "tr_000.bin", np.random.default_rng(0).integers(0, 50257, 20000).astype(np.uint16))
    stacks = tmp_path / "stacks"
    cmd = [sys.executable, "-m", "llmpy", "train", "--init", "l2h2c64t32", "--train-data", str(tmp_path / "tr_*.bin"),
           "--batch-size", "2", "--seq-len", "32", "--steps", "1000000", "--val-every", "0", "--sample-tokens", "0",
           "--checkpoint-every", "0", "--no-progress", "--out", str(tmp_path / "run"), "--device", "cpu"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, LLMPY_STACKS=str(stacks)))
    try:
        head = [p.stdout.readline() for _ in range(4)]  # model, device, data, "training steps ..."
        assert "training steps" in head[-1], head
        time.sleep(1.0)  # inside the loop now
        p.send_signal(signal.SIGUSR1)
        path = stacks / f"stacks-{p.pid}.txt"
        deadline = time.time() + 20
        while time.time() < deadline and "train/loop.py" not in (path.read_text() if path.exists() else ""):
            time.sleep(0.2)
        text = path.read_text()
        assert "Current thread" in text and "llmpy/train/loop.py" in text.replace(os.sep, "/")
        assert p.poll() is None, "the dump must not stop the run"
    finally:
        p.kill()
        p.wait()
