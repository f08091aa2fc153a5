#!/usr/bin/env bash
# On the 2-GPU machine (device kind nvidia-h200-x2): the single-GPU tests, a 2-rank smoke run, the 2-GPU tests and
# the d12 scaling benchmark, each in a time window. A window that runs out makes every rank write its Python stacks
# (SIGUSR1 -> faulthandler, LLMPY_STACKS) before everything is killed, so a hang shows where it is.
# Usage: bash scripts/device_multi.sh [stages...]   (default: tests smoke match scaling resume dead; also scaling48,
# nomaster: d48 on 1 GPU without fp32 master weights, after smoke has written its data). GPUS=4 LIMIT=480 for the
# scaling stages on the 4-GPU kind.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 LLMPY_STACKS=/tmp/stacks LLMPY_CACHE=/tmp/llmpy-cache
OUT=${OUT:-/tmp/out}; LOGS=/tmp/device-logs; rm -rf $LOGS; rm -rf /tmp/stacks; mkdir -p "$OUT" $LOGS /tmp/stacks
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader > "$OUT/summary.txt"
LIMIT=${LIMIT:-570}  # seconds for the whole script

window() {  # window SECONDS NAME COMMAND...: runs COMMAND, logging to $LOGS/NAME.log; stacks + kill on expiry
  local secs=$1 name=$2; shift 2
  local left=$((LIMIT - SECONDS - 10)); ((secs > left)) && secs=$left
  if ((left < 20)); then echo "$name: skipped (no time left)" | tee -a "$OUT/summary.txt"; return 1; fi
  local t0=$SECONDS
  setsid "$@" > "$LOGS/$name.log" 2>&1 & local pid=$!
  while kill -0 $pid 2>/dev/null && ((SECONDS - t0 < secs)); do sleep 1; done
  if kill -0 $pid 2>/dev/null; then
    pkill -USR1 -f "llmpy train"; sleep 3
    kill -9 -- -$pid 2>/dev/null; pkill -9 -f "llmpy (train|launch)"; sleep 1
    echo "$name: TIMED OUT after ${secs}s (stacks in stacks.txt)" | tee -a "$OUT/summary.txt"; return 124
  fi
  wait $pid; local rc=$?
  echo "$name: exit $rc in $((SECONDS - t0))s | $(grep -E 'passed|failed|error' "$LOGS/$name.log" | tail -1)" | tee -a "$OUT/summary.txt"
  return $rc
}

smoke() {
  rm -rf /tmp/smoke
  python3 -c "import numpy as np; from llmpy.data.shards import write_shard; write_shard('/tmp/dp_000.bin', np.random.default_rng(0).integers(0, 50257, 200000).astype(np.uint16))"
  python3 -m llmpy launch --nproc-per-node 2 --timeout 60 -- train --init l2h2c128t64 --train-data /tmp/dp_000.bin \
    --batch-size 4 --seq-len 64 --steps 6 --val-every 3 --val-batches 2 --sample-tokens 0 --no-progress \
    --out /tmp/smoke --device cuda --zero 1
}

stages=${*:-tests smoke match scaling resume dead}
for st in $stages; do
  case $st in
    tests) window 150 tests python3 -m pytest -q -rfEs -m gpu tests/test_cuda_kernels.py tests/test_cuda_model.py ;;
    smoke) window 90 smoke bash -c "$(declare -f smoke); smoke" || break ;;
    match) window 330 match python3 -m pytest -q -rfE -s -m gpu tests/test_cuda_multi.py -k match_one_gpu ;;
    scaling) window 240 scaling python3 benchmarks/gpu_scaling.py --model d12 --batch 64 --seq 1024 --gpus ${GPUS:-2} --steps 30 ;;
    resume) window 200 resume python3 -m pytest -q -rfE -s -m gpu tests/test_cuda_multi.py -k resume ;;
    dead) window 90 dead python3 -m pytest -q -rfE -s -m gpu tests/test_cuda_multi.py -k dead ;;
    scaling48) window 300 scaling48 python3 benchmarks/gpu_scaling.py --model d48 --batch 8 --seq 1024 --gpus ${GPUS:-2} --steps 20 ;;
    nomaster) window 120 nomaster bash -c "rm -rf /tmp/nm; python3 -m llmpy train --init d48 --train-data /tmp/dp_000.bin \
      --batch-size 8 --seq-len 1024 --steps 12 --val-every 0 --sample-tokens 0 --checkpoint-every 0 --no-progress \
      --no-master-weights --device cuda --out /tmp/nm && tail -4 /tmp/nm/metrics.jsonl" ;;
  esac
done
cat /tmp/stacks/*.txt > "$LOGS/stacks.txt" 2>/dev/null
tar -czf "$OUT/logs.tgz" -C $LOGS .  # the device returns at most 8 files: one archive of all logs
echo "total ${SECONDS}s" >> "$OUT/summary.txt"; cat "$OUT/summary.txt"
