#!/usr/bin/env bash
# karpathy/llm.c as a GPU training baseline for GPT-2: builds llm.c's train_gpt2cu (bf16, cuDNN flash attention,
# no NCCL/MPI) from an unmodified copy of llm.c, writes random-token shards in llm.c's format, trains each model from
# scratch (random init; eval, sampling and checkpoints off) and reports llm.c's steady-state tok/s and peak memory.
#
#   bash benchmarks/llmc.sh                           # d12 B=64 recompute 0 and d48 B=8 recompute 1, T=1024
#   LLMC_MODELS=d12 LLMC_STEPS=60 OUT=/tmp/llmc bash benchmarks/llmc.sh
#
# Needs an NVIDIA GPU (sm_90 build), nvcc, cuBLAS/cuBLASLt and cuDNN (the toolkit's, the system's or the nvidia-*
# pip wheels'), python3 with numpy, and two ignored source folders in third_party/, made on a machine with the two
# repositories cloned:
#   git -C llm.c archive --prefix=llm.c/ f1e2ace651495b74ae22d45d1723443fd00ecd3a | tar x -C third_party
#   git -C cudnn-frontend archive --prefix=cudnn-frontend-include/ v1.18.0 include | tar x -C third_party
# (cuDNN frontend releases after v1.18.0 need nvrtc.h from the toolkit; v1.18.0 builds without it.)
# Env: LLMC_STEPS (40), LLMC_MODELS ("d12 d48"; B/recompute: d12 64/0, d48 8/1, others LLMC_B/LLMC_R, 8/1),
#      LLMC_T (1024), LLMC_SKIP (10: steps left out of the median), LLMC_EXTRA (more train_gpt2cu flags),
#      LLMC_BUILD_ONLY=1 (build, no runs), LLMC_SHIM=0 (no CUDA 13 compatibility pre-include),
#      OUT (results folder, default build/llmc-out). The build and data go to /tmp/llmc.
# Results in $OUT: llmc_summary.txt, llmc.json ({"d12": {"tok_s", "peak_gib", ...}, ...}), llmc_build.log,
# llmc_logs.tgz (run logs, nvidia-smi memory samples). Exits 1 with "LLMC FAILED: ..." when the build or a run
# fails. Compare with `python benchmarks/gpu.py` at the same model and batch on the same GPU (benchmarks/README.md).
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/build/llmc-out}; mkdir -p "$OUT"
STEPS=${LLMC_STEPS:-40}; MODELS=${LLMC_MODELS:-d12 d48}; T=${LLMC_T:-1024}; SKIP=${LLMC_SKIP:-10}
SRC=$ROOT/third_party/llm.c; FE=$ROOT/third_party/cudnn-frontend-include
W=/tmp/llmc; BUILD=$W/build; LINK=$W/linkdir; DATA=$W/data; LOGS=$W/logs
SUM=$OUT/llmc_summary.txt; JSON=$OUT/llmc.json; BLOG=$OUT/llmc_build.log
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
log() { echo "$*" | tee -a "$SUM"; }
pack_logs() { [ -d "$LOGS" ] && [ -n "$(ls -A "$LOGS" 2>/dev/null)" ] && tar czf "$OUT/llmc_logs.tgz" -C "$LOGS" . ; }
fail_all() {  # every requested model gets the error, so llmc.json always has the usual shape
  log "LLMC FAILED: $1"
  python3 - "$JSON" "$1" $MODELS <<'EOF'
import json, sys
path, err, models = sys.argv[1], sys.argv[2], sys.argv[3:]
json.dump({m: {"error": err} for m in models}, open(path, "w"), indent=1)
EOF
  pack_logs; exit 1
}
rm -rf "$W"; mkdir -p "$W" "$LINK" "$DATA" "$LOGS"; : > "$BLOG"
log "== llm.c baseline: $(date -u +%FT%TZ), models '$MODELS', steps $STEPS, T=$T"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1 | tee -a "$SUM"
[ -f "$SRC/train_gpt2.cu" ] && [ -f "$SRC/Makefile" ] || fail_all "no llm.c at $SRC (see the header: third_party/)"
[ -f "$FE/include/cudnn_frontend.h" ] || fail_all "no cuDNN frontend headers at $FE/include (see the header: third_party/)"
[ -f "$ROOT/third_party/VERSIONS.txt" ] && cut -c1-130 "$ROOT/third_party/VERSIONS.txt" | grep -v '^ ' | tee -a "$SUM"

