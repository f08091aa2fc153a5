#!/usr/bin/env bash
# On the GPU machine (device tool, carry .whl): GPU performance round 2 (issues 12 and 14). Stages, in order given:
#   tests        every single-GPU test (kernels, GPT-2, Llama 3, MatMul-free)
#   quick        the optimizer/norm/LayerNorm kernel tests and the GPT-2 determinism/resume tests only
#   tune_tests   the --tune-gemm tests (kernel level; tuned run, resume and replay bitwise)
#   prof_d12 prof_d48 prof_llama   per-kernel profiles (benchmarks/kernel_profile.py, eager, one step)
#   graph_d48    the d48 profile of graph-replayed steps after 20 of them (sustained load)
#   bench_d12 bench_d48 bench_llama   benchmarks/gpu.py, llmpy vs PyTorch side by side
#   quality      300-step quality runs (benchmarks/quality.py): d12 optimizer variants and seeds vs PyTorch
#   quality_d48  the same at d48: the default optimizer and the lean one vs PyTorch
#   att_plans    every cuDNN plan of the attention backward, deterministic and not, timed
#   norm_variants  the norms' row kernels vs a baseline version (build/kernel_baseline, carried)
#   quality_d48_seed  the default optimizer at d48 with seed QSEED (7), llmpy only: the seed spread
#   variants     candidate kernels against the shipped ones, in isolation (benchmarks/kernel_variants.py)
#   gemm_search  cuBLASLt's enumerated algorithm configurations against its heuristic's (benchmarks/gemm_search.py)
#   gemm_sustained  d48's products timed as the tuner does and back-to-back at the power limit (benchmarks/gemm_sustained.py)
# LEAN="--no-master-weights --moments bf16" is the optimizer the d48 and Llama figures use (override with env LEAN);
# recompute: R12 (default 0), R48 (1), RL (0), with --recompute-keep K12, K48, KL (0); LEAN12 the d12 optimizer flags (default LEAN);
# SIDES=llmpy skips the PyTorch side of the benchmarks (SIDES=llmpy,llmpy+tune,torch adds a --tune-gemm side; +fast:
# --fast-attention, e.g. llmpy+tune+fast);
# VONLY="gelu swiglu" limits the variants stage to those groups; TUNE=--tune-gemm profiles with tuned products; TRACE=1 keeps prof_d48's chrome trace. Results: $OUT/summary.txt and $OUT/round2.tgz (the rest,
# with smi.csv: nvidia-smi's SM clock and power every 500 ms; summary.txt ends with their medians per stage and
# benchmark side).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 LLMPY_CACHE=/tmp/llmpy-cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LEAN=${LEAN:---no-master-weights --moments bf16}
R48=${R48:-1}; RL=${RL:-0}; R12=${R12:-0}; LEAN12=${LEAN12-$LEAN}
K12=${K12:-0}; K48=${K48:-0}; KL=${KL:-0}  # --recompute-keep (the first N layers keep their activations)
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee -a "$OUT/summary.txt"
# power and clocks every 500 ms through every stage (is a step power-bound?); stages.txt says when each ran
nvidia-smi --query-gpu=timestamp,index,clocks.sm,clocks.mem,power.draw,power.limit,temperature.gpu,utilization.gpu \
  --format=csv,noheader -lms 500 > "$OUT/smi.csv" 2>&1 &
