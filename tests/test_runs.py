"""The run folder: nothing after the last step stops the final save, nothing non-finite is saved, one run
per folder (a lock), resume means what it says (into another folder, extending, refusing pointless resumes,
touching nothing when it refuses), orphaned temporary files, config.json, --keep, the exit status of a graceful
stop."""
import fcntl
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from llmpy.cli import main
from llmpy.data.shards import write_shard
from llmpy.errors import UserError
from llmpy.formats.checkpoint import load_checkpoint, save_checkpoint
from llmpy.train import TrainConfig, run
from llmpy.train.optim import AdamW
from llmpy.train.rundir import LOCK, ORPHAN
from streams import phrase_stream

ROOT = Path(__file__).resolve().parents[1]
MODEL = "l2h2c32t32"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("run_shards")
    rng = np.random.default_rng(0)
    stream = phrase_stream(rng, 1500, vocab=500)  # ids < 500: also fit a 512-token vocabulary
    write_shard(d / "tr_000.bin", stream[:8000])
    write_shard(d / "va_000.bin", stream[8000:])
    return str(d / "tr_*.bin"), str(d / "va_*.bin")


def cfg(shards, out, **kw):
    base = dict(init=MODEL, train_data=shards[0], val_data=shards[1], batch_size=2, seq_len=16, steps=6,
                val_every=3, val_batches=2, sample_tokens=0, progress=False, device="cpu", out=str(out))
    base.update(kw)
    return TrainConfig(**base)


def resume(path, **kw):
    return TrainConfig(resume=str(path), progress=False, **kw, explicit=("resume", *kw))


def argv(shards, out, *more):
    return ["train", "--train-data", shards[0], "--val-data", shards[1], "--init", MODEL, "--device", "cpu",
            "--no-progress", "--batch-size", "2", "--seq-len", "16", "--out", str(out), *more]


def events(out):
    return [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]


def losses(out):
    return [(e["step"], e.get("train_loss"), e.get("val_loss")) for e in events(out)]


