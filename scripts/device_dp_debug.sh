#!/usr/bin/env bash
# Debug a 2-rank run on the GPU machine: eager, then graphed; each gets a time window, then every rank dumps its
# Python stacks (faulthandler on SIGABRT) so a hang shows where it is.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 PYTHONFAULTHANDLER=1 NCCL_DEBUG=WARN
python3 -c "
import numpy as np; from llmpy.data.shards import write_shard
write_shard('/tmp/dp_000.bin', np.random.default_rng(0).integers(0, 50257, 200000).astype(np.uint16))"
for mode in --no-graph ""; do
  log=$OUT/dp${mode:---graph}.txt
  python3 -m llmpy launch --nproc-per-node 2 --timeout 60 -- train --init l2h2c128t64 --train-data /tmp/dp_000.bin \
    --batch-size 4 --seq-len 64 --steps 6 --val-every 3 --val-batches 2 --sample-tokens 0 --no-progress \
    --out /tmp/dp$RANDOM --device cuda $mode > $log 2>&1 &
  pid=$!
  for i in $(seq 1 ${1:-60}); do kill -0 $pid 2>/dev/null || break; sleep 1; done
  if kill -0 $pid 2>/dev/null; then echo "HUNG ($mode): dumping stacks"; pkill -ABRT -f "llmpy train"; sleep 3; kill -9 $pid; pkill -9 -f "llmpy train"; fi
  echo "=== $mode"; grep -v "^\s*$" $log | tail -45
done
