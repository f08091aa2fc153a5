"""Bad input is refused where it enters, in one line (`error: ...`, exit status 2; 130 for Ctrl-C), naming the file
and the real cause; never a traceback, a hang, a silent default or a wrong result. One section per class of bad
input, each case tried on every command that reads that input:

1. values that used to crash: a Hugging Face config.json's values of the wrong type or range, integer flags past
   64 bits or any memory, deeply nested JSON in a task file, Ctrl-C while the imports and the set-up run;
2. values that used to give silent wrong results: a task file without examples, NaN/Inf read from a file into a
   config, absurd scales in a packed ternary file;
3. flags that did nothing or silently meant the default: flags that need another flag, empty values, --tokenizer;
4. messages that misled: a missing tensor, a damaged training state, paths that are folders, FIFOs or dangling
   links, OS errors, negative float values, warnings, a GPT-2 folder without config.json;
5. the temporary files a kill leaves in a run folder.
"""
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from llmpy.cli import main
from llmpy.config import config_from_name, family_of
from llmpy.data.shards import write_shard
from llmpy.formats.checkpoint import load_checkpoint, save_checkpoint
from llmpy.formats.hf import write_hf_model
from llmpy.formats.safetensors import load_safetensors, save_safetensors
from llmpy.formats.ternary import write_ternary
from llmpy.train import TrainConfig, run

