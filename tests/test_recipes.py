"""`llmpy train --recipe`: llm.c's published GPT-2 settings (train/recipes.py), printed, overridable flag by flag,
and a one-line error naming the prepare command when the data is missing."""
import json

import numpy as np

from llmpy.cli import main
from llmpy.data.shards import write_shard
from llmpy.train.recipes import RECIPES, recipe_settings


def test_the_recipes_are_llmcs_published_runs():
    r, prepare = recipe_settings("gpt2-124m")
    assert (r["init"], r["batch_size"], r["seq_len"], r["total_batch_size"], r["lr"], r["final_lr_frac"],
            r["warmup_steps"], r["weight_decay"], r["steps"], r["val_every"], r["checkpoint_every"],
            r["eval_tasks"]) == ("d12", 64, 1024, 524288, 6e-4, 0.0, 700, 0.1, 18865, 250, 5000, "hellaswag")
    assert prepare == "llmpy prepare fineweb --sample 10BT"
    big, prepare = recipe_settings("gpt2-1.5b")
    assert (big["init"], big["total_batch_size"], big["final_lr_frac"], big["steps"]) == ("d48", 1048576, 0.1, 32000)
    assert "fineweb-edu" in prepare
    # tokens per run: steps x total batch (llm.c: ~10B for 124M, 31.5B for 350M, 150B for 774M, 33.6B for 1.5B)
    tokens = {n: recipe_settings(n)[0]["steps"] * recipe_settings(n)[0]["total_batch_size"] for n in RECIPES}
    assert round(tokens["gpt2-124m"] / 1e9, 1) == 9.9 and round(tokens["gpt2-774m"] / 1e9) == 150


def test_a_recipe_without_its_data_names_the_prepare_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLMPY_CACHE", str(tmp_path / "cache"))
    assert main(["train", "--recipe", "gpt2-124m", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "llmpy prepare fineweb --sample 10BT" in err and "fineweb10B" in err and "\n" not in err
    assert not (tmp_path / "run").exists()
    assert main(["train", "--recipe", "gpt2-124m", "--resume", str(tmp_path / "run")]) == 2
    assert "drop --recipe" in capsys.readouterr().err


def test_flags_override_the_recipe(tmp_path, capsys):
    r = np.random.default_rng(0)
    write_shard(tmp_path / "tr_000.bin", r.integers(0, 50257, 20000))
    write_shard(tmp_path / "va_000.bin", r.integers(0, 50257, 4000))
    out = tmp_path / "run"
    assert main(["train", "--recipe", "gpt2-124m", "--init", "l2h2c32t32", "--train-data", str(tmp_path / "tr_*.bin"),
                 "--val-data", str(tmp_path / "va_*.bin"), "--batch-size", "2", "--seq-len", "16",
                 "--total-batch-size", "64", "--steps", "3", "--eval-tasks", "none", "--sample-every", "0",
                 "--sample-tokens", "0", "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "recipe gpt2-124m:" in printed and "--init l2h2c32t32 (overridden)" in printed
    saved = json.loads((out / "config.json").read_text())
    train = saved.get("train", saved)
    assert (train["lr"], train["warmup_steps"], train["final_lr_frac"], train["zero"], train["steps"],
            train["grad_accum"] if "grad_accum" in train else 2) == (6e-4, 700, 0.0, 1, 3, 2)