SMI_PID=$!
export LLMPY_STAGES_FILE="$OUT/stages.txt"  # benchmarks/gpu.py adds its sides' start and end
for st in "$@"; do
  t0=$SECONDS
  echo "$(date +%H:%M:%S) start $st" >> "$OUT/stages.txt"
  case $st in
    tests)
      timeout 420 python3 -m pytest -q -rfEs -m gpu tests/test_cuda_kernels.py tests/test_cuda_model.py \
        tests/test_cuda_llama.py tests/test_cuda_mmfree.py tests/test_cuda_fresh_grads.py > "$OUT/gpu_tests.log" 2>&1
      grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | head -20 | tee -a "$OUT/summary.txt"
      echo "tests: $(tail -1 "$OUT/gpu_tests.log")" | tee -a "$OUT/summary.txt" ;;
    quick)
      timeout 300 python3 -m pytest -q -rfEs -m gpu tests/test_cuda_kernels.py -k "adamw or norm or matmul or gelu or classifier or attention" \
        > "$OUT/gpu_quick.log" 2>&1
      timeout 300 python3 -m pytest -q -rfEs -m gpu tests/test_cuda_model.py >> "$OUT/gpu_quick.log" 2>&1
      grep -E "^(FAILED|ERROR)|Error|assert" "$OUT/gpu_quick.log" | head -30 | tee -a "$OUT/summary.txt"
      echo "quick tests: $(grep -E "passed|failed" "$OUT/gpu_quick.log" | tail -2 | tr '\n' ' ')" | tee -a "$OUT/summary.txt" ;;
    tune_tests)
      timeout 300 python3 -m pytest -q -rfEs -m gpu tests/test_cuda_kernels.py tests/test_cuda_model.py \
        -k "tuned or determinism" > "$OUT/tune_tests.log" 2>&1
      grep -E "^(FAILED|ERROR)|Error|assert" "$OUT/tune_tests.log" | head -30 | tee -a "$OUT/summary.txt"
      echo "tune tests: $(tail -1 "$OUT/tune_tests.log")" | tee -a "$OUT/summary.txt" ;;
    prof_d12)
      timeout 300 python3 benchmarks/kernel_profile.py --what train --model d12 --batch 64 --seq 1024 --recompute $R12 --recompute-keep $K12 \
        ${TUNE:-} --mode eager --top 45 --json "$OUT/prof_d12.json" > "$OUT/prof_d12.txt" 2>&1; tail -4 "$OUT/prof_d12.txt" ;;
    prof_d48)
      timeout 300 python3 benchmarks/kernel_profile.py --what train --model d48 --batch 8 --seq 1024 --recompute $R48 --recompute-keep $K48 \
        $LEAN ${TUNE:-} --mode eager --top 45 ${TRACE:+--trace-dir "$OUT/trace_d48"} --json "$OUT/prof_d48.json" \
        > "$OUT/prof_d48.txt" 2>&1; tail -4 "$OUT/prof_d48.txt" ;;
    graph_d48)  # sustained: 20 graph-replayed warm-up steps, then 10 profiled
      timeout 300 python3 benchmarks/kernel_profile.py --what train --model d48 --batch 8 --seq 1024 --recompute $R48 --recompute-keep $K48 \
        $LEAN ${TUNE:-} --mode graph --steps 10 --warmup 20 --top 45 --json "$OUT/graph_d48.json" > "$OUT/graph_d48.txt" 2>&1
      tail -3 "$OUT/graph_d48.txt" | tee -a "$OUT/summary.txt" ;;
    prof_llama)
      timeout 300 python3 benchmarks/kernel_profile.py --what train --model llama3.2:1b --batch 8 --seq 2048 \
        --recompute $RL --recompute-keep $KL $LEAN ${TUNE:-} --mode eager --top 45 --json "$OUT/prof_llama.json" > "$OUT/prof_llama.txt" 2>&1
      tail -4 "$OUT/prof_llama.txt" ;;
    bench_d12)
      timeout 400 python3 benchmarks/gpu.py --model d12 --batch 64 --seq 1024 --steps 20 --warmup 8 --recompute $R12 --recompute-keep $K12 \
        $LEAN12 ${SIDES:+--sides $SIDES} --json "$OUT/bench_d12.json" > "$OUT/bench_d12.log" 2>&1
      tail -30 "$OUT/bench_d12.log" | tee -a "$OUT/summary.txt" ;;
    bench_d48)
      timeout 400 python3 benchmarks/gpu.py --model d48 --batch 8 --seq 1024 --steps 20 --warmup 6 --recompute $R48 --recompute-keep $K48 \
        $LEAN ${SIDES:+--sides $SIDES} --json "$OUT/bench_d48.json" > "$OUT/bench_d48.log" 2>&1
      tail -30 "$OUT/bench_d48.log" | tee -a "$OUT/summary.txt" ;;
    bench_llama)
      timeout 400 python3 benchmarks/gpu.py --model llama3.2:1b --batch 8 --seq 2048 --steps 20 --warmup 6 \
        --recompute $RL --recompute-keep $KL $LEAN ${SIDES:+--sides $SIDES} --json "$OUT/bench_llama.json" > "$OUT/bench_llama.log" 2>&1
      tail -30 "$OUT/bench_llama.log" | tee -a "$OUT/summary.txt" ;;
    quality)
      timeout 400 python3 benchmarks/quality.py --model d12 --steps 300 --batch 8 --seq 1024 \
        --variants master,lean,master:7,lean:7,lean:3 --json "$OUT/quality_d12.json" > "$OUT/quality_d12.log" 2>&1
      tail -8 "$OUT/quality_d12.log" | tee -a "$OUT/summary.txt" ;;
    quality_d48)  # the d48 configuration of issue 14: today's optimizer and the lean one, and PyTorch
      timeout 560 python3 benchmarks/quality.py --model d48 --steps 300 --batch 8 --seq 1024 \
        --variants master,lean --json "$OUT/quality_d48.json" > "$OUT/quality_d48.log" 2>&1
      tail -8 "$OUT/quality_d48.log" | tee -a "$OUT/summary.txt" ;;
    quality_d48_seed)  # the default optimizer at d48 with another seed (QSEED, default 7): its seed spread, no PyTorch
      timeout 400 python3 benchmarks/quality.py --model d48 --steps 300 --batch 8 --seq 1024 \
        --variants master:${QSEED:-7} --no-torch --json "$OUT/quality_d48_seed.json" > "$OUT/quality_d48_seed.log" 2>&1
      tail -8 "$OUT/quality_d48_seed.log" | tee -a "$OUT/summary.txt" ;;
    variants)  # candidate kernels against the shipped ones, in isolation (benchmarks/kernel_variants.py)
      timeout 300 python3 benchmarks/kernel_variants.py $(for g in ${VONLY:-}; do echo --only $g; done) \
        --json "$OUT/variants.json" > "$OUT/variants.log" 2>&1
      tail -20 "$OUT/variants.log" | tee -a "$OUT/summary.txt" ;;
    norm_variants)  # the norms' row kernels against the one-pack-at-a-time versions in build/kernel_baseline (carry it)
      timeout 300 python3 benchmarks/kernel_variants.py --only norms --baseline build/kernel_baseline \
        --json "$OUT/norm_variants.json" > "$OUT/norm_variants.log" 2>&1
      tail -20 "$OUT/norm_variants.log" | tee -a "$OUT/summary.txt" ;;
    gemm_search)  # cuBLASLt's enumerated algorithm configurations against its heuristic's (benchmarks/gemm_search.py)
      timeout 300 python3 benchmarks/gemm_search.py --json "$OUT/gemm_search.json" > "$OUT/gemm_search.log" 2>&1
      grep -E "^==|best enumerated|heuristic 0|enumerated" "$OUT/gemm_search.log" | tee -a "$OUT/summary.txt" ;;
    gemm_sustained)  # d48's products: the tuner's burst timing vs back-to-back at the power limit (benchmarks/gemm_sustained.py)
      timeout 300 python3 benchmarks/gemm_sustained.py --json "$OUT/gemm_sustained.json" > "$OUT/gemm_sustained.log" 2>&1
      grep -vE "^    " "$OUT/gemm_sustained.log" | tail -20 | tee -a "$OUT/summary.txt" ;;
    att_plans)  # every cuDNN plan of the attention backward at the benchmark shapes (benchmarks/attention_plans.py)
      timeout 300 python3 benchmarks/attention_plans.py --json "$OUT/att_plans.json" > "$OUT/att_plans.log" 2>&1
      tail -40 "$OUT/att_plans.log" | tee -a "$OUT/summary.txt" ;;
    *) echo "unknown stage $st" ;;
  esac
  echo "[$st: $((SECONDS - t0)) s]" | tee -a "$OUT/summary.txt"
  echo "$(date +%H:%M:%S) end $st" >> "$OUT/stages.txt"