ROOT = Path(__file__).resolve().parents[1]
SMALL = "l1h2c16t16v256"  # for the run folders whose weights nothing reads: small checkpoints, quick saves
BIG = str(10**30)
DEEP = "[" * 100_000 + "]" * 100_000


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def rand_params(cfg, seed=0):
    r = np.random.default_rng(seed)
    return {s.name: (0.02 * r.standard_normal(s.shape)).astype(np.float32) for s in family_of(cfg).spec(cfg)}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Token shards, a trained GPT-2 run, a Hugging Face folder of each family, and a packed ternary model."""
    d = tmp_path_factory.mktemp("bad-input")
    r = np.random.default_rng(0)
    write_shard(d / "tr_000.bin", r.integers(0, 50257, 4000))
    write_shard(d / "va_000.bin", r.integers(0, 50257, 1000))
    write_shard(d / "sm_000.bin", r.integers(0, 256, 2000))
    run(TrainConfig(init=SMALL, train_data=str(d / "sm_*.bin"), batch_size=1, seq_len=8, steps=6, stop_at=2,
                    val_every=0, sample_tokens=0, progress=False, device="cpu", out=str(d / "stopped")))
    run(TrainConfig(init="l2h2c32t32", train_data=str(d / "tr_*.bin"), val_data=str(d / "va_*.bin"), batch_size=2,
                    seq_len=8, steps=2, val_every=0, val_batches=2, sample_tokens=0, progress=False, device="cpu",
                    out=str(d / "run")))
    for family, name in (("gpt2", "gpt2:l2h2c64t32"), ("llama3", "llama3:l1d32h2k1f64t32"),
                         ("mmfree", "mmfree:l1d32i64t32")):
        cfg = config_from_name(name)
        write_hf_model(d / f"hf-{family}", cfg, rand_params(cfg))
    cfg = config_from_name("mmfree:l1d32i64t32")
    write_ternary(d / "packed.safetensors", cfg, rand_params(cfg))
    return d


def readers(d: Path, model: Path, tmp_path: Path) -> list[list[str]]:
    """Every command that reads a model file or folder, with what else it needs."""
    return [["convert", str(model), str(tmp_path / "out.safetensors")],
            ["sample", "--checkpoint", str(model), "-n", "2"],
            ["eval", "--checkpoint", str(model), "--data", str(d / "va_*.bin"), "-b", "1", "-t", "8"],
            ["train", "--init", str(model), "--train-data", str(d / "tr_*.bin"), "-b", "1", "-t", "8", "--steps",
             "1", "--sample-tokens", "0", "--device", "cpu", "--out", str(tmp_path / "r")]]


def hf_copy(files: Path, family: str, tmp_path: Path, change=None, drop=None) -> Path:
    """A copy of the family's HF folder with config.json changed (a dict of keys, None to delete one) or a tensor
    dropped."""
    dst = tmp_path / f"hf-{family}"
    shutil.copytree(files / f"hf-{family}", dst)
    if change is not None:
        cj = json.loads((dst / "config.json").read_text())
        for k, v in change.items():
            cj.pop(k, None) if v is None else cj.__setitem__(k, v)
        (dst / "config.json").write_text(json.dumps(cj))  # Infinity and NaN as Python's json writes them
    if drop is not None:
        t, meta = load_safetensors(dst / "model.safetensors")
        del t[drop]
        save_safetensors(dst / "model.safetensors", t, meta, checksums=False)
    return dst


# ---- 1. values that used to crash ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family, change, why", [
    ("llama3", {"num_attention_heads": 0}, "num_attention_heads is 0"),
    ("llama3", {"num_key_value_heads": "1"}, "num_key_value_heads is '1'"),
    ("llama3", {"rope_scaling": [1, 2]}, "rope_scaling is [1, 2], want an object"),
    ("llama3", {"rope_scaling": "llama3"}, "rope_scaling is 'llama3', want an object"),
    ("llama3", {"rope_parameters": [1]}, "rope_parameters is [1]"),
    ("llama3", {"rope_theta": float("inf")}, "rope_theta is inf, want a finite number"),
    ("llama3", {"rope_scaling": {"rope_type": "llama3", "factor": "8", "low_freq_factor": 1, "high_freq_factor": 4,
                                 "original_max_position_embeddings": 16}}, "rope_scaling.factor is '8'"),
    ("llama3", {"rms_norm_eps": "x"}, "rms_norm_eps is 'x'"),
    ("llama3", {"max_position_embeddings": 10**30}, "max_position_embeddings is 1000000000000000000000000000000"),
    ("mmfree", {"intermediate_size": None, "hidden_ratio": float("inf")}, "hidden_ratio is inf"),
    ("mmfree", {"intermediate_size": None, "hidden_ratio": "4"}, "hidden_ratio is '4'"),
    ("mmfree", {"max_position_embeddings": "2048"}, "max_position_embeddings is '2048'"),
])
def test_hf_config_values_of_the_wrong_type_or_range_are_one_line_errors(files, tmp_path, capsys, family, change,
                                                                          why):
    folder = hf_copy(files, family, tmp_path, change)
    for argv in readers(files, folder, tmp_path):
        err = one_line_error(capsys, argv)
        assert f"{folder / 'config.json'}: {why}" in err, (argv[0], err)
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "r").exists()


@pytest.mark.parametrize("argv, flag", [
    (["train", "--batch-size", BIG], "--batch-size"), (["train", "--seed", str(2**64)], "--seed"),
    (["train", "--checkpoint-every", BIG], "--checkpoint-every"), (["sample", "--seed", BIG], "--seed"),
    (["sample", "--top-k", BIG], "--top-k"), (["eval", "--batches", BIG], "--batches"),
])
def test_integer_flags_past_64_bits_are_one_line_errors(files, tmp_path, capsys, argv, flag):
    cmd, *more = argv
    base = {"train": ["--init", "l2h2c32t32", "--train-data", str(files / "tr_*.bin"), "-t", "8", "--steps", "1",
                      "--sample-tokens", "0", "--device", "cpu", "--out", str(tmp_path / "r")],
            "sample": ["--checkpoint", str(files / "run"), "-n", "2"],
            "eval": ["--checkpoint", str(files / "run")]}[cmd]
    err = one_line_error(capsys, [cmd, *base, *more])
    assert f"argument {flag}" in err and "64-bit" in err
    assert not (tmp_path / "r").exists()


def test_a_process_count_past_any_machine_is_a_one_line_error(capsys, monkeypatch):
    """Refused before any download or process starts (launch's --nproc-per-node has the same bound; a test that
    launched a million processes on a regression is not written)."""
    monkeypatch.setenv("LLMPY_OFFLINE", "1")
    assert "--workers must be 1..1024" in one_line_error(capsys, ["prepare", "fineweb", "--workers", "1000000"])


def test_a_batch_past_any_memory_is_a_one_line_error(files, tmp_path, capsys):
    """2**62 sequences fit in 64 bits; the activations' size does not (NumPy: "maximum allowed dimension")."""
    err = one_line_error(capsys, ["train", "--init", "l2h2c32t32", "--train-data", str(files / "tr_*.bin"),
                                  "--batch-size", str(2**62), "-t", "8", "--device", "cpu",
                                  "--out", str(tmp_path / "r")])
    assert "does not fit in cpu memory" in err and not (tmp_path / "r").exists()


