#!/usr/bin/env bash
# On the GPU machine: the MatMul-free GPU tests (kernels and the whole model), then the benchmarks: a 370M training
# step against the reference implementation (benchmarks/gpu.py; the reference from build/ref/mmfreelm, carried),
# and batch-1 decoding packed vs latent at 1.3B (benchmarks/mmfree_decode.py).
# Usage (device tool, carry .whl and build/ref): bash scripts/device_mmfree.sh [tests] [bench] [decode]
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 LLMPY_CACHE=/tmp/llmpy-cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/summary.txt"
for st in ${*:-tests bench decode}; do
  case $st in
    tests)
      timeout 300 python3 -m pytest -q -rfEs -m gpu -s tests/test_cuda_kernels.py -k "bitlinear or mlgru or lower or mmfree or packed" \
        tests/test_cuda_mmfree.py > "$OUT/gpu_tests.log" 2>&1
      grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | head -20 | tee -a "$OUT/summary.txt"
      echo "tests: $(tail -1 "$OUT/gpu_tests.log")" | tee -a "$OUT/summary.txt" ;;
    bench)
      timeout 300 python3 benchmarks/gpu.py --model mmfree:370m --batch 8 --seq 2048 --steps 20 --warmup 5 \
        --json "$OUT/bench_mmfree370m.json" > "$OUT/bench_mmfree370m.log" 2>&1
      tail -8 "$OUT/bench_mmfree370m.log" | tee -a "$OUT/summary.txt" ;;
    decode)
      timeout 240 python3 benchmarks/mmfree_decode.py --model mmfree:1.3b --tokens 48 --json "$OUT/decode_1.3b.json" \
        > "$OUT/decode_1.3b.log" 2>&1
      tail -8 "$OUT/decode_1.3b.log" | tee -a "$OUT/summary.txt" ;;
  esac
done
