#!/usr/bin/env bash
# On the GPU machine: the MatMul-free GPU tests (kernels and the whole model), then the benchmarks: a 370M training
# step against the reference implementation (benchmarks/gpu.py; the reference from build/ref/mmfreelm, carried),
# batch-1 decoding packed vs latent at 1.3B (benchmarks/mmfree_decode.py), per-kernel profiles
# (benchmarks/kernel_profile.py), fused vs unfused BitLinear (benchmarks/bitlinear_fused.py), the 2-GPU tests
# (needs the x2 kind) and the loss comparison of the three families (benchmarks/compare_families.py --preset gpu).
# Usage (device tool, carry .whl and build/ref): bash scripts/device_mmfree.sh [stage...]
#   stages: all tests packed bench bench1 decode kernels profile fused multi compare (default: tests bench decode); all: every
#   single-GPU test of the repository (the shared kernels changed too), tests: the MatMul-free ones
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 LLMPY_CACHE=/tmp/llmpy-cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/summary.txt"
step() {  # step NAME SECONDS COMMAND...: log to $OUT/NAME.log, the tail into the summary
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  timeout "$secs" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "== $name: exit $rc in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
}
for st in ${*:-tests bench decode}; do
  case $st in
    all)
      step all_gpu_tests 230 python3 -m pytest -q -rfEs -m gpu tests --ignore tests/test_cuda_multi.py
      grep -E "^(FAILED|ERROR)" "$OUT/all_gpu_tests.log" | head -20 | tee -a "$OUT/summary.txt"
      tail -1 "$OUT/all_gpu_tests.log" | tee -a "$OUT/summary.txt" ;;
    packed)
      step packed_tests 90 python3 -m pytest -q -rfEs -m gpu tests/test_cuda_kernels.py tests/test_cuda_mmfree.py -k "packed or decod"
      tail -1 "$OUT/packed_tests.log" | tee -a "$OUT/summary.txt" ;;
    tests)
      step gpu_tests 240 python3 -m pytest -q -rfEs -m gpu -s tests/test_cuda_kernels.py \
        -k "bitlinear or mlgru or lower or mmfree or packed or int8" tests/test_cuda_mmfree.py
      grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | head -20 | tee -a "$OUT/summary.txt"
      tail -1 "$OUT/gpu_tests.log" | tee -a "$OUT/summary.txt" ;;
    bench)  # ours at recompute 2 and the reference, side by side
      step bench_mmfree370m 220 python3 benchmarks/gpu.py --model mmfree:370m --batch 8 --seq 2048 --steps 20 \
        --warmup 5 --recompute 2 --json "$OUT/bench_mmfree370m.json"
      tail -8 "$OUT/bench_mmfree370m.log" | tee -a "$OUT/summary.txt" ;;
    bench1)  # ours alone at recompute 1
      step bench_mmfree370m_r1 100 python3 benchmarks/gpu.py --model mmfree:370m --batch 8 --seq 2048 --steps 20 \
        --warmup 5 --recompute 1 --sides llmpy --json "$OUT/bench_mmfree370m_r1.json"
      tail -5 "$OUT/bench_mmfree370m_r1.log" | tee -a "$OUT/summary.txt" ;;
    decode)
      step decode_1.3b 80 python3 benchmarks/mmfree_decode.py --model mmfree:1.3b --tokens 48 \
        --json "$OUT/decode_1.3b.json"
      tail -8 "$OUT/decode_1.3b.log" | tee -a "$OUT/summary.txt" ;;
    kernels)  # the decode kernel per BitLinear shape (and i, f, g in one launch)
      step decode_kernels 90 python3 benchmarks/mmfree_decode_kernels.py
      tail -9 "$OUT/decode_kernels.log" | tee -a "$OUT/summary.txt" ;;
    profile)
      step profile_train 110 python3 benchmarks/kernel_profile.py --what train --model mmfree:370m --batch 8 \
        --seq 2048 --recompute 2 --mode graph --json "$OUT/profile_train.json"
      head -40 "$OUT/profile_train.log" | tee -a "$OUT/summary.txt"
      step profile_decode 90 python3 benchmarks/kernel_profile.py --what decode --model mmfree:1.3b --packed \
        --tokens 4 --mode graph --json "$OUT/profile_decode.json"
      head -40 "$OUT/profile_decode.log" | tee -a "$OUT/summary.txt" ;;
    fused)
      step fused 100 python3 benchmarks/bitlinear_fused.py --json "$OUT/fused.json"
      tail -20 "$OUT/fused.log" | tee -a "$OUT/summary.txt" ;;
    multi)
      step multi 180 python3 -m pytest -q -rfEs -s tests/test_cuda_multi.py -k mmfree
      tail -3 "$OUT/multi.log" | tee -a "$OUT/summary.txt" ;;
    compare)
      step compare 200 python3 benchmarks/compare_families.py --preset gpu --out "$OUT/compare_gpu"
      tail -12 "$OUT/compare.log" | tee -a "$OUT/summary.txt" ;;
  esac
done
