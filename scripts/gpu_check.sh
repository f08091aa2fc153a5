#!/usr/bin/env bash
# Checks llmpy on a machine with an NVIDIA GPU and the [cuda] extras: the GPU tests, the headline training
# benchmarks against their baselines, MatMul-free decoding, and a markdown report of it all.
#
#   bash scripts/gpu_check.sh                           # tests bench decode, into gpu_check/<date-time>/
#   bash scripts/gpu_check.sh --out /tmp/check bench    # the four training benchmarks only
#   bash scripts/gpu_check.sh d12 llama --timeout 1200
#   bash scripts/gpu_check.sh report --out DIR          # rewrite DIR/report.md from DIR's files (no GPU needed)
#
# Stages, run in the order given (default: tests bench decode). Each runs under `timeout`; one that fails or runs
# out of time does not stop the others. Each writes NAME.log (and NAME.json) in the output folder.
#   tests      python -m pytest -m gpu -q: every GPU test (the multi-GPU ones skip on one GPU)
#   bench      d12 d48 llama mmfree, one after the other:
#   d12        benchmarks/gpu.py --model d12 --batch 64 --seq 1024: llmpy vs PyTorch (nanoGPT's GPT-2, compiled)
#   d48        benchmarks/gpu.py --model d48 --batch 8 --seq 1024 --recompute 1
#   llama      benchmarks/gpu.py --model llama3.2:1b --batch 8 --seq 2048 --recompute 1 (vs torchtitan-style Llama)
#   mmfree     benchmarks/gpu.py --model mmfree:370m --batch 8 --seq 2048 --recompute 2, against the reference code
#              when $LLMPY_MMFREE_REF or build/ref/mmfreelm holds it (benchmarks/torch_mmfree.py), else llmpy alone
#   decode     benchmarks/mmfree_decode.py --model mmfree:1.3b: decoding at batch 1-128 and prefill, tok/s and MBU,
#              packed ternary vs latent weights vs a Llama of the same size
#   reproduce  the gpt2-124m recipe on Shakespeare (--reproduce-steps, 400; 131072 tokens a step), scored during
#              training on scripts/next_line_task.py's task, then read back by `llmpy eval` (not in the default set)
#   report     nothing to run: (re)writes report.md from what the output folder holds
# Without a CUDA build of torch the training benchmarks run llmpy's side alone.
#
# Options:
#   --out DIR             the output folder (default: $OUT if set, else gpu_check/<date-time>/ in the repository)
#   --timeout SECONDS     every stage's time limit (defaults: tests 1800, each benchmark 900, decode 600,
#                         reproduce 1800)
#   --bench-flags FLAGS   more benchmarks/gpu.py flags for every training benchmark, e.g.
#                         "--no-master-weights --moments bf16 --tune-gemm"
#   --reproduce-steps N   steps of the reproduce stage (400)
# Environment: PYTHON (default python3), LLMPY_MMFREE_REF. NCCL_NVLS_ENABLE=0 and PYTHONUNBUFFERED=1 are set, and
# the repository is put first on PYTHONPATH. If the repository has a .whl/ folder (wheels for a machine without
# network), they are installed into /tmp/site first and /tmp/site goes on PYTHONPATH too (LLMPY_CACHE then defaults
# to /tmp/llmpy-cache).
# The report, report.md: date, GPU and driver (nvidia-smi), package versions, each stage's result and time, the
# test summary, each benchmark's table. Figures compare only within one report: one GPU, one sitting.

set -u
PY=${PYTHON:-python3}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
COMMAND="scripts/gpu_check.sh $*"

usage() { sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"; }

out=${OUT:-}; limit=""; bench_flags=""; repro_steps=400; stages=()
while (($#)); do
  case $1 in
    --out) out=${2:?--out needs a folder}; shift 2 ;;
    --out=*) out=${1#*=}; shift ;;
    --timeout) limit=${2:?--timeout needs seconds}; shift 2 ;;
    --timeout=*) limit=${1#*=}; shift ;;
    --bench-flags) bench_flags=${2?--bench-flags needs flags}; shift 2 ;;
    --bench-flags=*) bench_flags=${1#*=}; shift ;;
    --reproduce-steps) repro_steps=${2:?--reproduce-steps needs a number}; shift 2 ;;
    --reproduce-steps=*) repro_steps=${1#*=}; shift ;;
    -h|--help) usage; exit 0 ;;
    tests|d12|d48|llama|mmfree|decode|reproduce|report) stages+=("$1"); shift ;;
    bench) stages+=(d12 d48 llama mmfree); shift ;;
    *) echo "gpu_check.sh: unknown argument '$1' (--help lists the stages and options)" >&2; exit 2 ;;
  esac