def snapshot(folder):
    """Every file's bytes and modification time: 'touched nothing' means this does not change."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(Path(folder).iterdir())}


def one_line_error(capsys, args):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# ---- 1. nothing after the last step prevents the final save ---------------------------------------------------

@pytest.mark.parametrize("init,kw", [
    ("l2h2c32t32", dict(sample_tokens=64)),                    # the end-of-run sample is longer than the context
    ("l2h2c32t32", dict(steps=0, sample_tokens=64)),           # --steps 0
    ("l2h2c32t64", dict(sample_every=2, sample_tokens=100)),   # --sample-every with --sample-tokens > context
    ("l2h2c32t32v512", dict(sample_tokens=8)),                 # no end-of-text token (50256) in the vocabulary
])
@pytest.mark.slow
def test_samples_fit_the_context_and_never_stop_the_final_save(shards, tmp_path, capsys, init, kw):
    res = run(cfg(shards, tmp_path / "r", init=init, **kw))
    out = capsys.readouterr().out
    assert (tmp_path / "r" / "checkpoint.safetensors").exists() and (tmp_path / "r" / "loss.png").exists()
    assert res.steps_done == kw.get("steps", 6) and "failed" not in out
    if kw["sample_tokens"] > 32:
        assert out.count("note: samples are cropped") == 1
    if kw.get("steps", 6):  # and the run resumes afterwards (extending it past its finished schedule)
        again = run(resume(tmp_path / "r", steps=8, extend=True))
        assert again.steps_done == 8


def test_a_failing_sample_is_reported_and_the_run_still_saves(shards, tmp_path, capsys, monkeypatch):
    import llmpy.models.decode as decode

    def broken(*a, **k):
        raise RuntimeError("sampler exploded")
    monkeypatch.setattr(decode, "generate", broken)
    run(cfg(shards, tmp_path / "r", sample_every=2, sample_tokens=4))
    out = capsys.readouterr().out
    assert "warning: the sample at step 2 failed (RuntimeError: sampler exploded)" in out
    assert "the sample at step 6 failed" in out  # the end-of-run one too
    assert load_checkpoint(tmp_path / "r" / "checkpoint.safetensors").state["step"] == 6
    assert (tmp_path / "r" / "loss.png").exists()


# ---- 2. non-finite settings and weights -------------------------------------------------------------------------

@pytest.mark.parametrize("flag,value", [("--eps", "nan"), ("--weight-decay", "nan"), ("--weight-decay", "inf"),
                                        ("--final-lr-frac", "nan"), ("--decay-frac", "nan"), ("--lr", "1e39"),
                                        ("--lr", "nan"), ("--beta1", "1"), ("--beta2", "nan"), ("--eps", "0"),
                                        ("--grad-clip", "inf"), ("--final-lr-frac", "2"), ("--stop-at", "-1"),
                                        ("--keep", "0"), ("--total-batch-size", "0")])
def test_bad_numeric_settings_are_refused_before_anything_is_written(shards, tmp_path, capsys, flag, value):
    err = one_line_error(capsys, argv(shards, tmp_path / "r", flag, value))
    assert flag in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("extra", [(), ("--dtype", "fp32")])
def test_bf16_moments_on_an_fp32_run_are_refused_before_anything_is_written(shards, tmp_path, capsys, extra):
    err = one_line_error(capsys, argv(shards, tmp_path / "r", "--moments", "bf16", *extra))
    assert "bf16" in err and "moments" in err
    assert not (tmp_path / "r").exists()


def test_fast_attention_on_the_cpu_is_refused_before_anything_is_written(shards, tmp_path, capsys):
    err = one_line_error(capsys, argv(shards, tmp_path / "r", "--fast-attention", "--device", "cpu"))
    assert "--fast-attention" in err and "CUDA" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flag", [("--tune-gemm",), ("--gemm-algos", "x.json")])
def test_gemm_algorithm_flags_on_the_cpu_are_refused_before_anything_is_written(shards, tmp_path, capsys, flag):
    err = one_line_error(capsys, argv(shards, tmp_path / "r", *flag, "--device", "cpu"))
    assert flag[0] in err and "CUDA" in err
    assert not (tmp_path / "r").exists()


def test_gemm_algorithm_choices_are_read_from_a_checkpoint_or_json(shards, tmp_path):
    """--gemm-algos reads the choices of a tuned run from its checkpoint's header (or a JSON of the same form) and
    refuses anything else in one line."""
    from llmpy.train.checkpointing import gemm_pins
    pins = {"cublaslt": 130100, "gpu": "NVIDIA H200", "algos": {"0,1,768,4096,768": 3}}
    good = tmp_path / "pins.json"
    good.write_text(json.dumps(pins))
    assert gemm_pins(str(good)) == pins
    res = run(TrainConfig(train_data=shards[0], init=MODEL, batch_size=2, seq_len=16, steps=2, val_every=0,
                          sample_tokens=0, progress=False, device="cpu", out=str(tmp_path / "cpu")))
    with pytest.raises(UserError, match="no algorithm choices"):
        gemm_pins(str(res.out / "checkpoint.safetensors"))  # a CPU run chose no products' algorithms
    ck = load_checkpoint(res.out / "checkpoint.safetensors")
    save_checkpoint(tmp_path / "tuned.safetensors", ck.cfg, ck.params, state={**ck.state, "gemm_algos": pins})
    assert gemm_pins(str(tmp_path / "tuned.safetensors")) == pins
    bad = tmp_path / "bad.json"
    for text in ("{", json.dumps({"algos": {"s": -1}}), json.dumps([1])):
        bad.write_text(text)
        with pytest.raises(UserError, match="--gemm-algos"):
            gemm_pins(str(bad))
    with pytest.raises(UserError, match="does not exist"):
        gemm_pins(str(tmp_path / "missing.json"))
    (tmp_path / "data.bin").write_bytes(b"\0" * 64)
    with pytest.raises(UserError):
        gemm_pins(str(tmp_path / "data.bin"))


def test_gemm_algorithm_choice_is_pinned_tuned_or_the_heuristics_first():
    """cuda/gemm.py's choice logic, without a GPU (the timing is stubbed): a pin wins, tuning runs only when on and
    not inside a graph capture, every choice is recorded as a pin, a pin the heuristic no longer offers is an error."""
    from llmpy.backends.cuda.gemm import Gemm

    class Stream:
        def __init__(self, capturing):
            self.capturing = capturing

        def is_capturing(self):
            return self.capturing

    def choose(g, ks, capturing=False):
        plan = [None] * 4 + [np.arange(6), ks, None]
        return int(g._choose(plan, None, None, False, Stream(capturing))[0])

    g = Gemm.__new__(Gemm)
    g.tune, g.pins, g.loaded, g.tuned = False, {}, False, []
    g._time = lambda cands, *a: 4
    assert choose(g, "a") == 0 and g.pins == {"a": 0}  # default: the heuristic's first
    g.tune = True
    assert choose(g, "b") == 4 and choose(g, "c", capturing=True) == 0
    assert g.pins == {"a": 0, "b": 4, "c": 0}
    g.pins["d"] = 2
    assert choose(g, "d") == 2  # pinned: not timed again
    g.pins["e"] = 9
    with pytest.raises(UserError, match="not among the 6"):
        choose(g, "e")


def test_non_finite_weights_are_never_written(shards, tmp_path, monkeypatch):
    """The update of step 3 makes a weight NaN; its loss (computed before the update) is finite, so only the guard
    in the checkpoint writer stops the checkpoint after step 3 from replacing the good one after step 2."""
    orig = AdamW.apply

    def poisoned(self):
        orig(self)
        if self.t == 3:
            self.model.params.flat[5] = np.nan
    monkeypatch.setattr(AdamW, "apply", poisoned)
    out = tmp_path / "r"
    with pytest.raises(UserError, match="not finite") as e:
        run(cfg(shards, out, checkpoint_every=1, val_every=0))
    assert f"the last checkpoint, {out / 'checkpoint.safetensors'}, is intact" in str(e.value)
    ck = load_checkpoint(out / "checkpoint.safetensors")
    assert ck.state["step"] == 2 and all(np.isfinite(a).all() for a in ck.params.values())


def test_divergence_without_a_checkpoint_says_there_is_none(shards, tmp_path):
    with pytest.raises(UserError, match="diverged") as e:
        run(cfg(shards, tmp_path / "r", lr=1e38, grad_clip=0.0, warmup_steps=0, checkpoint_every=0, val_every=0))
    assert "there is no checkpoint of this run yet" in str(e.value)
    assert not (tmp_path / "r" / "checkpoint.safetensors").exists()


# ---- 3. --resume A --out B ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_resume_into_another_folder_copies_the_run_and_leaves_both_folders_alone(shards, tmp_path, capsys):
    full = run(cfg(shards, tmp_path / "full", steps=7))
    run(cfg(shards, tmp_path / "a", steps=7, stop_at=3))
    other = run(cfg(shards, tmp_path / "b", steps=2))
    a, b = snapshot(tmp_path / "a"), snapshot(other.out)
    err = one_line_error(capsys, ["train", "--resume", str(tmp_path / "a"), "--out", str(other.out)])
    assert "new or empty" in err
    assert snapshot(tmp_path / "a") == a and snapshot(other.out) == b
    res = run(TrainConfig(resume=str(tmp_path / "a"), out=str(tmp_path / "c"), progress=False,
                          explicit=("resume", "out")))
    assert res.steps_done == 7 and losses(tmp_path / "c") == losses(full.out)  # the whole run's history, bitwise
    assert snapshot(tmp_path / "a") == a  # A stays a stopped run: it can still be continued itself
    assert run(resume(tmp_path / "a")).steps_done == 7


# ---- 4. one run per folder ----------------------------------------------------------------------------------------

def test_a_second_run_on_the_same_folder_stops_with_one_line(shards, tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running llmpy holds it
    try:
        err = one_line_error(capsys, argv(shards, out, "--steps", "1"))
        assert "in use by another llmpy run" in err
        assert sorted(p.name for p in out.iterdir()) == [LOCK]
    finally:
        os.close(fd)
    assert main(argv(shards, out, "--steps", "1")) == 0  # released: the folder is usable again
    fcntl.flock(os.open(out / LOCK, os.O_RDWR), fcntl.LOCK_EX | fcntl.LOCK_NB)  # and the run let go of it


@pytest.mark.slow
def test_a_new_run_never_replaces_an_earlier_runs_files_unless_told(shards, tmp_path, capsys):
    """An --out holding an earlier run's files (a diverged run's metrics and settings, no checkpoint; then a finished
    run with a kept checkpoint) is refused in one line, touching nothing; --overwrite starts over there, the
    earlier run's files gone (and nothing else); it does not go with --resume."""
    out = tmp_path / "r"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "train_loss": 10.9}\n')  # what a run that diverged leaves
    (out / "config.json").write_text("{}\n")
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    err = one_line_error(capsys, argv(shards, out, "--steps", "2"))
    assert "holds files of an earlier run" in err and "--overwrite" in err
    assert snapshot(out) == before
    quick = ("--val-every", "0", "--val-batches", "1", "--sample-tokens", "0")
    assert main(argv(shards, out, "--steps", "3", "--checkpoint-every", "2", "--keep", "2", "--overwrite", *quick)) == 0
    assert "checkpoint-000002.safetensors" in {p.name for p in out.iterdir()}
    before = snapshot(out)
    assert "--overwrite" in one_line_error(capsys, argv(shards, out, "--steps", "1"))
    assert snapshot(out) == before
    assert "drop --overwrite" in one_line_error(capsys, ["train", "--resume", str(out), "--overwrite"])
    assert snapshot(out) == before
    capsys.readouterr()
    assert main(argv(shards, out, "--steps", "1", "--overwrite", *quick)) == 0
    assert "--overwrite: removed the earlier run's" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir() if p.name != LOCK) == ["checkpoint.safetensors", "config.json",
                                                                        "loss.png", "metrics.jsonl", "notes.txt"]
    assert [e["step"] for e in events(out) if "train_loss" in e] == [1]