# ---------------------------------------------------------------- toolchain and libraries
NVCC=$(command -v nvcc || true)
for c in /usr/local/cuda/bin/nvcc /usr/local/cuda-13.0/bin/nvcc /usr/local/cuda-*/bin/nvcc; do
  [ -n "$NVCC" ] && break; [ -x "$c" ] && NVCC=$c
done
[ -n "$NVCC" ] || fail_all "nvcc not found (PATH, /usr/local/cuda*/bin)"
CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$NVCC")")")
export PATH=$(dirname "$NVCC"):$PATH
"$NVCC" --version | tail -2 >> "$BLOG"
# Candidate include and lib dirs: the toolkit, the system, and every pip wheel's nvidia/*/{include,lib}
# (nvidia-cublas puts cublas_v2.h and libcublas.so.13 in nvidia/cu13/, nvidia-cudnn-cu13 in nvidia/cudnn/).
mapfile -t PYDIRS < <(python3 - <<'EOF'
import glob, os, site, sys
roots = [p for p in sys.path if p] + site.getsitepackages() + ["/tmp/site"]
try:
    import nvidia.cudnn; roots.append(os.path.dirname(os.path.dirname(os.path.dirname(nvidia.cudnn.__file__ or "") or "")))
except Exception:
    pass
seen = set()
for r in roots:
    for d in sorted(glob.glob(os.path.join(r, "nvidia", "*", "include")) + glob.glob(os.path.join(r, "nvidia", "*", "lib"))):
        d = os.path.realpath(d)
        if d not in seen:
            seen.add(d); print(d)
EOF
)
INC_DIRS=("$CUDA_HOME/include" "$CUDA_HOME/targets/x86_64-linux/include" /usr/local/cuda/include /usr/include)
LIB_DIRS=("$CUDA_HOME/lib64" "$CUDA_HOME/lib" "$CUDA_HOME/targets/x86_64-linux/lib" /usr/local/cuda/lib64
          /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/lib/wsl/lib)
for d in "${PYDIRS[@]}"; do case $d in */include) INC_DIRS+=("$d") ;; */lib) LIB_DIRS+=("$d") ;; esac; done
find_inc() { local d; for d in "${INC_DIRS[@]}"; do [ -f "$d/$1" ] && { echo "$d"; return 0; }; done; return 1; }
find_lib() {  # prints the file of lib$1.so, lib$1.so.N or the one ldconfig knows
  local d f; for d in "${LIB_DIRS[@]}"; do
    for f in "$d/lib$1.so" "$d"/lib"$1".so.[0-9]*; do [ -f "$f" ] && { echo "$f"; return 0; }; done
  done
  f=$(ldconfig -p 2>/dev/null | awk -v n="lib$1.so" 'index($1, n) == 1 {print $NF; exit}'); [ -n "$f" ] && [ -f "$f" ] && echo "$f"
}
EXTRA_INC=""; RPATHS=()
for h in cublas_v2.h cublasLt.h cudnn.h; do
  d=$(find_inc "$h") || fail_all "header $h not found (looked in: ${INC_DIRS[*]})"
  case " $EXTRA_INC " in *" -I$d "*) ;; *) EXTRA_INC="$EXTRA_INC -I$d" ;; esac
  echo "header $h: $d" >> "$BLOG"
done
# link names the Makefile asks for (-lcublas -lcublasLt -lcudnn -lnvidia-ml): symlink whatever .so.N exists
for l in cublas cublasLt cudnn nvidia-ml; do
  f=$(find_lib "$l")
  if [ -z "$f" ] && [ "$l" = nvidia-ml ]; then
    # no NVML anywhere: llm.c uses it only when nvml.h exists (mfu.h); a stub satisfies the link
    echo "libnvidia-ml not found: linking an empty stub" >> "$BLOG"
    printf '' | gcc -shared -x c - -Wl,-soname,libnvidia-ml.so.1 -o "$LINK/libnvidia-ml.so.1" && f=$LINK/libnvidia-ml.so.1
  fi
  [ -n "$f" ] || fail_all "library lib$l.so* not found (looked in: ${LIB_DIRS[*]} and ldconfig)"
  [ "$f" = "$LINK/lib$l.so" ] || ln -sf "$f" "$LINK/lib$l.so"
  d=$(dirname "$(readlink -f "$f")"); case " ${RPATHS[*]} " in *" $d "*) ;; *) RPATHS+=("$d") ;; esac
  echo "lib $l: $f" >> "$BLOG"
done
RP=$(IFS=:; echo "${RPATHS[*]}")
# at run time cuDNN also dlopens its engine libraries, nvrtc and cublasLt: every wheel lib dir on the path
export LD_LIBRARY_PATH=$RP:$(printf '%s\n' "${PYDIRS[@]}" | grep '/lib$' | paste -sd:):$CUDA_HOME/lib64:${LD_LIBRARY_PATH:-}