def test_deeply_nested_json_in_a_task_file_is_a_one_line_error(files, tmp_path, capsys):
    task = tmp_path / "deep.jsonl"
    task.write_text('{"ctx": "a", "endings": ["b", "c"], "label": 0}\n' + DEEP + "\n")
    err = one_line_error(capsys, ["eval", "--checkpoint", str(files / "run"), "--tasks", str(task)])
    assert f"{task}, line 2" in err and "nested too deeply" in err
    err = one_line_error(capsys, ["train", "--init", "l2h2c32t32", "--train-data", str(files / "tr_*.bin"), "-b",
                                  "1", "-t", "8", "--steps", "1", "--sample-tokens", "0", "--device", "cpu",
                                  "--eval-tasks", str(task), "--out", str(tmp_path / "r")])
    assert f"{task}, line 2" in err and not (tmp_path / "r").exists()


_HOOK = """
import os, signal, sys
TARGET = sys.argv[1]
class Hook:  # Ctrl-C the moment TARGET is first imported
    def find_spec(self, name, path=None, target=None):
        if name == TARGET:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None
sys.meta_path.insert(0, Hook())
sys.argv = ["llmpy", *sys.argv[2:]]
import runpy
runpy.run_module("llmpy", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("command, target", [
    (c, t) for c in ("train", "sample", "eval", "convert", "prepare") for t in ("numpy", "datetime")])
def test_ctrl_c_during_imports_and_set_up_exits_130_without_a_traceback(files, tmp_path, command, target):
    """numpy's C extension turns a Ctrl-C inside its own import of datetime into an ImportError ("PyCapsule_Import
    could not import module datetime"): that too is the interrupt it was."""
    (tmp_path / "a.txt").write_text("Some text to tokenize. " * 20)
    argv = {"train": ["--init", "l2h2c32t32", "--train-data", str(files / "tr_*.bin"), "-b", "1", "-t", "8",
                      "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "r")],
            "sample": ["--checkpoint", str(files / "run"), "-n", "2"],
            "eval": ["--checkpoint", str(files / "run")],
            "convert": [str(files / "run"), str(tmp_path / "m.bin")],
            "prepare": [str(tmp_path / "a.txt"), "--out", str(tmp_path / "d")]}[command]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-c", _HOOK, target, command, *argv], capture_output=True, text=True,
                       env=env, timeout=120)
    assert (p.returncode, p.stderr.strip()) == (130, "interrupted"), p.stderr[-2000:]


# ---- 2. values that used to give silent wrong results ----------------------------------------------------------

@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_a_task_file_without_examples_is_refused_not_scored_zero(files, tmp_path, capsys, text):
    task = tmp_path / "empty.jsonl"
    task.write_text(text)
    err = one_line_error(capsys, ["eval", "--checkpoint", str(files / "run"), "--tasks", str(task)])
    assert f"{task} holds no examples" in err
    err = one_line_error(capsys, ["train", "--init", "l2h2c32t32", "--train-data", str(files / "tr_*.bin"), "-b",
                                  "1", "-t", "8", "--steps", "1", "--sample-tokens", "0", "--device", "cpu",
                                  "--eval-tasks", str(task), "--out", str(tmp_path / "r")])
    assert "holds no examples" in err and not (tmp_path / "r").exists()  # no accuracy 0.0 in metrics.jsonl