def test_the_lock_works_with_data_parallel_ranks(shards, tmp_path):
    """Rank 0 alone takes the folder; when it cannot, every rank stops (none waits for it forever)."""
    from test_data_parallel import ThreadDist, on_threads

    from fakes import FakeComm
    out = tmp_path / "dp"
    out.mkdir()
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    comms = FakeComm.group(2, timeout=30)
    errors = []

    def rank(r):
        try:
            run(cfg(shards, out, steps=2), dist=ThreadDist(comms[r]))
        except UserError as e:
            errors.append((r, str(e)))
    try:
        on_threads(2, rank)
    finally:
        os.close(fd)
    assert sorted(r for r, _ in errors) == [0, 1] and "in use" in dict(errors)[0]
    comms = FakeComm.group(2, timeout=30)
    on_threads(2, lambda r: run(cfg(shards, out, steps=3, stop_at=1, zero=1), dist=ThreadDist(comms[r])))
    # ZeRO: a resume into another folder reads the optimizer shards from the run's own folder
    comms = FakeComm.group(2, timeout=30)
    done = on_threads(2, lambda r: run(TrainConfig(resume=str(out), out=str(tmp_path / "dp2"), progress=False,
                                                   explicit=("resume", "out")), dist=ThreadDist(comms[r])))
    assert [done[r].steps_done for r in (0, 1)] == [3, 3]
    assert sorted(p.name for p in (tmp_path / "dp2").glob("zero-*")) == [
        f"zero-step00000003-rank{r}-of-2.safetensors" for r in (0, 1)]


