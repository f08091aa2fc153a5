#!/usr/bin/env bash
# Issue 15's GPU run (see shared/GPU.md for the machine): llm.c's gpt2-124m recipe on Shakespeare (the data at hand:
# the GPU machine has no network, so no FineWeb and no HellaSwag download), scored during training on a
# HellaSwag-format task made from Shakespeare's val text (scripts/next_line_task.py), then the final checkpoint read
# back by `llmpy eval`. Overrides of the recipe: the data, --total-batch-size 131072 (2 micro-batches of 64 x 1024),
# --steps, --warmup-steps and the val/eval cadence, so that a few minutes show a whole curve. Usage (device tool):
#   bash scripts/device_reproduce.sh [STEPS]          logs, metrics.jsonl, the plot and eval output go to $OUT
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 LLMPY_CACHE=/tmp/llmpy-cache LLMPY_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; STEPS=${1:-400}
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv | tee "$OUT/nvidia-smi.txt"
read -r TRAIN VAL < <(python3 -c "from llmpy.data.prepare import prepare_shakespeare as p; print(*p())" | tail -1)
python3 scripts/next_line_task.py /tmp/shakespeare_next_line.jsonl --n 500 | tee "$OUT/task.txt"
cp /tmp/shakespeare_next_line.jsonl "$OUT/"
RUN=/tmp/run124m
python3 -m llmpy train --recipe gpt2-124m --device cuda --train-data "$TRAIN" --val-data "$VAL" \
  --total-batch-size 131072 --steps "$STEPS" --warmup-steps $((STEPS / 10)) --val-every 20 --eval-every 20 \
  --eval-tasks /tmp/shakespeare_next_line.jsonl --checkpoint-every $((STEPS / 2)) --sample-tokens 64 \
  --out "$RUN" --no-progress 2>&1 | tee "$OUT/train.log" | grep -v "^step .*[13579] " | tail -80
cp "$RUN"/metrics.jsonl "$RUN"/*.png "$RUN"/*.json "$OUT/" 2>/dev/null; ls -la "$RUN" | tee "$OUT/run_ls.txt"
echo "== llmpy eval --tasks (the final checkpoint, CUDA and CPU)" | tee "$OUT/eval.txt"
python3 -m llmpy eval --checkpoint "$RUN" --device cuda --tasks /tmp/shakespeare_next_line.jsonl 2>&1 | tee -a "$OUT/eval.txt"
python3 -m llmpy eval --checkpoint "$RUN" --device cpu --tasks /tmp/shakespeare_next_line.jsonl --limit 100 2>&1 | tee -a "$OUT/eval.txt"
python3 -m llmpy eval --checkpoint "$RUN" --device cuda 2>&1 | tee -a "$OUT/eval.txt"
[ -n "${EVAL_TESTS:-}" ] && python3 -m pytest -q -rA -m gpu tests/test_evals.py 2>&1 | tee "$OUT/gpu_evals.log" | tail -4