# ---------------------------------------------------------------- build (unmodified copy in /tmp)
cp -r "$SRC" "$BUILD" || fail_all "copy of llm.c failed"
ln -s "$FE" "$BUILD/cudnn-frontend"   # the Makefile looks for ./cudnn-frontend/include when USE_CUDNN=1
# CUDA 13 removed cudaMemAdvise(ptr, n, advice, int device) (only the cudaMemLocation form is left);
# llm.c calls the int form in llmc/cuda_utils.cuh. A pre-included header (ours, in /tmp; llm.c untouched)
# puts back the old overload on top of the new one; it is a no-op before CUDA 13.
SHIM_FLAG=""
if [ "${LLMC_SHIM:-1}" = 1 ]; then
  cat > "$W/llmc_cuda13_compat.h" <<'EOF'
#pragma once
#include <cuda_runtime.h>
#if defined(__cplusplus) && defined(CUDART_VERSION) && CUDART_VERSION >= 13000
static inline cudaError_t cudaMemAdvise(const void* ptr, size_t count, enum cudaMemoryAdvise advice, int device) {
    struct cudaMemLocation loc;
    loc.type = (device == cudaCpuDeviceId) ? cudaMemLocationTypeHost : cudaMemLocationTypeDevice;
    loc.id = (device == cudaCpuDeviceId) ? 0 : device;
    return cudaMemAdvise(ptr, count, advice, loc);
}
#endif
EOF
  SHIM_FLAG="--pre-include $W/llmc_cuda13_compat.h"
fi
MAKE_ARGS=(train_gpt2cu USE_CUDNN=1 PRECISION=BF16 NO_MULTI_GPU=1 NO_USE_MPI=1 GPU_COMPUTE_CAPABILITY=90
  "NVCC=$NVCC" "PFLAGS=-DENABLE_BF16$EXTRA_INC $SHIM_FLAG"
  "NVCC_LDLIBS=-L$LINK -Xlinker -rpath=$RP")
echo "build: cd $BUILD && make ${MAKE_ARGS[*]}" | tee -a "$BLOG" >> "$SUM"
t0=$SECONDS
( cd "$BUILD" && make "${MAKE_ARGS[@]}" ) >> "$BLOG" 2>&1
brc=$?
if [ $brc -ne 0 ] || [ ! -x "$BUILD/train_gpt2cu" ]; then
  grep -E "error|Error|undefined reference|No such file" "$BLOG" | head -25 | tee -a "$SUM"
  fail_all "llm.c build failed (make rc $brc, $((SECONDS - t0)) s); see llmc_build.log"
fi
log "build: ok in $((SECONDS - t0)) s"
ldd "$BUILD/train_gpt2cu" 2>&1 | grep -E "cublas|cudnn|nvidia-ml|not found" >> "$BLOG"
if [ "${LLMC_BUILD_ONLY:-0}" = 1 ]; then log "LLMC_BUILD_ONLY=1: no runs"; pack_logs; exit 0; fi

# ---------------------------------------------------------------- random-token shards (llm.c format)
python3 - "$DATA" <<'EOF' || fail_all "writing data shards failed"
import sys, numpy as np
out = sys.argv[1]
rng = np.random.default_rng(20240520)
def shard(path, n):  # header: 256 int32 (magic 20240520, version 1, n tokens), then n uint16 tokens
    hdr = np.zeros(256, dtype=np.int32); hdr[0], hdr[1], hdr[2] = 20240520, 1, n
    tok = rng.integers(0, 50257, size=n, dtype=np.uint16)
    with open(path, "wb") as f:
        f.write(hdr.tobytes()); f.write(tok.tobytes())
for i in range(2):
    shard(f"{out}/train_{i:06d}.bin", 10_000_000)
shard(f"{out}/val_000000.bin", 1_000_000)
EOF