# ---- 6. + 8. resume semantics ------------------------------------------------------------------------------------

def test_pointless_or_schedule_changing_resumes_are_refused_and_touch_nothing(shards, tmp_path, capsys):
    out = tmp_path / "r"
    run(cfg(shards, out, steps=6))
    before = snapshot(out)
    cases = [(["--steps", "4"], "done 6 steps already"), (["--steps", "6"], "is finished"), ([], "is finished"),
             (["--steps", "9"], "--extend"), (["--init", MODEL], "exclude each other"),
             (["--extend"], "is finished")]
    for more, msg in cases:
        assert msg in one_line_error(capsys, ["train", "--resume", str(out), *more])
        assert snapshot(out) == before
    run(cfg(shards, tmp_path / "s", steps=6, stop_at=3))
    stopped = snapshot(tmp_path / "s")
    for more, msg in ((["--steps", "5"], "shorten"), (["--stop-at", "1"], "has done 3 steps already"),
                      (["--stop-at", "3"], "has done 3 steps already"), (["--steps", "3"], "done 3 steps already"),
                      (["--extend"], "--extend needs --steps")):
        assert msg in one_line_error(capsys, ["train", "--resume", str(tmp_path / "s"), *more])
        assert snapshot(tmp_path / "s") == stopped


def test_extending_a_finished_run_is_explicit_and_shows_the_new_schedule(shards, tmp_path, capsys):
    out = tmp_path / "r"
    run(cfg(shards, out, steps=6))
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--steps", "9", "--extend", "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "warning: --extend: the run was planned for 6 steps" in said and "now spans 9" in said
    train = [e["step"] for e in events(out) if "train_loss" in e]
    assert train == list(range(1, 10))


