"""The command line: bad input is a one-line error, never a traceback, a silent acceptance or a wrong
answer; every option states its default; eval repeats training's validation; sample takes run folders, top-p,
several samples and lengths past the context; --total-batch-size; the tiny-corpus warning."""
import argparse

import numpy as np
import pytest

from llmpy.cli import build_parser, main
from llmpy.data.shards import write_shard
from llmpy.formats.checkpoint import load_checkpoint, save_checkpoint
from llmpy.train import TrainConfig, run
from streams import phrase_stream

MODEL = "l2h2c32t32"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(1)
    stream = phrase_stream(rng, 1200, length=5)
    write_shard(d / "tr_000.bin", stream[:5000])
    write_shard(d / "va_000.bin", stream[5000:])
    res = run(TrainConfig(init=MODEL, train_data=str(d / "tr_*.bin"), val_data=str(d / "va_*.bin"), batch_size=3,
                          seq_len=8, steps=3, val_every=0, val_batches=4, sample_tokens=0, progress=False,
                          device="cpu", out=str(d / "run")))
    return res, str(d / "tr_*.bin"), str(d / "va_*.bin"), d


def one_line_error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def subparsers():
    ap = build_parser()
    return {name: p for name, p in ap._subparsers._group_actions[0].choices.items()}


def test_every_option_of_every_command_states_its_default():
    """Options that take a value say their default (or that they are required); flags say what they do."""
    missing = []
    for name, p in subparsers().items():
        for act in p._actions:
            if isinstance(act, argparse._HelpAction) or not act.option_strings:
                continue
            flag = act.nargs == 0
            ok = bool(act.help) and (flag or act.required or "default" in act.help)
            if not ok:
                missing.append(f"{name} {act.option_strings[0]}: {act.help!r}")
    assert not missing, missing


def test_tokenizer_without_flags_prints_its_help(capsys):
    assert main(["tokenizer"]) == 0
    assert "usage: llmpy tokenizer" in capsys.readouterr().out


@pytest.mark.parametrize("more,msg", [(["--seed", "-1"], "--seed"), (["-n", "-5"], "-n"),
                                      (["--temperature", "nan"], "temperature"),
                                      (["--temperature", "-0.5"], "temperature"), (["--top-k", "-3"], "top-k"),
                                      (["--top-p", "0"], "top-p"), (["--top-p", "1.5"], "top-p"),
                                      (["--num-samples", "0"], "--num-samples")])
def test_sample_refuses_meaningless_settings(trained, capsys, more, msg):
    assert msg in one_line_error(capsys, ["sample", "--checkpoint", str(trained[0].out), *more])


def test_sample_takes_a_run_folder_top_p_several_samples_and_lengths_past_the_context(trained, capsys):
    res = trained[0]
    ck = str(res.out / "checkpoint.safetensors")
    assert main(["sample", "--checkpoint", ck, "--prompt", "Hi", "-n", "6", "--seed", "2"]) == 0
    from_file = capsys.readouterr().out
    assert main(["sample", "--checkpoint", str(res.out), "--prompt", "Hi", "-n", "6", "--seed", "2"]) == 0
    assert capsys.readouterr().out == from_file
    assert main(["sample", "--checkpoint", str(res.out), "-n", "5", "--num-samples", "3", "--top-p", "0.9"]) == 0
    out = capsys.readouterr().out
    assert [ln for ln in out.splitlines() if ln.startswith("--- sample")] == [
        f"--- sample {i} of 3 ---" for i in (1, 2, 3)]
    assert main(["sample", "--checkpoint", str(res.out), "-n", "80", "--temperature", "0"]) == 0  # maxT is 32
    assert capsys.readouterr().out.strip()


def test_eval_repeats_the_runs_validation_by_default(trained, capsys):
    res = trained[0]
    assert main(["eval", "--checkpoint", str(res.out), "--device", "cpu"]) == 0
    out = capsys.readouterr().out.split()
    assert float(out[2]) == pytest.approx(res.val_losses[-1][1], abs=1e-6) and out[4:8] == ["4", "batches", "of",
                                                                                              "3x8"]
    parser = subparsers()["eval"]
    assert next(a for a in parser._actions if a.dest == "device").default == "auto"
    for more in (["--batches", "-1"], ["--batches", "0"], ["--batch-size", "0"]):
        assert "must be >= 1" in one_line_error(capsys, ["eval", "--checkpoint", str(res.out), *more])