@pytest.mark.parametrize("family, change, why", [
    ("llama3", {"rope_theta": float("inf")}, "rope_theta is inf"),
    ("llama3", {"rope_scaling": {"rope_type": "llama3", "factor": float("inf"), "low_freq_factor": 1,
                                 "high_freq_factor": 4, "original_max_position_embeddings": 16}}, "factor is inf"),
    ("mmfree", {"rms_norm_eps": float("inf")}, "rms_norm_eps is inf"),
])
def test_non_finite_config_values_are_never_written_back(files, tmp_path, capsys, family, change, why):
    folder = hf_copy(files, family, tmp_path, change)
    assert why in one_line_error(capsys, ["convert", str(folder), str(tmp_path / "c.safetensors")])
    assert not (tmp_path / "c.safetensors").exists()


@pytest.mark.parametrize("key, value", [("rope_theta", float("inf")), ("rope_factor", float("inf")),
                                        ("norm_eps", float("inf"))])
def test_non_finite_values_in_a_checkpoints_config_are_refused(files, tmp_path, capsys, key, value):
    """A checkpoint whose config JSON holds Infinity (json reads it) is not loaded, so never converted or trained
    on into another file."""
    name = "mmfree:l1d32i64t32" if key == "norm_eps" else "llama3:l1d32h2k1f64t32"
    cfg = config_from_name(name)
    ck = tmp_path / "ck.safetensors"
    save_checkpoint(ck, cfg, rand_params(cfg))
    t, meta = load_safetensors(ck)
    meta["config"] = json.dumps({**json.loads(meta["config"]), key: value})
    save_safetensors(ck, t, meta)
    for argv in readers(files, ck, tmp_path)[::3]:  # convert and train --init
        assert f"{key} is inf, not a finite number" in one_line_error(capsys, argv)
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "r").exists()


@pytest.mark.parametrize("scale", [1e-30, 1e-6, 1e7, 3e38])
def test_absurd_ternary_scales_are_refused_on_load(files, tmp_path, capsys, scale):
    t, meta = load_safetensors(files / "packed.safetensors", bf16_as_fp32=False)
    t["iw.scale"] = np.full_like(t["iw.scale"], scale)
    bf16 = {"wte": t.pop("wte")}
    save_safetensors(tmp_path / "t.safetensors", t, meta, bf16=bf16)
    for argv in (["sample", "--checkpoint", str(tmp_path / "t.safetensors"), "-n", "2"],
                 ["eval", "--checkpoint", str(tmp_path / "t.safetensors"), "--data", str(files / "va_*.bin"),
                  "-b", "1", "-t", "8"]):
        err = one_line_error(capsys, argv)
        assert "iw.scale holds" in err and "damaged" in err


# ---- 3. flags that did nothing or silently meant the default ---------------------------------------------------

@pytest.mark.parametrize("more, why", [
    (["--extend"], "--extend without --resume"),
    (["--no-master-weights"], "--no-master-weights is for bf16 training"),
    (["--eval-every", "2"], "--eval-every goes with --eval-tasks"),
    (["--eval-limit", "5"], "--eval-limit goes with --eval-tasks"),
    (["--sample-every", "1"], "--sample-every goes with --sample-tokens"),
])
def test_train_flags_that_would_do_nothing_are_refused(files, tmp_path, capsys, more, why):
    err = one_line_error(capsys, ["train", "--init", "l2h2c32t32", "--train-data", str(files / "tr_*.bin"), "-b",
                                  "1", "-t", "8", "--steps", "1", "--sample-tokens", "0", "--device", "cpu",
                                  "--out", str(tmp_path / "r"), *more])
    assert why in err and not (tmp_path / "r").exists()


