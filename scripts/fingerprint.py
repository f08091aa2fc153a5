"""A digest of everything the CLI computes and writes on fixed inputs, on the CPU: for checking that a refactor
changes no behaviour bit. Uses only the command line and the file formats, so it runs against any version of the
package (an older checkout through --tree).

    python scripts/fingerprint.py > new.txt
    python scripts/fingerprint.py --tree build/old > old.txt && diff old.txt new.txt

Each line is `what: digest`. Token-per-second figures and timings are dropped; everything else (losses, norms, every
tensor of every checkpoint, converted files byte for byte, eval and sample output) is compared exactly.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def write_shard(path: Path, tokens: np.ndarray) -> None:
    header = np.zeros(256, "<i4")
    header[:3] = [20240520, 1, tokens.size]
    path.write_bytes(header.tobytes() + tokens.astype("<u2").tobytes())


def safetensors_digests(path: Path) -> dict[str, str]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", {})
    out = {name: hashlib.sha256(raw[8 + n + e["data_offsets"][0]:8 + n + e["data_offsets"][1]]).hexdigest()[:16]
           for name, e in sorted(header.items())}
    state = json.loads(meta.get("state", "{}"))
    state.get("train", {}).pop("out", None)
    state.get("train", {}).pop("resume", None)
    state.get("train", {}).pop("train_data", None)
    state.get("train", {}).pop("val_data", None)
    out["__state__"] = hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:16]
    out["__config__"] = meta.get("config", "")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", default=str(ROOT), help="the checkout whose llmpy runs (default: this one)")
    args = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=str(Path(args.tree).resolve()), PYTHONHASHSEED="0")

    def cli(*argv: str) -> str:
        p = subprocess.run([sys.executable, "-m", "llmpy", *argv], env=env, capture_output=True, text=True)
        if p.returncode:
            sys.exit(f"llmpy {' '.join(argv)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
        return p.stdout

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        rng = np.random.default_rng(0)
        phrases = [rng.integers(0, 50257, 7) for _ in range(20)]
        stream = np.concatenate([phrases[i] for i in rng.integers(0, 20, 2000)])
        write_shard(d / "tr_000.bin", stream[:8000])
        write_shard(d / "tr_001.bin", stream[8000:11000])
        write_shard(d / "va_000.bin", stream[11000:])
        data = ["--train-data", str(d / "tr_*.bin"), "--val-data", str(d / "va_*.bin"), "--device", "cpu",
                "--no-progress", "--sample-tokens", "0"]
        runs = {
            "shuffled": ["--init", "l2h2c32t32", "-b", "4", "-t", "16", "--steps", "8", "--val-every", "3",
                         "--val-batches", "2", "--grad-accum", "2"],
            "llmc-order": ["--init", "l2h4c64t64", "-b", "2", "-t", "32", "--steps", "6", "--no-shuffle",
                           "--lr-schedule", "wsd", "--warmup-steps", "2", "--val-every", "0"],
            "stopped": ["--init", "l2h2c32t32", "-b", "4", "-t", "16", "--steps", "8", "--val-every", "3",
                        "--val-batches", "2", "--grad-accum", "2", "--stop-at", "3"],
        }
        for name, argv in runs.items():
            cli("train", *argv, *data, "--out", str(d / name))
        cli("train", "--resume", str(d / "stopped"), "--no-progress")
        for name in runs:
            events = [json.loads(line) for line in (d / name / "metrics.jsonl").read_text().splitlines()]
            for e in events:
                e.pop("tokens_per_s", None)
            print(f"{name} metrics: {json.dumps(events)}")
            for t, h in safetensors_digests(d / name / "checkpoint.safetensors").items():
                print(f"{name} checkpoint {t}: {h}")
        ck = str(d / "shuffled" / "checkpoint.safetensors")
        cli("convert", ck, str(d / "m.bin"))
        cli("convert", ck, str(d / "m16.bin"), "--to", "llmc-bf16")
        cli("convert", ck, str(d / "hf"), "--to", "hf")
        cli("convert", str(d / "m.bin"), str(d / "back.safetensors"))
        for f in ("m.bin", "m16.bin", "hf/model.safetensors", "hf/config.json"):
            print(f"convert {f}: {hashlib.sha256((d / f).read_bytes()).hexdigest()[:16]}")
        for t, h in safetensors_digests(d / "back.safetensors").items():
            print(f"convert back.safetensors {t}: {h}")
        print("eval: " + cli("eval", "--checkpoint", ck, "--data", str(d / "va_*.bin"), "-b", "2", "-t", "16").strip())
        print("eval hf: " + cli("eval", "--checkpoint", str(d / "hf"), "--data", str(d / "va_*.bin"), "-b", "3",
                                "-t", "32").strip())
        for argv in (["--seed", "3", "-n", "20"], ["--prompt", "ROMEO:", "--temperature", "0", "-n", "12"],
                     ["--prompt", "To be", "--temperature", "0.7", "--top-k", "5", "-n", "16", "--seed", "9"]):
            out = cli("sample", "--checkpoint", ck, *argv)
            print(f"sample {' '.join(argv)}: {hashlib.sha256(out.encode()).hexdigest()[:16]}")


if __name__ == "__main__":
    main()