@pytest.mark.slow
def test_resume_from_the_checkpoint_file_is_resume_from_its_folder(shards, tmp_path):
    full = run(cfg(shards, tmp_path / "full", steps=7))
    run(cfg(shards, tmp_path / "part", steps=7, stop_at=3))
    res = run(resume(tmp_path / "part" / "checkpoint.safetensors"))
    assert res.out == tmp_path / "part" and losses(res.out) == losses(full.out)


# ---- 7. orphaned temporary files ------------------------------------------------------------------------------

def test_orphaned_temporary_files_are_removed_and_only_ours(shards, tmp_path, capsys):
    out = tmp_path / "r"
    run(cfg(shards, out, steps=6, stop_at=1))
    fd, real = tempfile.mkstemp(dir=out, prefix=".checkpoint.safetensors.", suffix=".tmp")  # atomic.py's naming
    os.write(fd, b"x" * 4096)
    os.close(fd)
    ours = [Path(real).name, ".metrics.jsonl.ab_12xyz.tmp", ".zero-step00000004-rank1-of-2.safetensors.k2j4h5g6.tmp"]
    theirs = [".notes.txt.abcd1234.tmp", ".checkpoint.safetensors.abc.tmp", "data.tmp", ".checkpoint.safetensors"]
    for name in ours[1:] + theirs:
        (out / name).write_bytes(b"y")
    assert all(ORPHAN.fullmatch(n) for n in ours) and not any(ORPHAN.fullmatch(n) for n in theirs)
    capsys.readouterr()
    run(resume(out))
    assert "removed temporary files of interrupted writes" in capsys.readouterr().out
    left = {p.name for p in out.iterdir()}
    assert not left & set(ours) and set(theirs) <= left


# ---- 9. the state a resume reads -------------------------------------------------------------------------------

@pytest.mark.parametrize("change,msg", [
    (lambda st: st.update(step=-1), "step is -1"), (lambda st: st.pop("step"), "step is None"),
    (lambda st: st.update(step=2.5), "step is 2.5"), (lambda st: st.update(adam_t="3"), "adam_t"),
    (lambda st: st.update(loader=[1]), "loader"), (lambda st: st.update(sample_rng={"x": 1}), "sample_rng"),
    (lambda st: st["train"].update(lr=-0.1), "--lr -0.1"), (lambda st: st["train"].update(lr="fast"), "lr is"),
    (lambda st: st["train"].pop("steps"), "train.steps"), (lambda st: st.update(world=0), "world"),
])
@pytest.mark.slow
def test_a_bad_training_state_is_an_error_and_changes_nothing(shards, tmp_path, capsys, change, msg):
    out = tmp_path / "r"
    run(cfg(shards, out, steps=6, stop_at=2))
    path = out / "checkpoint.safetensors"
    ck = load_checkpoint(path)
    change(ck.state)
    save_checkpoint(path, ck.cfg, ck.params, adam_m=ck.adam_m, adam_v=ck.adam_v, state=ck.state)
    before = snapshot(out)
    assert msg in one_line_error(capsys, ["train", "--resume", str(out)])
    assert snapshot(out) == before


def test_non_finite_values_in_a_checkpoint_are_reported_as_damage(shards, tmp_path, capsys):
    out = tmp_path / "r"
    run(cfg(shards, out, steps=6, stop_at=2))
    ck = load_checkpoint(out / "checkpoint.safetensors")
    ck.adam_v[next(iter(ck.adam_v))].flat[0] = np.inf
    save_checkpoint(out / "checkpoint.safetensors", ck.cfg, ck.params, adam_m=ck.adam_m, adam_v=ck.adam_v,
                    state=ck.state)
    assert "damaged" in one_line_error(capsys, ["train", "--resume", str(out)])


