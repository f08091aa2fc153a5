#!/usr/bin/env bash
# On the GPU machine, for a change that must not alter behaviour or speed: the GPU tests, then benchmarks/gpu.py
# (llmpy side only) of an earlier checkout in build/old (carried) and of this one, taking turns, then sampling on
# the GPU against the CPU. Usage (device tool, carry .whl and build/old): bash scripts/device_seam.sh [stages]
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 LLMPY_CACHE=/tmp/llmpy-cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
NEW=$PWD
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/summary.txt"
for st in ${*:-tests bench sample}; do
  case $st in
    tests)
      PYTHONPATH=/tmp/site:$NEW timeout 300 python3 -m pytest -q -rfEs -m gpu -s tests/test_cuda_kernels.py \
        tests/test_cuda_model.py tests/test_cuda_compile.py > "$OUT/gpu_tests.log" 2>&1
      echo "tests: $(tail -1 "$OUT/gpu_tests.log")" | tee -a "$OUT/summary.txt" ;;
    bench)  # gpu.py puts its own checkout first on the side process's path
      for i in 1 2; do
        for side in old new; do
          root=$NEW; [ $side = old ] && root=$NEW/build/old
          (cd "$root" && PYTHONPATH=/tmp/site timeout 240 python3 benchmarks/gpu.py --model d12 --batch 64 --seq 1024 \
            --steps 20 --warmup 8 --sides=llmpy --json "$OUT/bench_${side}_$i.json" 2>&1 | grep -E "^\| llmpy|failed" \
            | sed "s/^/$side $i: /" | tee -a "$OUT/summary.txt")
        done
      done ;;
    sample)
      export PYTHONPATH=/tmp/site:$NEW
      python3 -c "import numpy as np; from llmpy.data.shards import write_shard; write_shard('/tmp/s_000.bin', np.random.default_rng(0).integers(0, 50257, 50000).astype(np.uint16))"
      python3 -m llmpy train --init l2h4c128t64 --train-data /tmp/s_000.bin --batch-size 4 --seq-len 64 --steps 5 \
        --val-every 0 --sample-tokens 0 --no-progress --device cuda --out /tmp/smp > /dev/null 2>&1
      for dev in cpu cuda; do
        echo "sample $dev: $(python3 -m llmpy sample --checkpoint /tmp/smp/checkpoint.safetensors --prompt 'To be' \
          --temperature 0 -n 16 --device $dev --dtype fp32 2>&1 | tail -1)" | tee -a "$OUT/summary.txt"
      done ;;
  esac
done