# ---------------------------------------------------------------- runs
echo "{}" > "$JSON"
failed=""
for m in $MODELS; do
  case $m in d12) B=64; R=0 ;; d48) B=8; R=1 ;; *) B=${LLMC_B:-8}; R=${LLMC_R:-1} ;; esac
  # -v big: val only at steps 0 and last (outside the timed steps), 1 batch; -s 0: no sampling at all;
  # no -o: no log dir and no checkpoints (-n 0); -d B*T: no gradient accumulation; cosine LR, no warmup
  ARGS=(-i "$DATA/train_*.bin" -j "$DATA/val_*.bin" -e "$m" -b $B -t $T -d $((B * T)) -x "$STEPS"
        -r $R -z 0 -v 1000000 -m 1 -s 0 -n 0 -h 0 ${LLMC_EXTRA:-})
  log "run $m: cd $BUILD && ./train_gpt2cu ${ARGS[*]}"
  nvidia-smi -i 0 --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$LOGS/smi_$m.txt" 2>/dev/null &
  smi=$!
  t0=$SECONDS
  ( cd "$BUILD" && timeout 300 ./train_gpt2cu "${ARGS[@]}" ) > "$LOGS/llmc_$m.log" 2>&1
  rc=$?
  sleep 0.5; kill $smi 2>/dev/null; wait $smi 2>/dev/null
  python3 - "$LOGS/llmc_$m.log" "$LOGS/smi_$m.txt" "$JSON" "$m" $B $T $R $rc $SKIP $((SECONDS - t0)) <<'EOF' | tee -a "$SUM"
import json, re, statistics, sys
logf, smif, jsonf, m = sys.argv[1:5]
B, T, R, rc, skip, wall = map(int, sys.argv[5:11])
text = open(logf, errors="replace").read()
# llm.c: printf0("step %4d/%d | loss %7.6f (%+.2fz)| norm %6.4f (%+.2fz)| lr %.2e | %.2f ms | %.1f%% bf16 MFU | %.0f tok/s\n")
pat = re.compile(r"^step\s+(\d+)/(\d+) \| loss (\S+) .*?\| ([\d.]+) ms \| (-?[\d.]+)% \w+ MFU \| ([\d.]+) tok/s", re.M)
steps = [(int(a), float(l), float(ms), float(mfu), float(ema)) for a, _, l, ms, mfu, ema in pat.findall(text)]
res = {"B": B, "T": T, "recompute": R, "rc": rc, "wall_s": wall, "steps": len(steps)}
if steps:
    tail = [s for s in steps if s[0] > skip] or steps[len(steps) // 2:]
    ms = [s[2] for s in tail]
    res.update(tok_s=round(B * T * 1000 / statistics.median(ms)), ms_median=round(statistics.median(ms), 2),
               ms_min=min(ms), mfu_pct=statistics.median(s[3] for s in tail),
               tok_s_ema_last=steps[-1][4], loss_first=steps[0][1], loss_last=steps[-1][1],
               median_over=f"steps {tail[0][0]}..{tail[-1][0]}")
    ema30 = [s[4] for s in steps if s[0] == 30]
    if ema30:
        res["tok_s_ema_step30"] = ema30[0]
mem = re.search(r"device memory usage: (\d+) MiB / (\d+) MiB", text)
if mem:
    res["llmc_reported_gib"] = round(int(mem.group(1)) / 1024, 2)  # after its allocations, before cuDNN workspace
try:
    used = [int(x) for x in open(smif).read().split() if x.strip().isdigit()]
    if used:
        res["peak_gib"] = round(max(used) / 1024, 2); res["smi_idle_gib"] = round(used[0] / 1024, 2)
except OSError:
    pass
if "Fell back to cudaMallocManaged" in text:
    res["managed_fallback"] = True  # llm.c ran out of device memory and put optimizer state in host memory
if rc != 0 or not steps:
    res["error"] = f"train_gpt2cu rc {rc}, {len(steps)} steps parsed"
allr = json.load(open(jsonf)); allr[m] = res; json.dump(allr, open(jsonf, "w"), indent=1)
if "tok_s" in res:
    print(f"{m} B={B} T={T} r={R}: llm.c {res['tok_s']/1e3:.1f}K tok/s (median {res['ms_median']} ms, {res['median_over']}), "
          f"EMA {res['tok_s_ema_last']/1e3:.1f}K, MFU {res['mfu_pct']}%, peak {res.get('peak_gib')} GiB (nvidia-smi), "
          f"llm.c reported {res.get('llmc_reported_gib')} GiB, loss {res['loss_first']:.3f}->{res['loss_last']:.3f}, {wall} s")
if "error" in res:
    print(f"{m}: ERROR {res['error']}")
    sys.exit(1)
EOF
  if [ "${PIPESTATUS[0]}" -ne 0 ]; then
    failed="$failed $m"; tail -15 "$LOGS/llmc_$m.log" | tee -a "$SUM"
  fi
done
pack_logs
[ -z "$failed" ] || { log "LLMC FAILED: run(s)$failed; see llmc_logs.tgz"; exit 1; }
log "llm.c baseline done: $JSON"