def test_eval_of_plain_weights_needs_data_and_uses_trainings_defaults(trained, tmp_path, capsys):
    res, _, val, _ = trained
    w = str(tmp_path / "w.bin")
    assert main(["convert", str(res.out), w]) == 0
    assert "--data" in one_line_error(capsys, ["eval", "--checkpoint", w])
    assert main(["eval", "--checkpoint", w, "--data", val, "--device", "cpu"]) == 0
    # train's defaults (B 16, T 128 but at most maxT = 32, 10 batches but at most one pass)
    assert capsys.readouterr().out.split()[4:8] == ["1", "batches", "of", "16x32"]


def test_nan_weights_are_an_error_for_sample_eval_and_init(trained, tmp_path, capsys):
    res, tr, val, _ = trained
    ck = load_checkpoint(res.out / "checkpoint.safetensors", weights_only=True)
    ck.params["lnfw"][3] = np.nan
    bad = str(tmp_path / "nan.safetensors")
    save_checkpoint(bad, ck.cfg, ck.params)
    assert "NaN" in one_line_error(capsys, ["sample", "--checkpoint", bad])
    assert "NaN" in one_line_error(capsys, ["eval", "--checkpoint", bad, "--data", val])
    assert "NaN" in one_line_error(capsys, ["train", "--init", bad, "--train-data", tr, "--device", "cpu",
                                            "--seq-len", "8", "--out", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("name", ["d-1", "l2h2c-32", "d0", "l0h1c8", "l2h2c32t0"])
def test_impossible_configs_are_refused(name, capsys, tmp_path):
    err = one_line_error(capsys, ["train", "--init", name, "--out", str(tmp_path / "r")])
    assert name in err or "non-positive" in err
    assert not (tmp_path / "r").exists()


def test_a_model_too_large_for_memory_is_a_one_line_error(trained, tmp_path, capsys, monkeypatch):
    _, tr, _, _ = trained
    err = one_line_error(capsys, ["train", "--init", "d1000", "--train-data", tr, "--device", "cpu",
                                  "--out", str(tmp_path / "r")])
    assert "parameters" in err and "GiB" in err and not (tmp_path / "r").exists()
    import llmpy.cli as cli

    def oom(args):
        raise MemoryError("Unable to allocate 3.6 TiB")
    monkeypatch.setattr(cli, "_cmd_eval", oom)
    assert "out of memory" in one_line_error(capsys, ["eval", "--checkpoint", "x"])


def test_total_batch_size_derives_grad_accum(trained, tmp_path, capsys):
    _, tr, val, _ = trained
    common = dict(init=MODEL, train_data=tr, val_data=val, batch_size=2, seq_len=8, steps=3, val_every=0,
                  sample_tokens=0, progress=False, device="cpu")
    a = run(TrainConfig(out=str(tmp_path / "a"), grad_accum=3, **common))
    b = run(TrainConfig(out=str(tmp_path / "b"), total_batch_size=48, **common))
    assert a.train_losses == b.train_losses
    assert load_checkpoint(b.out / "checkpoint.safetensors").state["train"]["grad_accum"] == 3
    argv = ["train", "--init", MODEL, "--train-data", tr, "--device", "cpu", "-b", "2", "-t", "8"]
    assert "not a multiple of B*T*world = 2*8*1 = 16" in one_line_error(
        capsys, argv + ["--total-batch-size", "40", "--out", str(tmp_path / "c")])
    assert "contradicts" in one_line_error(
        capsys, argv + ["--total-batch-size", "48", "--grad-accum", "2", "--out", str(tmp_path / "d")])


def test_a_tiny_corpus_read_many_times_is_warned_about(trained, tmp_path, capsys):
    _, tr, val, _ = trained
    common = dict(init=MODEL, train_data=tr, val_data=val, batch_size=2, seq_len=8, val_every=0,
                  sample_tokens=0, progress=False, device="cpu")
    run(TrainConfig(out=str(tmp_path / "a"), steps=2, **common))
    assert "times over" not in capsys.readouterr().out
    run(TrainConfig(out=str(tmp_path / "b"), steps=200, stop_at=0, **common | dict(batch_size=8, seq_len=32)))
    assert "warning: 200 steps read the training data 11 times over (19 batches per pass)" in capsys.readouterr().out



@pytest.mark.slow
def test_convert_never_replaces_an_output_and_never_guesses_its_format(trained, tmp_path, capsys):
    """An output name whose format cannot be told is refused with the choices; an existing output file, or a
    folder holding anything, is left alone unless --overwrite; an empty folder is filled."""
    run_dir = str(trained[0].out)
    for name in ("out.txt", "model.safetensor", "weights.pt"):
        err = one_line_error(capsys, ["convert", run_dir, str(tmp_path / name)])
        assert "cannot tell which format" in err and "--to" in err and ".safetensors" in err
        assert not (tmp_path / name).exists()
    w = tmp_path / "w.safetensors"
    assert main(["convert", run_dir, str(w)]) == 0
    stamp = w.stat().st_mtime_ns
    assert "--overwrite" in one_line_error(capsys, ["convert", run_dir, str(w)])
    assert w.stat().st_mtime_ns == stamp
    assert main(["convert", run_dir, str(w), "--overwrite"]) == 0
    assert main(["convert", run_dir, str(tmp_path / "m.bin")]) == 0
    assert "m.bin exists" in one_line_error(capsys, ["convert", run_dir, str(tmp_path / "m.bin")])
    hf = tmp_path / "hf_out"
    assert main(["convert", run_dir, str(hf)]) == 0  # a name without an extension: a Hugging Face folder
    assert "already holds config.json" in one_line_error(capsys, ["convert", run_dir, str(hf)])
    # --overwrite replaces the folder's model, sharded weights included (a reader would prefer their index)
    (hf / "model.safetensors.index.json").write_text("{}")
    (hf / "model-00001-of-00002.safetensors").write_bytes(b"x")
    (hf / "notes.txt").write_text("mine")
    assert main(["convert", run_dir, str(hf), "--overwrite"]) == 0
    assert "model.safetensors.index.json" not in {p.name for p in hf.iterdir()} and (hf / "notes.txt").exists()
    assert main(["eval", "--checkpoint", str(hf), "--data", trained[2], "-b", "1", "-t", "8", "--batches", "1"]) == 0
    (tmp_path / "empty").mkdir()
    assert main(["convert", run_dir, str(tmp_path / "empty"), "--to", "hf"]) == 0
    tok = tmp_path / "tok.bin"
    tok.write_bytes(b"mine")
    assert "--overwrite" in one_line_error(capsys, ["tokenizer", "--llmc-out", str(tok)])
    assert tok.read_bytes() == b"mine"
    assert main(["tokenizer", "--llmc-out", str(tok), "--overwrite"]) == 0 and tok.stat().st_size > 100


@pytest.mark.slow
def test_defaults_fit_the_model_and_the_machine(trained, capsys, monkeypatch):
    """sample's default length fits the model's context after the prompt (the CPU-sized models have 128 tokens,
    not 256); sample, train and eval all default to --device auto; the help speaks of the three families."""
    import llmpy.models.decode as decode
    asked = []
    real = decode.generate

    def spy(model, prompt, n, **kw):
        asked.append((len(prompt), n))
        return real(model, prompt, n, **kw)
    monkeypatch.setattr(decode, "generate", spy)
    run_dir = str(trained[0].out)  # maxT 32
    assert main(["sample", "--checkpoint", run_dir, "--prompt", "Hello there", "--temperature", "0"]) == 0
    assert main(["sample", "--checkpoint", run_dir, "--temperature", "0"]) == 0
    assert main(["sample", "--checkpoint", run_dir, "--prompt", "a " * 40, "--temperature", "0"]) == 0
    assert main(["sample", "--checkpoint", run_dir, "-n", "40", "--temperature", "0"]) == 0
    assert asked == [(2, 30), (1, 31), (41, 32), (1, 40)]  # "a " * 40 is 41 tokens: longer than the context
    from llmpy.cli import SAMPLE_TOKENS
    assert SAMPLE_TOKENS == 256
    for name, p in subparsers().items():
        dev = [a for a in p._actions if a.dest == "device"]
        if name in ("train", "sample", "eval"):
            assert dev[0].default in ("auto", None) and "cuda when a GPU is present" in dev[0].help, name
    from llmpy.train import TrainConfig
    assert TrainConfig().device == "auto"
    text = build_parser().description
    assert all(f in text for f in ("GPT-2", "Llama 3", "MatMul-free"))