def test_train_flags_that_do_nothing_here_get_a_note(files, tmp_path, capsys):
    assert main(["train", "--init", "l2h2c32t32", "--train-data", str(files / "tr_*.bin"), "-b", "1", "-t", "8",
                 "--steps", "1", "--sample-tokens", "0", "--device", "cpu", "--no-progress", "--val-every", "1",
                 "--zero", "1", "--no-graph", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    for note in ("note: no validation data (--val-data): --val-every and --val-batches do nothing",
                 "note: --zero 1 shards over data-parallel ranks; a single process trains as --zero 0",
                 "note: --no-graph is for CUDA devices"):
        assert note in out


@pytest.mark.parametrize("more, why", [
    (["--name", ""], "argument --name: an empty value"),
    (["--shard-tokens", "0"], "shard size must be 1.."),
    (["--val-tokens", "5", "--val-fraction", "0.5"], "give one of them"),
])
def test_prepare_flags_that_would_silently_mean_the_default_are_refused(tmp_path, capsys, more, why):
    (tmp_path / "a.txt").write_text("Some text to tokenize. " * 50)
    err = one_line_error(capsys, ["prepare", str(tmp_path / "a.txt"), "--out", str(tmp_path / "d"), *more])
    assert why in err and not (tmp_path / "d").exists()


def test_empty_paths_are_refused_never_the_current_folder(files, tmp_path, capsys, monkeypatch):
    here = tmp_path / "cwd"
    here.mkdir()
    (here / "notes.txt").write_text("Text that an empty input would have tokenized. " * 20)
    monkeypatch.chdir(here)
    train = ["train", "--init", "l2h2c32t32", "--train-data", str(files / "tr_*.bin"), "-b", "1", "-t", "8",
             "--steps", "1", "--sample-tokens", "0", "--device", "cpu", "--no-progress"]
    cases = [(train + ["--out", ""], "--out"), (train + ["--out", str(tmp_path / "r"), "--val-data", ""], "--val-data"),
             (train + ["--out", str(tmp_path / "r"), "--init", ""], "--init"), (["train", "--resume", ""], "--resume"),
             (train + ["--out", str(tmp_path / "r"), "--gemm-algos", ""], "--gemm-algos"),
             (["convert", str(files / "run"), ""], "output"), (["eval", "--checkpoint", str(files / "run"),
                                                                "--data", ""], "--data"),
             (["prepare", "", "--out", str(tmp_path / "d")], "inputs"), (["tokenizer", "--llmc-out", ""], "--llmc-out")]
    for argv, flag in cases:
        assert f"argument {flag}: an empty value" in one_line_error(capsys, argv), argv
    assert sorted(os.listdir(here)) == ["notes.txt"] and not (tmp_path / "r").exists()


def test_tokenizer_takes_the_same_things_in_every_command(files, tmp_path, capsys):
    """A name, a tokenizer.json or tokenizer.model file, or a folder holding one: train took only the names; any
    other existing file was taken, then the tokenizer beside it used instead."""
    folder = files / "hf-gpt2"  # GPT-2's tokenizer.json beside the weights
    for tok in (str(folder), str(folder / "tokenizer.json")):
        assert main(["train", "--init", "l2h2c32t32", "--train-data", str(files / "tr_*.bin"), "-b", "1", "-t", "8",
                     "--steps", "1", "--sample-tokens", "2", "--device", "cpu", "--no-progress", "--tokenizer", tok,
                     "--out", str(tmp_path / f"r{len(tok)}")]) == 0
        assert main(["sample", "--checkpoint", str(files / "run"), "-n", "2", "--tokenizer", tok]) == 0
    capsys.readouterr()
    (tmp_path / "notes.txt").write_text("not a tokenizer")
    shutil.copy(folder / "tokenizer.json", tmp_path / "tokenizer.json")
    for argv in (["sample", "--checkpoint", str(files / "run"), "-n", "2"],
                 ["eval", "--checkpoint", str(files / "run"), "--tasks", "hellaswag"],
                 ["prepare", str(tmp_path / "notes.txt"), "--out", str(tmp_path / "d")],
                 ["train", "--out", str(tmp_path / "r")], ["tokenizer", "--encode", "x"]):
        err = one_line_error(capsys, [*argv, "--tokenizer", str(tmp_path / "notes.txt")])
        assert "notes.txt' is not a tokenizer.json or tokenizer.model file" in err, argv


# ---- 4. messages that misled -------------------------------------------------------------------------------------

@pytest.mark.parametrize("family, tensor", [("gpt2", "wte.weight"), ("gpt2", "ln_f.weight"),
                                            ("llama3", "model.embed_tokens.weight"),
                                            ("mmfree", "model.embeddings.weight")])
def test_an_hf_file_missing_one_tensor_names_it(files, tmp_path, capsys, family, tensor):
    folder = hf_copy(files, family, tmp_path, drop=tensor)
    for argv in readers(files, folder, tmp_path):
        assert f"is missing the tensor {tensor}" in one_line_error(capsys, argv), argv[0]


def test_a_gpt2_folder_without_config_json_is_refused_not_guessed(files, tmp_path, capsys):
    """Its 2 heads of 32 are in no tensor's shape: the old guess (heads of 64) made it 1 head, silently."""
    folder = hf_copy(files, "gpt2", tmp_path)
    (folder / "config.json").unlink()
    for argv in readers(files, folder, tmp_path):
        assert "needs its config.json beside it" in one_line_error(capsys, argv), argv[0]


def _resume_state(files, tmp_path, change) -> Path:
    """A copy of a run stopped after 2 of its 6 steps, its training state changed."""
    out = tmp_path / "r"
    shutil.copytree(files / "stopped", out)
    ck = load_checkpoint(out / "checkpoint.safetensors")
    change(ck.state)
    save_checkpoint(out / "checkpoint.safetensors", ck.cfg, ck.params, adam_m=ck.adam_m, adam_v=ck.adam_v,
                    state=ck.state)
    return out


@pytest.mark.parametrize("change, why", [
    (lambda st: st.update(step=20, adam_t=20), "step 20 is past the run's 6 planned steps"),
    (lambda st: st["train"].update(steps=1), "step 2 is past the run's 1 planned steps"),
    (lambda st: st.update(adam_t=99), "adam_t 99 differs from step 2"),
    (lambda st: st["loader"].update(files=5), "loader.files is 5"),
    (lambda st: st["loader"].update(epoch=10**30), "loader.epoch is 1000000000000000000000000000000"),
])
def test_a_broken_state_value_is_damage_not_a_finished_run(files, tmp_path, capsys, change, why):
    out = _resume_state(files, tmp_path, change)
    err = one_line_error(capsys, ["train", "--resume", str(out)])
    assert "training state in its metadata is damaged" in err and why in err


@pytest.mark.parametrize("change, why", [
    (lambda st: st["train"].update(batch_size="x"), "batch-size is 'x'"),
    (lambda st: st["train"].update(val_data=5), "val-data is 5"),
    (lambda st: st["train"].update(val_batches=True), "val-batches is True"),
])
def test_eval_of_a_run_with_damaged_settings_says_so(files, tmp_path, capsys, change, why):
    out = _resume_state(files, tmp_path, change)
    err = one_line_error(capsys, ["eval", "--checkpoint", str(out)])
    assert "training settings in its metadata are damaged" in err and why in err


def _no_hang(argv, release: Path, seconds=60) -> int:
    """main(argv) in a thread; a call still blocked after `seconds` (on opening the FIFO `release`) is released
    by opening the FIFO's other end, and fails the test."""
    result = []
    t = threading.Thread(target=lambda: result.append(main(argv)), daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        fd = os.open(release, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        t.join(10)
        pytest.fail(f"{argv} blocked reading the FIFO {release}")
    return result[0]


def test_paths_that_are_folders_fifos_or_dangling_links_are_named_so(files, tmp_path, capsys):
    fifo, fifo_task, link = tmp_path / "fifo", tmp_path / "fifo.jsonl", tmp_path / "link"
    os.mkfifo(fifo)
    os.mkfifo(fifo_task)
    link.symlink_to(tmp_path / "gone")
    (tmp_path / "dir.jsonl").mkdir()
    train = ["train", "--train-data", str(files / "tr_*.bin"), "-b", "1", "-t", "8", "--steps", "1",
             "--sample-tokens", "0", "--device", "cpu", "--out", str(tmp_path / "r")]
    fifo_cases = [
        (["sample", "--checkpoint", str(fifo), "-n", "2"], f"{fifo} is a FIFO (named pipe), not a regular file"),
        ([*train, "--init", str(fifo)], f"{fifo} is a FIFO"),
        (["train", "--init", "l2h2c32t32", "--train-data", str(fifo), "-t", "8", "--device", "cpu",
          "--out", str(tmp_path / "r")], f"token shard {fifo} is a FIFO"),
        (["prepare", str(fifo), "--out", str(tmp_path / "d")], f"input {fifo} is a FIFO"),
        (["eval", "--checkpoint", str(files / "run"), "--tasks", str(fifo_task)], f"task file {fifo_task} is a FIFO"),
    ]
    for argv, why in fifo_cases:
        assert _no_hang(argv, fifo_task if str(fifo_task) in argv else fifo) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and why in err, (argv, err)
    dangling = f"{link} is a dangling symbolic link (to {tmp_path / 'gone'}, which does not exist)"
    for argv in (["sample", "--checkpoint", str(link)], [*train, "--init", str(link)],
                 ["train", "--resume", str(link)], ["prepare", str(link), "--out", str(tmp_path / "d")]):
        assert dangling in one_line_error(capsys, argv), argv
    err = one_line_error(capsys, ["eval", "--checkpoint", str(files / "run"), "--tasks", str(tmp_path / "dir.jsonl")])
    assert f"task file {tmp_path / 'dir.jsonl'} is a folder, not a file" in err
    assert not (tmp_path / "r").exists() and not (tmp_path / "d").exists()


def test_os_errors_are_sentences_naming_the_path_and_what_was_done(files, tmp_path, capsys):
    long = tmp_path / ("x" * 300)
    assert f"{long} cannot be read: file name too long" in one_line_error(
        capsys, ["sample", "--checkpoint", str(long)])
    (tmp_path / "a.txt").write_text("Some text to tokenize. " * 50)
    err = one_line_error(capsys, ["prepare", str(tmp_path / "a.txt"), "--out", str(tmp_path / "a.txt")])
    assert f"cannot create the folder {tmp_path / 'a.txt'}: it is a file already" in err
    err = one_line_error(capsys, ["convert", str(files / "run"), str(tmp_path / "a.txt" / "m.bin")])
    assert f"cannot write {tmp_path / 'a.txt' / 'm.bin'}: {tmp_path / 'a.txt'} is a file, not a folder" in err


@pytest.mark.parametrize("argv, why", [
    (["train", "--lr", "-inf"], "--lr -inf (must be > 0"), (["train", "--lr", "-1e-3"], "--lr -0.001 (must be > 0"),
    (["train", "--weight-decay", "-1e-3"], "--weight-decay -0.001"), (["train", "--eps", "-nan"], "--eps nan"),
    (["sample", "--temperature", "-inf"], "temperature must be a number >= 0 (got -inf)"),
    (["sample", "--top-p", "-1e-3"], "top-p must be in (0, 1] (got -0.001)"),
    (["prepare", "--val-fraction", "-1e-3"], "val fraction must be in [0, 1), got -0.001"),
])
def test_negative_float_values_reach_their_validation(files, tmp_path, capsys, argv, why):
    (tmp_path / "a.txt").write_text("Some text to tokenize. " * 50)
    cmd, *more = argv
    base = {"train": ["--init", "l2h2c32t32", "--train-data", str(files / "tr_*.bin"), "-t", "8", "--device", "cpu",
                      "--out", str(tmp_path / "r")],
            "sample": ["--checkpoint", str(files / "run"), "-n", "2"],
            "prepare": [str(tmp_path / "a.txt"), "--out", str(tmp_path / "d")]}[cmd]
    assert why in one_line_error(capsys, [cmd, *base, *more])


def test_argument_errors_are_one_line(capsys):
    for argv, why in ((["train", "--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
                      (["sample"], "the following arguments are required: --checkpoint"),
                      (["train", "--steps", "1.5"], "argument --steps: '1.5' is not an integer")):
        assert why in one_line_error(capsys, argv)


@pytest.mark.filterwarnings("always:no tokenizer exported")  # (pyproject ignores it for the other exports)
def test_warnings_are_one_line(files, tmp_path, capsys):
    """A GPT-2 smaller than GPT-2's vocabulary exports no tokenizer; a task example longer than -t loses its start:
    both say so in one line `warning: ...`, not in Python's file:line form with a source line."""
    ck = tmp_path / "small.safetensors"
    cfg = config_from_name("gpt2:l1h2c32t32v300")
    save_checkpoint(ck, cfg, rand_params(cfg))
    assert main(["convert", str(ck), str(tmp_path / "hf"), "--to", "hf"]) == 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("warning: no tokenizer exported: the model's vocabulary (300)") and "\n" not in err, err
    task = tmp_path / "long.jsonl"
    task.write_text(json.dumps({"ctx": "word " * 60, "endings": ["a b", "c d"], "label": 0}) + "\n")
    assert main(["eval", "--checkpoint", str(files / "run"), "--tasks", str(task), "-t", "16"]) == 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("warning: ") and "longer than 17 tokens" in err and "\n" not in err, err


# ---- 5. what a kill leaves in a run folder -------------------------------------------------------------------------

def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_a_kill_during_keep_rotation_leaves_no_temporary_file_behind(files, tmp_path, capsys, monkeypatch):
    """Killed in the save that follows the rotation's hard link (checkpoint-000002 is then another name of
    checkpoint.safetensors): the resumed run links the two again, and rename(2) of one link onto the other does
    nothing, leaving its temporary name in the folder for good."""
    import llmpy.formats.checkpoint as ckpt
    out = tmp_path / "r"
    argv = ["train", "--init", SMALL, "--train-data", str(files / "sm_*.bin"), "-b", "1", "-t", "8",
            "--steps", "6", "--val-every", "0", "--sample-tokens", "0", "--device", "cpu", "--no-progress",
            "--checkpoint-every", "2", "--keep", "3", "--out", str(out)]
    real, calls = ckpt.save_checkpoint, []

    def killed_on_the_second_save(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise SystemExit(137)  # as a kill: nothing after it runs
        return real(*a, **k)
    monkeypatch.setattr(ckpt, "save_checkpoint", killed_on_the_second_save)
    with pytest.raises(SystemExit):
        main(argv)
    monkeypatch.setattr(ckpt, "save_checkpoint", real)
    assert os.path.samefile(out / "checkpoint.safetensors", out / "checkpoint-000002.safetensors")
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert _leftovers(out) == []
    assert sorted(p.name for p in out.glob("checkpoint*")) == [
        "checkpoint-000002.safetensors", "checkpoint-000004.safetensors", "checkpoint.safetensors"]


def test_a_refused_resume_still_removes_what_a_kill_left(files, tmp_path, capsys):
    """A run killed while writing loss.png after its last checkpoint is finished: no run claims its folder again,
    so the resume that is refused removes the temporary file."""
    out = tmp_path / "r"
    run(TrainConfig(init=SMALL, train_data=str(files / "sm_*.bin"), batch_size=1, seq_len=8, steps=2,
                    val_every=0, sample_tokens=0, progress=False, device="cpu", out=str(out)))
    (out / ".loss.png.k2j4h5g6.tmp").write_bytes(b"half a png")
    (out / ".notes.txt.k2j4h5g6.tmp").write_bytes(b"not ours")
    assert "is finished" in one_line_error(capsys, ["train", "--resume", str(out)])
    assert _leftovers(out) == [".notes.txt.k2j4h5g6.tmp"]
