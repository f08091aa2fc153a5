#!/usr/bin/env bash
# On the GPU machine: GPU tests, then the d12 and d48 benchmarks (llmpy vs PyTorch) and the d12 per-op profile.
set -u
bash scripts/device_tests.sh > /dev/null 2>&1; tail -3 "$OUT/gpu_tests.log"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 benchmarks/gpu.py --model d12 --batch 64 --seq 1024 --steps 20 --warmup 8 --json "$OUT/bench_d12.json" "$@" 2>&1 | tail -6
python3 benchmarks/gpu_profile.py --model d12 --batch 64 --seq 1024 > "$OUT/profile_d12.txt" 2>&1; tail -1 "$OUT/profile_d12.txt"
python3 benchmarks/gpu.py --model d48 --batch 8 --seq 1024 --steps 20 --warmup 6 --recompute 2 --json "$OUT/bench_d48.json" 2>&1 | tail -6
python3 benchmarks/gpu.py --model d48 --batch 8 --seq 1024 --steps 20 --warmup 6 --recompute 2 --no-master-weights --sides llmpy --json "$OUT/bench_d48_nomaster.json" 2>&1 | tail -3