@pytest.mark.slow
def test_a_damaged_or_differently_numbered_metrics_log_never_blocks_a_resume(shards, tmp_path, capsys):
    """Damaged lines are dropped with a warning. And earlier versions logged the n-th step's train loss at step
    n-1 (the checkpoint's "step" was already the steps done): such a log comes out numbered as a fresh run's is."""
    full = run(cfg(shards, tmp_path / "full", steps=6))
    out = tmp_path / "r"
    run(cfg(shards, out, steps=6, stop_at=3))
    old = [dict(e, step=e["step"] - 1) if "train_loss" in e else e for e in events(out)]
    assert [e["step"] for e in old if "train_loss" in e] == [0, 1, 2]
    (out / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in old))
    with open(out / "metrics.jsonl", "ab") as f:
        f.write(b'5\n[1, 2]\n{"step": "x"}\n\xff\xfe not utf-8\n{"step": -3}\n{"step": 1, "train_lo')
    capsys.readouterr()
    run(resume(out))
    assert "damaged line(s) of metrics.jsonl" in capsys.readouterr().out
    assert losses(out) == losses(full.out) and (out / "loss.png").exists()


# ---- 10. the exit status of a graceful stop ---------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_exit_128_plus_it(shards, tmp_path, sig, code):
    out = tmp_path / "r"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-m", "llmpy", *argv(shards, out, "--steps", "100000", "--val-every",
                                                                 "0", "--sample-tokens", "0")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in p.stdout:  # training has started once step lines come
            if line.startswith("step 3/"):
                break
        p.send_signal(sig)
        rest, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == code, err
    step = load_checkpoint(out / "checkpoint.safetensors").state["step"]
    assert step >= 3 and f"stopped after {step} of 100000 steps" in rest
    # and it resumes bitwise: the same losses as a run that was never interrupted
    assert main(["train", "--resume", str(out), "--stop-at", str(step + 1), "--no-progress"]) == 0
    ref = tmp_path / "ref"
    assert main(argv(shards, ref, "--steps", "100000", "--val-every", "0", "--sample-tokens", "0", "--stop-at",
                     str(step + 1))) == 0
    assert losses(out) == losses(ref) and [s for s, _, _ in losses(ref)] == list(range(1, step + 2))


# ---- 12. config.json, --keep, weights-only export -----------------------------------------------------------------

def test_config_json_records_every_setting(shards, tmp_path):
    out = tmp_path / "r"
    run(cfg(shards, out, steps=2, lr=1e-3))
    c = json.loads((out / "config.json").read_text())
    assert c["train"]["lr"] == 1e-3 and c["train"]["steps"] == 2 and c["train"]["out"] == str(out)
    assert c["model"]["family"] == "gpt2" and c["model"]["max_seq_len"] == 32
    assert c["device"] == "cpu" and c["tokens_per_step"] == 32 and c["parameters"] > 0
    assert set(TrainConfig.__dataclass_fields__) - set(c["train"]) == {"explicit"}


@pytest.mark.slow
def test_keep_keeps_the_last_n_checkpoints_and_an_earlier_one_resumes(shards, tmp_path, capsys):
    out = tmp_path / "r"
    full = run(cfg(shards, out, steps=7, checkpoint_every=2, keep=3))
    names = sorted(p.name for p in out.glob("checkpoint*.safetensors"))
    assert names == ["checkpoint-000004.safetensors", "checkpoint-000006.safetensors", "checkpoint.safetensors"]
    assert load_checkpoint(out / names[0]).state["step"] == 4
    assert load_checkpoint(out / "checkpoint.safetensors").state["step"] == 7
    run(cfg(shards, tmp_path / "one", steps=7, checkpoint_every=2))
    assert sorted(p.name for p in (tmp_path / "one").glob("checkpoint*")) == ["checkpoint.safetensors"]
    # an earlier checkpoint continues into a new folder (never in place: that would drop the later steps)
    assert "new folder" in one_line_error(capsys, ["train", "--resume", str(out / names[0])])
    res = run(TrainConfig(resume=str(out / names[0]), out=str(tmp_path / "again"), progress=False,
                          explicit=("resume", "out")))
    assert losses(res.out) == losses(full.out)


