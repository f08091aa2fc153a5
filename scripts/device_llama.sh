#!/usr/bin/env bash
# On the GPU machine: the GPU tests (kernels, GPT-2 and Llama 3 whole-model), then the Llama 3.2 1B benchmark
# against PyTorch (benchmarks/gpu.py). Usage (device tool, carry .whl): bash scripts/device_llama.sh [stages]
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 LLMPY_CACHE=/tmp/llmpy-cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/summary.txt"
for st in ${*:-tests bench}; do
  case $st in
    tests)
      timeout 420 python3 -m pytest -q -rfEs -m gpu -s tests/test_cuda_kernels.py tests/test_cuda_model.py \
        tests/test_cuda_llama.py > "$OUT/gpu_tests.log" 2>&1
      grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | head -20 | tee -a "$OUT/summary.txt"
      echo "tests: $(tail -1 "$OUT/gpu_tests.log")" | tee -a "$OUT/summary.txt" ;;
    bench)
      PYTHONPATH=/tmp/site timeout 400 python3 benchmarks/gpu.py --model llama3.2:1b --batch 8 --seq 2048 --steps 20 \
        --warmup 6 --json "$OUT/bench_llama1b.json" > "$OUT/bench_llama1b.log" 2>&1
      tail -8 "$OUT/bench_llama1b.log" | tee -a "$OUT/summary.txt" ;;
  esac
done
