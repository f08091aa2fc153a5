#!/usr/bin/env bash
# Runs on the lent GPU machine (see shared/GPU.md): installs the carried wheels, then the GPU tests and a short
# CUDA training run; logs go to $OUT. Usage (device tool): bash scripts/device_tests.sh [pytest args]
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
export LLMPY_CACHE=/tmp/llmpy-cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv | tee "$OUT/nvidia-smi.txt"
python3 -c "import cupy, cudnn, nvmath; print('cupy', cupy.__version__, 'cudnn backend', cudnn.backend_version())" 2>&1 | tee "$OUT/versions.txt"
python3 -m pytest -q -rA -m gpu "$@" tests/test_cuda_kernels.py tests/test_cuda_model.py -s 2>&1 | tee "$OUT/gpu_tests.log" | tail -60
