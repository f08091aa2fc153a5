#!/usr/bin/env bash
# On the 2-GPU machine: the multi-GPU tests and the d12 scaling benchmark.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
python3 -m pytest -q -m gpu tests/test_cuda_kernels.py -k adamw 2>&1 | tail -1
timeout 140 python3 -m pytest -q -rA -m gpu tests/test_cuda_multi.py -k "match_one_gpu" -s 2>&1 | tee $OUT/multi1.log | grep -E "ZeRO|passed|failed|Error|assert" | tail -8
timeout 110 python3 benchmarks/gpu_scaling.py --model d12 --batch 64 --seq 1024 --gpus 2 --steps 25 --json $OUT/scaling.json 2>&1 | tail -7
timeout 100 python3 -m pytest -q -rA -m gpu tests/test_cuda_multi.py -k "resume or dead" -s 2>&1 | tee $OUT/multi2.log | grep -E "passed|failed|Error|assert" | tail -6
