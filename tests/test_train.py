"""The training loop and `llmpy train`: the metrics contract, llm.c's data order, bitwise resume, bad input."""
import json
import math

import numpy as np
import pytest

from llmpy.backends import get_backend
from llmpy.cli import main
from llmpy.config import config_from_name
from llmpy.data.shards import write_shard
from llmpy.errors import UserError
from llmpy.formats.checkpoint import load_checkpoint
from llmpy.models.gpt2 import GPT2
from llmpy.train.optim import AdamW, lr_at
from llmpy.train import TrainConfig, run
from streams import phrase_stream

MODEL = "l2h2c32t32"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    # a learnable stream: short repeated phrases of random tokens
    stream = phrase_stream(rng, 1500)
    write_shard(d / "tr_000.bin", stream[:6000])
    write_shard(d / "tr_001.bin", stream[6000:9000])
    write_shard(d / "va_000.bin", stream[9000:])
    return str(d / "tr_*.bin"), str(d / "va_*.bin"), d


def cfg_for(shards, tmp_path, **kw):
    base = dict(init=MODEL, train_data=shards[0], val_data=shards[1], batch_size=4, seq_len=16, steps=6,
                val_every=2, val_batches=3, sample_tokens=0, progress=False, device="cpu", out=str(tmp_path / "run"))
    base.update(kw)
    return TrainConfig(**base)


def events(out):
    return [json.loads(line) for line in open(f"{out}/metrics.jsonl")]


def test_metrics_contract(shards, tmp_path):
    res = run(cfg_for(shards, tmp_path, steps=5))
    ev = events(res.out)
    train = [e for e in ev if "train_loss" in e]
    val = [e for e in ev if "val_loss" in e]
    assert [e["step"] for e in train] == [1, 2, 3, 4, 5]  # steps done: the first step's loss is logged at 1
    assert [e["step"] for e in val] == [0, 2, 4, 5]  # before the 1st, 3rd and 5th steps, and after the last
    for e in train:
        assert {"lr", "grad_norm", "tokens_per_s"} <= e.keys() and math.isfinite(e["train_loss"])
    assert train[-1]["train_loss"] < train[0]["train_loss"]
    assert (res.out / "loss.png").stat().st_size > 1000
    ck = load_checkpoint(res.out / "checkpoint.safetensors")
    assert ck.state["step"] == 5 and ck.adam_m is not None