done
kill $SMI_PID 2>/dev/null
# the SM clock and power each stage ran at (medians of the samples with the GPU busy)
python3 - "$OUT" <<'PY' | tee -a "$OUT/summary.txt"
import csv, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
try:
    rows = [r for r in csv.reader(open(out / "smi.csv")) if len(r) >= 8]
    stages = [l.split() for l in open(out / "stages.txt")]
except OSError:
    sys.exit()
starts, spans = {}, []  # "HH:MM:SS start|end NAME" lines, stages and (from gpu.py) benchmark sides
for t, what, name in (l for l in stages if len(l) == 3):
    if what == "start":
        starts[name] = t
    elif name in starts:
        spans.append((starts.pop(name), t, name))
def sample(r):  # (time, GPU index, SM MHz, watts, utilization %) or None where a field is not a number
    try:
        return r[0].split()[-1][:8], r[1].strip(), float(r[2].split()[0]), float(r[4].split()[0]), float(r[7].split()[0])
    except (ValueError, IndexError):
        return None
samples = [x for x in map(sample, rows) if x]
for t0, t1, name in spans:
    sel = [x for x in samples if t0 <= x[0] <= t1 and x[1] == "0" and x[4] > 50]
    if sel:
        mhz, w = statistics.median(x[2] for x in sel), statistics.median(x[3] for x in sel)
        print(f"[{name}: GPU 0 busy samples {len(sel)}, median SM clock {mhz:.0f} MHz, power {w:.0f} W of {rows[0][5].strip()}]")
PY
# the device tool brings back only a few files: everything in one archive besides the summary
tar czf /tmp/round2.tgz -C "$OUT" --exclude=summary.txt . && find "$OUT" -type f ! -name summary.txt -delete && mv /tmp/round2.tgz "$OUT/"