def test_weights_only_export_of_a_run(shards, tmp_path, capsys):
    out = tmp_path / "r"
    run(cfg(shards, out, steps=2))
    w = tmp_path / "w.safetensors"
    assert main(["convert", str(out), str(w)]) == 0
    ck = load_checkpoint(w)
    assert ck.adam_m is None and "train" not in ck.state
    assert w.stat().st_size < 0.4 * (out / "checkpoint.safetensors").stat().st_size
    full = load_checkpoint(out / "checkpoint.safetensors")
    assert all(np.array_equal(ck.params[k], full.params[k]) for k in ck.params)
    assert "weights only" in one_line_error(capsys, ["train", "--resume", str(w)])
    assert main(argv(shards, tmp_path / "from_w", "--steps", "1", "--init", str(w))) == 0
    assert math.isfinite(events(tmp_path / "from_w")[-1]["val_loss"])


# ---- 15. a failed start ---------------------------------------------------------------------------------------------

def test_a_failed_start_leaves_no_run_folder(shards, tmp_path, capsys):
    for more in (["--train-data", str(tmp_path / "none_*.bin")], ["--seq-len", "64"], ["--init", "d-1"],
                 ["--total-batch-size", "100"]):
        out = tmp_path / "new" / "nested"
        one_line_error(capsys, argv(shards, out, *more))
        assert not (tmp_path / "new").exists()


# ---- 16. errors that say how to get unstuck -----------------------------------------------------------------------

def test_errors_name_the_fix(shards, tmp_path, capsys):
    """A val split smaller than one batch names `llmpy prepare --val-tokens` and -b/-t; --resume of a folder that
    does not exist, or holds no checkpoint, says which; nothing is written."""
    small = tmp_path / "small_val_000000.bin"
    write_shard(small, np.arange(20))
    err = one_line_error(capsys, argv(shards, tmp_path / "r", "--val-data", str(small)))
    assert "val split" in err and "--val-tokens 33" in err and "-b/-t" in err
    assert not (tmp_path / "r").exists()
    err = one_line_error(capsys, ["train", "--resume", str(tmp_path / "missing")])
    assert "no such folder or file" in err and not (tmp_path / "missing").exists()
    (tmp_path / "empty").mkdir()
    assert "holds no checkpoint.safetensors" in one_line_error(capsys, ["train", "--resume", str(tmp_path / "empty")])
    assert list((tmp_path / "empty").iterdir()) == []


@pytest.mark.slow
def test_a_plan_too_long_for_the_cpu_is_said_once_with_its_size(shards, tmp_path, capsys, monkeypatch):
    """A GPU-sized plan on the CPU is said once before the first step, with its size and the time it needs at
    least; small plans are not even measured."""
    from llmpy.config import config_from_name
    from llmpy.train import setup
    monkeypatch.setattr(setup, "cpu_matmul_flops", lambda: pytest.fail("a small plan was measured"))
    assert setup.cpu_plan_warning(config_from_name("l4h4c128t128"), 128, 16 * 128, 200, 7_200_000) is None  # README's
    monkeypatch.setattr(setup, "cpu_matmul_flops", lambda: 1e11)  # a laptop's 100 GFLOP/s
    line = setup.cpu_plan_warning(config_from_name("d12"), 1024, 8 * 1024, 2000, 124_475_904)
    assert line.startswith("warning: this plan will not finish in reasonable time on the CPU: 2,000 steps x 8,192 "
                           "tokens of a 124.5M-parameter model")
    assert "at least 37 hours" in line and "--device cuda" in line
    assert setup.cpu_plan_warning(config_from_name("d12"), 1024, 8 * 1024, 20, 124_475_904) is None  # 22 minutes
    monkeypatch.setattr(setup, "MIN_CPU_FLOPS", 0.0)
    monkeypatch.setattr(setup, "cpu_matmul_flops", lambda: 1e3)  # as slow as that, this tiny run is such a plan
    res = run(cfg(shards, tmp_path / "slow", steps=2, val_every=0))
    out = capsys.readouterr().out
    assert out.count("will not finish in reasonable time") == 1 and "2 steps x 32 tokens" in out
    assert out.index("reasonable time") < out.index("step 1/2") and res.steps_done == 2