def test_no_shuffle_is_llmc_order_and_update(shards, tmp_path):
    """--no-shuffle must read batch i at token i*B*T of the shard (next shard when it runs out); the losses
    equal a hand-written loop over exactly those windows with the same AdamW updates."""
    B, T, steps = 4, 16, 5
    res = run(cfg_for(shards, tmp_path, shuffle=False, steps=steps, val_every=0, lr=1e-3, lr_schedule="constant",
                      warmup_steps=0, grad_clip=0.0, weight_decay=0.0, beta2=0.999))
    got = [e["train_loss"] for e in events(res.out) if "train_loss" in e]
    tokens = np.fromfile(shards[2] / "tr_000.bin", dtype=np.uint16, offset=1024).astype(np.int32)
    model = GPT2(config_from_name(MODEL), get_backend("cpu"), B, T)
    model.init_weights(1337)
    opt = AdamW(model, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    want = []
    for i in range(steps):
        w = tokens[i * B * T:i * B * T + B * T + 1]
        model.zero_grad()
        want.append(model.forward(w[:-1].reshape(B, T), w[1:].reshape(B, T), grad_scale=1 / (B * T)))
        model.backward()
        opt.step(1e-3, grad_clip=0.0)
    assert got == want


@pytest.mark.slow
def test_resume_is_bitwise(shards, tmp_path):
    kw = dict(steps=7, grad_accum=2, lr_schedule="cosine", warmup_steps=2, checkpoint_every=0, val_every=3)
    full = run(cfg_for(shards, tmp_path, out=str(tmp_path / "full"), **kw))
    part = run(cfg_for(shards, tmp_path, out=str(tmp_path / "part"), stop_at=4, **kw))
    assert part.steps_done == 4
    resumed = run(TrainConfig(resume=str(tmp_path / "part"), progress=False, explicit=("resume",)))
    assert resumed.steps_done == 7
    a = [(e["step"], e.get("train_loss"), e.get("val_loss")) for e in events(full.out)]
    b = [(e["step"], e.get("train_loss"), e.get("val_loss")) for e in events(resumed.out)]
    assert a == b  # bitwise: float equality of every logged loss
    pa = load_checkpoint(full.out / "checkpoint.safetensors").params
    pb = load_checkpoint(resumed.out / "checkpoint.safetensors").params
    assert all(np.array_equal(pa[k], pb[k]) for k in pa)


def test_lr_schedules():
    kw = dict(lr=1.0, steps=100, warmup=10, final_frac=0.1)
    assert lr_at(0, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_at(9, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_at(10, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_at(55, schedule="cosine", **kw) == pytest.approx(0.55)
    assert lr_at(99, schedule="linear", **kw) == pytest.approx(0.1 + 0.9 / 90)
    assert lr_at(79, schedule="wsd", **kw) == 1.0 and lr_at(90, schedule="wsd", **kw) == pytest.approx(0.55)
    assert lr_at(50, schedule="constant", **kw) == 1.0
    with pytest.raises(UserError):
        lr_at(0, schedule="nope", **kw)


def test_divergence_is_caught_and_keeps_checkpoint(shards, tmp_path):
    out = tmp_path / "div"
    run(cfg_for(shards, tmp_path, out=str(out), steps=2, val_every=0))
    before = (out / "checkpoint.safetensors").read_bytes()
    with pytest.raises(UserError, match="diverged") as e:
        run(TrainConfig(resume=str(out), steps=6, lr=1e38, grad_clip=0.0, extend=True, progress=False,
                        explicit=("resume", "steps", "lr", "grad_clip", "extend")))
    assert f"the last checkpoint, {out / 'checkpoint.safetensors'}, is intact" in str(e.value)
    assert (out / "checkpoint.safetensors").read_bytes() == before


def cli_error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_cli_bad_inputs(shards, tmp_path, capsys):
    common = ["train", "--train-data", shards[0], "--val-data", shards[1], "--init", MODEL, "--device", "cpu",
              "--no-progress", "--sample-tokens", "0", "--seq-len", "16"]
    assert "exceeds the model's maximum" in cli_error(capsys, common + ["--seq-len", "64", "--out",
                                                                       str(tmp_path / "a")])
    assert "no token shards match" in cli_error(capsys, common + ["--train-data", str(tmp_path / "none*.bin")])
    assert "unknown model config" in cli_error(capsys, common + ["--init", "zz9"])
    assert "bf16 needs --device cuda" in cli_error(capsys, common + ["--dtype", "bf16"])
    bad = tmp_path / "bad_000.bin"
    write_shard(bad, np.full(2000, 60000, np.uint16))  # ids >= vocab
    assert "60000" in cli_error(capsys, common + ["--train-data", str(bad), "--out", str(tmp_path / "b"),
                                                 "--steps", "1", "--batch-size", "2", "--seq-len", "8"])
    trunc = tmp_path / "trunc.bin"
    trunc.write_bytes(open(shards[2] / "tr_001.bin", "rb").read()[:3000])
    assert "trunc.bin" in cli_error(capsys, common + ["--train-data", str(trunc)])
    ck = tmp_path / "c.safetensors"
    ck.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    assert "c.safetensors" in cli_error(capsys, common + ["--init", str(ck)])
    assert "lr" in cli_error(capsys, common + ["--lr", "-1"])


def test_cli_refuses_to_overwrite_a_run(shards, tmp_path, capsys):
    out = str(tmp_path / "run")
    argv = ["train", "--train-data", shards[0], "--val-data", shards[1], "--init", MODEL, "--device", "cpu",
            "--steps", "1", "--batch-size", "2", "--seq-len", "8", "--out", out, "--no-progress",
            "--sample-tokens", "0"]
    assert main(argv) == 0
    assert "--resume" in cli_error(capsys, argv)


def test_cli_train_eval_sample_convert(shards, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--train-data", shards[0], "--val-data", shards[1], "--init", MODEL, "--device", "cpu",
                 "--steps", "3", "--batch-size", "2", "--seq-len", "8", "--out", str(out), "--no-progress",
                 "--val-every", "0", "--val-batches", "2", "--sample-tokens", "4"]) == 0
    last_val = events(out)[-1]
    assert last_val["step"] == 3 and "val_loss" in last_val
    capsys.readouterr()
    ck = str(out / "checkpoint.safetensors")
    assert main(["eval", "--checkpoint", ck, "--data", shards[1], "--batch-size", "2", "--seq-len", "8",
                 "--batches", "2"]) == 0
    printed = float(capsys.readouterr().out.split()[2])
    assert printed == pytest.approx(last_val["val_loss"], abs=1e-6)  # printed to 6 decimals
    assert main(["convert", ck, str(tmp_path / "m.bin")]) == 0
    assert main(["eval", "--checkpoint", str(tmp_path / "m.bin"), "--data", shards[1], "--batch-size", "2",
                 "--seq-len", "8", "--batches", "2"]) == 0
    assert float(capsys.readouterr().out.splitlines()[-1].split()[2]) == printed  # llm.c .bin: same fp32 weights
    for _ in range(2):
        assert main(["sample", "--checkpoint", ck, "--prompt", "Hello", "-n", "5", "--seed", "3"]) == 0
    a, b = capsys.readouterr().out.splitlines()[-2:]
    assert a == b and a.startswith("Hello")


def test_grad_accumulation_equals_the_larger_batch():
    """2 and 4 micro-batches of B=2 and B=1 (fed from one reused loader buffer, as the trainer does) = one batch of
    B=4, over two steps (the second step's gradients start from zero again: a first micro-batch's fresh_grads)."""
    from llmpy.train.step import TrainStep
    cfg = config_from_name("l2h2c32t16")
    rng = np.random.default_rng(3)
    w = rng.integers(0, cfg.vocab_size, (4, 17)).astype(np.int32)
    out = []
    for B, A in ((4, 1), (2, 2), (1, 4)):
        model = GPT2(cfg, get_backend("cpu"), B, 16)
        model.init_weights(0)
        p0 = model.params_numpy()
        step = TrainStep(model, AdamW(model, weight_decay=0.1), A, grad_clip=1.0)
        buf = np.empty((B, 17), np.int32)

        def batches():
            for i in range(A):  # one buffer, overwritten per micro-batch
                buf[...] = w[i * B:(i + 1) * B]
                yield buf[:, :-1], buf[:, 1:]
        step.run(batches(), 1e-3)
        loss, norm = step.run(batches(), 1e-3)
        out.append((loss, norm, model.params_numpy()))
    (l1, n1, p1) = out[0]
    for l2, n2, p2 in out[1:]:
        assert abs(l1 - l2) < 1e-6 * l1 and abs(n1 - n2) < 1e-5 * n1
        for k in p1:  # the updates agree (1e-3 of their size: Adam amplifies the key bias's rounding-noise gradient)
            assert np.linalg.norm(p1[k] - p2[k]) <= 1e-3 * np.linalg.norm(p1[k] - p0[k]), k


# ---- logs you can believe ----------------------------------------------------------------------------

def test_tokens_per_s_is_each_steps_own_throughput(shards, tmp_path, monkeypatch):
    """The step's clock is a virtual one that moves only where the test says: 0.1 s inside every step, 0.25 s for
    each evaluation and checkpoint between steps (so the test does not depend on the machine's speed or load).
    The logged tokens/s must not see the pauses: every step logs exactly 0.1 s worth of tokens."""
    import types

    import llmpy.train.step as step_mod
    from llmpy.train.loop import Trainer
    from llmpy.train.step import TrainStep
    clock = [1000.0]
    monkeypatch.setattr(step_mod, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    update = TrainStep._update

    def slow_update(self):  # inside the step
        clock[0] += 0.1
        return update(self)

    def slow(fn):
        def pause(self, *a):
            clock[0] += 0.25
            return fn(self, *a)
        return pause
    monkeypatch.setattr(TrainStep, "_update", slow_update)
    monkeypatch.setattr(Trainer, "evaluate", slow(Trainer.evaluate))
    monkeypatch.setattr(Trainer, "save", slow(Trainer.save))
    cfg = cfg_for(shards, tmp_path, steps=8, val_every=2, checkpoint_every=3)
    res = run(cfg)
    tps = np.array([e["tokens_per_s"] for e in events(res.out) if "train_loss" in e])
    assert len(tps) == 8
    np.testing.assert_allclose(tps, cfg.batch_size * cfg.seq_len / 0.1, rtol=1e-6)


def test_step_lines_and_summary_without_a_terminal(shards, tmp_path, capsys):
    import re
    res = run(cfg_for(shards, tmp_path, steps=4, val_every=2))
    out = capsys.readouterr()
    lines = [ln for ln in out.out.splitlines() if ln.startswith("step ") and "val loss" not in ln]
    pat = r"step (\d+)/4 \| loss \d+\.\d{4} \| norm \d+\.\d{2} \| lr \d\.\de-\d\d \| \d+\.\d ms \| [\d,]+ tok/s"
    assert [int(re.fullmatch(pat, ln).group(1)) for ln in lines] == [1, 2, 3, 4]
    assert "\r" not in out.out + out.err and "MFU" not in out.out  # MFU is for GPUs
    losses = [e["train_loss"] for e in events(res.out) if "train_loss" in e]
    assert [f"loss {x:.4f}" in ln for x, ln in zip(losses, lines)] == [True] * 4  # each line its own step's loss
    summary = next(ln for ln in out.out.splitlines() if ln.startswith("summary: "))
    best = min(res.val_losses, key=lambda sv: sv[1])
    assert "4 steps in" in summary and "tok/s (mean of steps 2..4" in summary
    assert f"best val loss {best[1]:.4f} (step {best[0]})" in summary


def test_the_progress_bar_shows_the_step_it_counts(monkeypatch):
    """The bar's postfix is set before the bar advances, so the frame drawn for step n carries step n's loss."""
    import io

    from llmpy.train.progress import Progress
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    p = Progress(start=0, last=3, steps=3, show=True, lines=False, tokens_per_step=100)
    p.bar.mininterval, p.bar.miniters = 0, 1
    for step, loss in enumerate((5.1111, 4.2222, 3.3333), start=1):
        p.step(step, loss, 1.0, 1e-3, 0.01)
        frame = err.getvalue().split("\r")[-1]
        assert f"{step}/3" in frame and f"loss {loss:.4f}" in frame, frame
    p.close()


def test_mfu_uses_the_models_flops_and_the_gpu_peak(capsys):
    from llmpy.train.progress import PEAK_FLOPS, Progress
    p = Progress(start=0, last=2, steps=2, show=True, lines=True, tokens_per_step=1000, flops_per_token=1e9,
                 world=2)
    p.step(1, 3.0, 1.0, 1e-3, 0.5)
    p.step(2, 3.0, 1.0, 1e-3, 0.001)  # 1e6 tok/s over 2 GPUs: 5e14 flop/s each
    assert f"MFU {5e14 / PEAK_FLOPS:.1%}" in capsys.readouterr().out.splitlines()[-1]
    assert f"MFU {5e14 / PEAK_FLOPS:.1%}" in p.summary(1.0, [])  # the first (warm-up) step is left out


@pytest.mark.slow
def test_stop_at_n_leaves_exactly_n_steps_done(shards, tmp_path, capsys):
    """One numbering, steps done, in the step lines, metrics.jsonl, the checkpoint, its kept copies and the
    messages: --stop-at 3 runs steps 1, 2 and 3; --checkpoint-every 2 checkpoints after step 2."""
    out = tmp_path / "run"
    argv = ["train", "--train-data", shards[0], "--val-data", shards[1], "--init", MODEL, "--device", "cpu",
            "--steps", "6", "--batch-size", "2", "--seq-len", "8", "--out", str(out), "--no-progress",
            "--val-every", "2", "--val-batches", "1", "--sample-tokens", "0", "--checkpoint-every", "2",
            "--keep", "2"]
    assert main(argv + ["--stop-at", "3"]) == 0
    said = capsys.readouterr().out
    assert "training steps 1..3 of 6" in said and "stopped after 3 of 6 steps" in said
    assert [ln.split(" |")[0] for ln in said.splitlines() if " | loss " in ln] == ["step 1/6", "step 2/6", "step 3/6"]
    assert [(e["step"], "val_loss" in e) for e in events(out)] == [(0, True), (1, False), (2, False), (2, True),
                                                                   (3, False)]
    assert load_checkpoint(out / "checkpoint.safetensors").state["step"] == 3
    assert load_checkpoint(out / "checkpoint-000002.safetensors").state["step"] == 2
    assert main(["train", "--resume", str(out), "--stop-at", "5", "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "training steps 4..5 of 6" in said and "stopped after 5 of 6 steps" in said
    assert [e["step"] for e in events(out) if "train_loss" in e] == [1, 2, 3, 4, 5]
    assert load_checkpoint(out / "checkpoint.safetensors").state["step"] == 5
    assert sorted(p.name for p in out.glob("checkpoint*")) == ["checkpoint-000004.safetensors",
                                                              "checkpoint.safetensors"]
