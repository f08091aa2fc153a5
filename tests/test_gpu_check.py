"""scripts/gpu_check.sh without a GPU: its syntax, its arguments, and the report it writes from a folder of results
(made up here in the formats benchmarks/gpu.py, benchmarks/mmfree_decode.py and pytest write)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run(*args, **env):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, **env})


def test_syntax_and_arguments():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    r = run("--help")
    assert r.returncode == 0 and "--timeout SECONDS" in r.stdout and "mmfree_decode.py" in r.stdout
    r = run("no_such_stage")
    assert r.returncode == 2 and "unknown argument" in r.stderr
    assert run("--timeout", "soon", "report").returncode == 2


def side(tok_s, step_ms, peak, mfu):
    return {"tok_s": tok_s, "step_ms": step_ms, "peak_gib": peak, "device_gib": peak + 0.5, "mfu": mfu,
            "joules_per_step": 100.0, "mean_step_ms": step_ms, "watts": 690.0}


def test_report_from_a_results_folder(tmp_path):
    out = tmp_path / "check"
    out.mkdir()
    (out / "env.json").write_text(json.dumps({
        "date": "2026-12-01 10:00:00 UTC", "command": "scripts/gpu_check.sh tests d48 llama decode",
        "python": "3.12.3", "cuda": "13.0", "llmpy": "0.1.0 (/repo/llmpy)", "git": "abc1234",
        "gpus": [{"name": "NVIDIA H200", "driver": "580.95.05", "memory": "143771 MiB", "power_limit": "700.00 W"}],
        "packages": {"numpy": "2.5.0", "cupy-cuda13x": "14.2.0", "torch": "2.11.0"}}))
    rows = [("tests", 1, 300, 1800, "python3 -m pytest -m gpu -q -rfE -p no:cacheprovider"),
            ("d48", 0, 200, 900, f"python3 benchmarks/gpu.py --model d48 --sides llmpy,torch --json {out}/d48.json"),
            ("llama", 124, 900, 900, f"python3 benchmarks/gpu.py --model llama3.2:1b --json {out}/llama.json"),
            ("decode", 0, 60, 600, f"python3 benchmarks/mmfree_decode.py --json {out}/decode.json")]
    (out / "stages.tsv").write_text("".join("\t".join(map(str, r)) + "\n" for r in rows))
    (out / "tests.log").write_text("....F..s\nFAILED tests/test_cuda_model.py::test_x - assert 1 == 2\n"
                                   "1 failed, 6 passed, 1 skipped in 300.12s (0:05:00)\n")
    (out / "d48.json").write_text(json.dumps({
        "args": {"model": "d48", "batch": 8, "seq": 1024, "recompute": 1, "steps": 30, "warmup": 10,
                 "no_master_weights": False, "moments": "fp32", "tune_gemm": False},
        "results": {"llmpy": side(48000.0, 170.7, 36.6, 0.48), "torch": side(43000.0, 190.5, 45.6, 0.43)}}))
    (out / "llama.log").write_text("compiling\nstill compiling\n")
    (out / "decode.json").write_text(json.dumps({
        "date": "2026-12-01", "device": "NVIDIA H200", "shapes": [{
            "model": "mmfree:1.3b", "results": [],
            "report": "2026-12-01  mmfree:1.3b decode on NVIDIA H200\n| model | batch | tok/s |\n|---|---|---|\n"
                      "| packed | 1 | 657.0 |"}]}))
    r = run("report", "--out", str(out))
    assert r.returncode == 0, r.stderr
    md = (out / "report.md").read_text()
    assert "# llmpy GPU check, 2026-12-01 10:00:00 UTC" in md
    assert "NVIDIA H200, 143771 MiB, power limit 700.00 W" in md and "580.95.05 (CUDA 13.0)" in md
    assert "cupy-cuda13x 14.2.0" in md
    assert "| tests | failed (exit 1) | 300 | tests.log |" in md
    assert "| llama | timed out (900 s) | 900 | llama.log |" in md
    assert "**1 failed, 6 passed, 1 skipped in 300.12s (0:05:00)**" in md
    assert "- FAILED tests/test_cuda_model.py::test_x - assert 1 == 2" in md
    assert "| llmpy | 48,000 | 170.7 | 36.60 | 37.10 | 48.0% | 100.0 |" in md
    assert "llmpy / baseline: 1.116x the speed, 0.803x the peak memory" in md
    assert f"{out}/" not in md  # commands name the output files relative to the folder
    assert "still compiling" in md  # a stage without results shows the end of its log
    assert "2026-12-01  mmfree:1.3b decode on NVIDIA H200\n| model | batch | tok/s |" in md
    assert "| packed | 1 | 657.0 |" in md
    # the same folder again with "--out=DIR", and $OUT naming it
    assert run("report", f"--out={out}").returncode == 0
    assert run("report", OUT=str(out)).returncode == 0 and (out / "report.md").read_text().startswith("# llmpy")