done
((${#stages[@]})) || stages=(tests d12 d48 llama mmfree decode)
for n in "$limit" "$repro_steps"; do
  [[ -z $n || $n =~ ^[1-9][0-9]*$ ]] || { echo "gpu_check.sh: '$n' is not a positive number" >&2; exit 2; }
done
[ -n "$out" ] || out=$ROOT/gpu_check/$(date +%Y-%m-%d_%H%M%S)
mkdir -p "$out" || exit 1
OUT=$(cd "$out" && pwd)
export OUT
cd "$ROOT" || exit 1
read -ra BENCH_FLAGS <<< "$bench_flags"

# ---- the report: report.md from env.json, stages.tsv and the stages' logs and JSON (standard library only) ----
write_report() {
  "$PY" - "$OUT" <<'PY'
import json, re, sys, time
from pathlib import Path

out = Path(sys.argv[1])
env = json.loads((out / "env.json").read_text()) if (out / "env.json").is_file() else {}
stages = []
if (out / "stages.tsv").is_file():
    for line in (out / "stages.tsv").read_text().splitlines():
        f = line.split("\t")
        if len(f) >= 4:
            stages.append({"name": f[0], "rc": int(f[1]), "seconds": int(f[2]), "limit": f[3],
                           "command": f[4] if len(f) > 4 else ""})
last = {s["name"]: s for s in stages}  # a stage run twice into one folder: its latest run
TITLES = {"d12": "GPT-2 d12 (124M)", "d48": "GPT-2 d48 (1.56B)", "llama": "Llama 3.2 1B",
          "mmfree": "MatMul-free LM 370M"}


def read(name):
    p = out / name
    return p.read_text(errors="replace") if p.is_file() else ""


def results(name):
    """A benchmark's JSON (benchmarks/gpu.py's {"args", "results"} or mmfree_decode.py's), None if missing."""
    try:
        return json.loads(read(f"{name}.json"))
    except ValueError:
        return None


def result(s):
    if s["rc"] in (124, 137):
        return f"timed out ({s['limit']} s)"
    if s["rc"]:
        return f"failed (exit {s['rc']})"
    if s["name"] in TITLES:  # benchmarks/gpu.py exits 0 when a side fails: look at what it measured
        got = (results(s["name"]) or {}).get("results") or {}
        if not got:
            return "failed: no side measured"
        if "llmpy,torch" in s["command"] and "torch" not in got:
            return "baseline failed"
    return "ok"


def tail(name, n=15):
    lines = [x for x in read(name).splitlines() if x.strip()]
    return "```\n" + "\n".join(lines[-n:]) + "\n```" if lines else "(no output)"


def note(name):
    text = read(f"{name}.note").strip()
    return [f"Note: {text}", ""] if text else []


def command(s):
    return [f"`{s['command'].replace(str(out) + '/', '')}`", ""] if s.get("command") else []


def gib(x):
    return f"{x:.2f}" if isinstance(x, (int, float)) else "-"


md = [f"# llmpy GPU check, {env.get('date', '(date unknown)')}", ""]
gpus = env.get("gpus") or []
if gpus:
    g = gpus[0]
    more = f" (GPU 0 of {len(gpus)})" if len(gpus) > 1 else ""
    md += [f"- GPU: {g.get('name', '?')}{more}, {g.get('memory', '?')}, power limit {g.get('power_limit', '?')}",
           f"- driver: {g.get('driver', '?')}" + (f" (CUDA {env['cuda']})" if env.get("cuda") else "")]
else:
    md.append("- GPU: nvidia-smi found no GPU")
if env.get("llmpy"):
    md.append(f"- llmpy {env['llmpy']}" + (f", git {env['git']}" if env.get("git") else ""))
if env.get("python"):
    md.append(f"- Python {env['python']}")
if env.get("packages"):
    md.append("- packages: " + ", ".join(f"{k} {v}" for k, v in env["packages"].items()))
if env.get("command"):
    md.append(f"- command: `{env['command']}`")
md += ["", "## Stages", "", "| stage | result | seconds | log |", "|---|---|---|---|"]
for s in stages:
    md.append(f"| {s['name']} | {result(s)} | {s['seconds']} | {s['name']}.log |")
if not stages:
    md.append("| (none ran) | | | |")

if "tests" in last:
    s = last["tests"]
    log = read("tests.log")
    summary = [x.strip("= ").strip() for x in log.splitlines()
               if re.search(r"\b(passed|failed|errors?|skipped|no tests ran)\b", x) and " in " in x]
    failed = [x for x in log.splitlines() if x.startswith(("FAILED", "ERROR"))]
    md += ["", "## GPU tests", ""] + command(s)
    md.append(f"**{summary[-1]}**" if summary else f"No pytest summary line ({result(s)}); the log ends:")
    if not summary:
        md += ["", tail("tests.log")]
    if failed:
        md += [""] + [f"- {x}" for x in failed[:30]] + ([f"- ... {len(failed) - 30} more"] if len(failed) > 30 else [])

benches = [n for n in ("d12", "d48", "llama", "mmfree") if n in last]
if benches:
    md += ["", "## Training benchmarks (benchmarks/gpu.py)", "",
           "Random tokens, bf16 compute, AdamW with clip 1.0 on both sides; the median step time after warm-up; "
           "peak memory as each framework reports it, and the device-wide used memory; MFU at 989 TFLOP/s."]
for name in benches:
    s = last[name]
    md += ["", f"### {TITLES[name]}: {result(s)}", ""] + command(s) + note(name)
    data = results(name)
    res = (data or {}).get("results") or {}
    if not res:
        md += ["No results; the log ends:", "", tail(f"{name}.log")]
        continue
    a = data.get("args", {})
    md += [f"{a.get('model')} B={a.get('batch')} T={a.get('seq')}, median of {a.get('steps')} steps after "
           f"{a.get('warmup')}; llmpy: recompute {a.get('recompute')}, "
           f"{'no ' if a.get('no_master_weights') else ''}fp32 master weights, {a.get('moments')} moments"
           f"{', --tune-gemm' if a.get('tune_gemm') else ''}", "",
           "| side | tok/s | step ms | peak GiB (framework) | device used GiB | MFU | J a step |",
           "|---|---|---|---|---|---|---|"]
    for side, r in res.items():
        j = r.get("joules_per_step")
        md.append(f"| {side} | {r['tok_s']:,.0f} | {r['step_ms']:.1f} | {gib(r.get('peak_gib'))} | "
                  f"{gib(r.get('device_gib'))} | {100 * r.get('mfu', 0):.1f}% | {'-' if j is None else f'{j:.1f}'} |")
    base = res.get("torch")
    for side, r in res.items():
        if side != "torch" and base:
            md.append(f"\n{side} / baseline: {r['tok_s'] / base['tok_s']:.3f}x the speed, "
                      f"{r['peak_gib'] / base['peak_gib']:.3f}x the peak memory")
    if "torch" not in res:
        md += ["", "No baseline side in this run; the log ends:", "", tail(f"{name}.log", 8)]

if "decode" in last:
    s = last["decode"]
    md += ["", f"## MatMul-free decoding (benchmarks/mmfree_decode.py): {result(s)}", ""] + command(s)
    d = results("decode")
    if d and d.get("shapes"):
        for shape in d["shapes"]:
            md += [shape["report"], ""]
    else:
        md += ["No results; the log ends:", "", tail("decode.log")]

repro = [n for n in ("reproduce_task", "reproduce_train", "reproduce_eval") if n in last]
if repro:
    md += ["", "## gpt2-124m recipe on Shakespeare", ""]
    for n in repro:
        md += [f"### {n}: {result(last[n])}", ""] + command(last[n]) + [tail(f"{n}.log", 8), ""]

md += ["", f"Written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; logs and JSON files are in this folder."]
(out / "report.md").write_text("\n".join(md) + "\n")
print(f"report: {out / 'report.md'}")
PY
}

# ---- one stage: its own log, a time limit, a row in stages.tsv; never stops the script ----
run_stage() {  # run_stage NAME LIMIT COMMAND...
  local name=$1 lim=$2 t0=$SECONDS rc
  shift 2
  echo "== $name (limit ${lim} s): $*"
  timeout -k 30 "$lim" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$lim" "$*" >> "$OUT/stages.tsv"
  echo "== $name: exit $rc in $((SECONDS - t0)) s"
  return 0
}

if [ "${stages[*]}" = report ]; then
  write_report
  exit 0
fi
trap 'echo "interrupted"; write_report; exit 130' INT TERM

# ---- the environment ----
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1   # NVLink multicast stays off on shared multi-GPU hosts
if compgen -G "$ROOT/.whl/*.whl" > /dev/null; then
  echo "installing .whl/ into /tmp/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$ROOT"/.whl/*.whl || echo "gpu_check.sh: installing .whl/ failed; going on with what is installed" >&2
  export PYTHONPATH=/tmp/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}
  export LLMPY_CACHE=${LLMPY_CACHE:-/tmp/llmpy-cache}
else
  export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" - "$OUT" "$COMMAND" <<'PY'
import json, platform, re, subprocess, sys, time
from importlib import metadata
from pathlib import Path


def sh(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


info = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": sys.argv[2], "python": platform.python_version()}
rows = sh("nvidia-smi", "--query-gpu=name,driver_version,memory.total,power.limit", "--format=csv,noheader")
info["gpus"] = [dict(zip(("name", "driver", "memory", "power_limit"), (x.strip() for x in line.split(","))))
                for line in rows.splitlines() if line.strip()]
m = re.search(r"CUDA Version: ([\d.]+)", sh("nvidia-smi"))
info["cuda"] = m.group(1) if m else None
try:
    import llmpy
    info["llmpy"] = f"{llmpy.__version__} ({Path(llmpy.__file__).parent})"
except Exception as e:  # noqa: BLE001
    info["llmpy"] = f"not importable: {e}"
rev = sh("git", "rev-parse", "--short", "HEAD")
if rev:
    info["git"] = rev + (" (modified)" if sh("git", "status", "--porcelain", "--untracked-files=no") else "")
pk = {}
for dist in ("numpy", "cupy-cuda13x", "cupy-cuda12x", "ml_dtypes", "nvmath-python", "nvidia-cudnn-frontend",
             "nvidia-cudnn-cu13", "nvidia-cudnn-cu12", "torch", "triton", "transformers", "tiktoken"):
    try:
        pk[dist] = metadata.version(dist)
    except metadata.PackageNotFoundError:
        pass
info["packages"] = pk
Path(sys.argv[1], "env.json").write_text(json.dumps(info, indent=1))
print(f"{info['date']}: {', '.join(g['name'] for g in info['gpus']) or 'no GPU found by nvidia-smi'}")
PY

torch_sides() {  # the --sides for a benchmark: llmpy and PyTorch when torch has CUDA, else llmpy alone
  if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' > /dev/null 2>&1; then
    echo llmpy,torch
  else
    echo "no CUDA build of torch: llmpy's side only" > "$OUT/$1.note"
    echo llmpy
  fi
}

bench() {  # bench NAME benchmarks/gpu.py-ARGS...
  local name=$1 sides
  shift
  sides=$(torch_sides "$name")
  if [ "$name" = mmfree ] && [ "$sides" != llmpy ]; then
    local ref=${LLMPY_MMFREE_REF:-$ROOT/build/ref/mmfreelm}
    if [ ! -f "$ref/__init__.py" ]; then
      echo "the MatMul-free reference is not at $ref (set LLMPY_MMFREE_REF): llmpy's side only" > "$OUT/$name.note"
      sides=llmpy
    elif ! "$PY" -c 'import triton, transformers, einops' > /dev/null 2>&1; then
      echo "the reference needs triton, transformers and einops: llmpy's side only" > "$OUT/$name.note"
      sides=llmpy
    fi
  fi
  run_stage "$name" "${limit:-900}" "$PY" benchmarks/gpu.py "$@" ${BENCH_FLAGS[@]+"${BENCH_FLAGS[@]}"} \
    --sides "$sides" --json "$OUT/$name.json"
}

reproduce() {
  local steps=$repro_steps task=$OUT/next_line.jsonl run train="" val=""
  run=$(mktemp -d "${TMPDIR:-/tmp}/llmpy-reproduce.XXXXXX")
  run_stage reproduce_task "${limit:-600}" "$PY" scripts/next_line_task.py "$task" --n 500
  read -r train val < <("$PY" -c "from llmpy.data.prepare import prepare_shakespeare as p; print(*p())" | tail -1)
  run_stage reproduce_train "${limit:-1800}" "$PY" -m llmpy train --recipe gpt2-124m --device cuda \
    --train-data "$train" --val-data "$val" --total-batch-size 131072 --steps "$steps" \
    --warmup-steps $((steps / 10)) --val-every 20 --eval-every 20 --eval-tasks "$task" \
    --checkpoint-every $((steps / 2)) --sample-tokens 64 --out "$run" --no-progress
  mkdir -p "$OUT/reproduce"
  cp "$run"/metrics.jsonl "$run"/*.png "$run"/*.json "$OUT/reproduce/" 2> /dev/null
  run_stage reproduce_eval "${limit:-600}" "$PY" -m llmpy eval --checkpoint "$run" --device cuda --tasks "$task"
  rm -rf "$run"
}

for st in "${stages[@]}"; do
  case $st in
    tests) run_stage tests "${limit:-1800}" "$PY" -m pytest -m gpu -q -rfE -p no:cacheprovider ;;
    d12) bench d12 --model d12 --batch 64 --seq 1024 ;;
    d48) bench d48 --model d48 --batch 8 --seq 1024 --recompute 1 ;;
    llama) bench llama --model llama3.2:1b --batch 8 --seq 2048 --recompute 1 ;;
    mmfree) bench mmfree --model mmfree:370m --batch 8 --seq 2048 --recompute 2 ;;
    decode) run_stage decode "${limit:-600}" "$PY" benchmarks/mmfree_decode.py --model mmfree:1.3b \
              --json "$OUT/decode.json" ;;
    reproduce) reproduce ;;
    report) ;;  # written below in any case
  esac
done
write_report
cat "$OUT/report.md"
