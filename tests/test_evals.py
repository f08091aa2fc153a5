"""Zero-shot multiple-choice evaluation (llmpy/evals): task files in their sources' formats (llm.c's HellaSwag jsonl,
the HF datasets' parquet), fetched from a local server on 127.0.0.1 that behaves like raw.githubusercontent.com and
the Hub; malformed files name their line or row; and the oracle: a small random Hugging Face GPT-2 scored by our
Scorer on the CPU backend and, independently, by PyTorch here (the HF model's logits, one row at a time, unpadded),
each task's prompt and tokenization rules written out again from the raw records."""
from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest

from fake_hub import FakeHub, Handler, serving

from llmpy.backends import get_backend
from llmpy.cli import main
from llmpy.data.tokenizers import get_tokenizer
from llmpy.errors import UserError
from llmpy.evals import TASKS, Example, Scorer, check_tasks, evaluate, load_task
from llmpy.evals import tasks as T

HELLASWAG = [
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
     "source_id": "activitynet~v_-JhWjGDPHMY"},
    {"ind": 92, "activity_label": "Baking cookies", "ctx_a": "A woman pours flour into a bowl.", "ctx_b": "she",
     "ctx": "A woman pours flour into a bowl. she", "split": "val", "split_type": "zeroshot", "label": 0,
     "endings": ["stirs in two eggs and a cup of sugar.", "throws the bowl at the camera.",
                 "paints the kitchen wall green.", "rides a bicycle through the snow."],
     "source_id": "wikihow~12"},
    {"ind": 106, "activity_label": "Playing guitar", "ctx_a": "", "ctx_b": "",
     "ctx": "A boy holds a guitar on his lap and tunes the strings.", "split": "val", "split_type": "indomain",
     "label": 2, "endings": ["He eats a sandwich.", "The dog barks twice at him.",
                             "He strums a chord and starts to sing.", "Then the boat sinks."],
     "source_id": "activitynet~v_x"},
    {"ind": 207, "activity_label": "Washing hands", "ctx_a": "[header] How to wash your hands", "ctx_b": "",
     "ctx": "[header] How to wash your hands [title] Wet your hands with clean water.", "split": "val",
     "split_type": "zeroshot", "label": 1,
     "endings": ["[step] Dry them on the cat.", "[step] Apply soap and lather for twenty seconds.",
                 "[step] Turn off the lights.", "[step] Sing loudly and leave."], "source_id": "wikihow~99"},
]
ARC = [
    {"id": "Mercury_7175875", "question": "An astronomer observes that a planet rotates faster after a meteorite "
     "impact. Which is the most likely effect of this increase in rotation?",
     "choices": {"text": ["Planetary density will decrease.", "Planetary years will become longer.",
                          "Planetary days will become shorter.", "Planetary gravity will become stronger."],
                 "label": ["A", "B", "C", "D"]}, "answerKey": "C"},
    {"id": "NYSEDREGENTS_2015_4_8", "question": "Which object is the best conductor of electricity?",
     "choices": {"text": ["a wax crayon", "a plastic spoon", "an iron nail"], "label": ["1", "2", "3"]},
     "answerKey": "3"},
    {"id": "Mercury_SC_401", "question": "What do plants need to make food?",
     "choices": {"text": ["sunlight", "sand", "salt", "snow", "smoke"], "label": ["A", "B", "C", "D", "E"]},
     "answerKey": "A"},
]
PIQA = [
    {"goal": "How do I ready a guinea pig cage for it's new occupants?",
     "sol1": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips.",
     "sol2": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans material.",
     "label": 0},
    {"goal": "To cool a hot drink quickly,", "sol1": "put it in the oven.", "sol2": "add a few ice cubes.",
     "label": 1},
    {"goal": "Keep bread fresh longer.", "sol1": "Store it in a sealed bag.", "sol2": "Leave it in the rain.",
     "label": 0},
]
WINOGRANDE = [
    {"sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
     "option1": "Sarah", "option2": "Maria", "answer": "1"},
    {"sentence": "The trophy doesn't fit into the brown suitcase because the _ is too large.",
     "option1": "trophy", "option2": "suitcase", "answer": "1"},
    {"sentence": "_ was tired after the race, so James let Robert sleep.", "option1": "James",
     "option2": "Robert", "answer": "2"},
]
OPENBOOKQA = [
    {"id": "7-980", "question_stem": "The sun is responsible for",
     "choices": {"text": ["puppies learning new tricks", "children growing up and getting old",
                          "flowers wilting in a vase", "plants sprouting, blooming and wilting"],
                 "label": ["A", "B", "C", "D"]}, "answerKey": "D"},
    {"id": "8-376", "question_stem": "When food is reduced in the stomach",
     "choices": {"text": ["the mind needs time to digest", "take a second to digest what I said",
                          "nutrients are being deconstructed", "reader's digest is a body of works"],
                 "label": ["A", "B", "C", "D"]}, "answerKey": " C"},
]
RAW = {"hellaswag": HELLASWAG, "arc_easy": ARC, "arc_challenge": ARC[::-1], "piqa": PIQA,
       "winogrande": WINOGRANDE, "openbookqa": OPENBOOKQA}


def file_bytes(task: str) -> bytes:
    """The records as the task's source publishes them: jsonl for HellaSwag, parquet (pyarrow) for the HF ones."""
    if task == "hellaswag":
        return "".join(json.dumps(r) + "\n" for r in RAW[task]).encode()
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(RAW[task]), buf)
    return buf.getvalue()


def blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


# ---- a local server: raw GitHub files at /<repo>/<commit>/<path>, Hub datasets behind an LFS-style redirect ------
class EvalsHandler(Handler):
    """Raw files at /<repo>/<commit>/<path>, Hub dataset files (datasets/...) behind the LFS-style redirect; Range
    and cuts on every body."""

    def _serve(self, body):
        srv, path = self.server, self.path.lstrip("/")
        srv.log.append((self.command, path, self.headers.get("Range")))
        if path.startswith("cdn/"):
            data = {hashlib.sha256(b).hexdigest(): b for b in srv.files.values()}.get(path[4:])
            return self._send(data, body, ranged=True)
        data = srv.files.get(path)
        if data is None or not path.startswith("datasets/"):
            return self._send(data, body, ranged=True)
        self._redirect(data)


def url_path(task: str) -> str:
    src = TASKS[task].source
    if isinstance(src, T.HFFile):
        return f"datasets/{src.repo}/resolve/{src.revision}/{src.path}"
    return f"{src.repo}/{src.commit}/{src.path}"


@pytest.fixture
def server(tmp_path, monkeypatch):
    with serving(FakeHub(EvalsHandler), tmp_path, monkeypatch) as s:
        for name in TASKS:
            s.files[url_path(name)] = file_bytes(name)
        hs = TASKS["hellaswag"]  # our fixture stands in for the real file: its git blob id is the one to check
        monkeypatch.setitem(T.TASKS, "hellaswag", dataclasses.replace(
            hs, source=dataclasses.replace(hs.source, blob=blob_id(file_bytes("hellaswag")))))
        monkeypatch.setenv("LLMPY_EVALS_URL", s.url)
        yield s


# ---- download and parse ---------------------------------------------------------------------------------------
def test_every_task_downloads_once_and_parses_as_its_source_says(server, tmp_path, monkeypatch):
    got = {name: load_task(name, progress=False) for name in TASKS}
    assert got["hellaswag"][0] == Example("A man is sitting on a roof. he", tuple(HELLASWAG[0]["endings"]), 3)
    assert got["arc_easy"][1] == Example("Question: Which object is the best conductor of electricity?\nAnswer:",
                                         ("a wax crayon", "a plastic spoon", "an iron nail"), 2)
    assert [len(e.endings) for e in got["arc_challenge"]] == [5, 3, 4]
    assert got["piqa"][1] == Example("Question: To cool a hot drink quickly,\nAnswer:",
                                     ("put it in the oven.", "add a few ice cubes."), 1)
    assert got["winogrande"][0] == Example("Sarah was a much better surgeon than Maria so ", ("Sarah", "Maria"), 0,
                                           suffix="always got the harder cases.")
    assert got["winogrande"][2].pairs() == [("James", " was tired after the race, so James let Robert sleep."),
                                            ("Robert", " was tired after the race, so James let Robert sleep.")]
    assert got["openbookqa"][1].label == 2 and got["openbookqa"][1].ctx == "When food is reduced in the stomach"
    for name in TASKS:
        assert (tmp_path / "cache" / "evals" / name).is_dir()
    assert any(p.startswith("datasets/allenai/ai2_arc/resolve/210d026") for _, p, _ in server.log)
    n = len(server.log)
    monkeypatch.setenv("LLMPY_OFFLINE", "1")  # from the cache now, without asking the server
    assert [load_task(name, progress=False) for name in TASKS] == list(got.values())
    assert len(server.log) == n


def test_offline_without_the_file_and_unknown_tasks_are_one_line_errors(server, monkeypatch):
    monkeypatch.setenv("LLMPY_OFFLINE", "1")
    with pytest.raises(UserError, match="not in the cache"):
        load_task("piqa")
    with pytest.raises(UserError) as e:
        check_tasks("hellaswag,mmlu")
    assert "mmlu" in str(e.value) and all(n in str(e.value) for n in TASKS)
    assert check_tasks(" piqa, hellaswag,piqa") == ["piqa", "hellaswag"]


def test_a_cut_download_resumes_and_a_wrong_file_is_refused(server, tmp_path):
    server.cuts = [100]
    assert len(load_task("hellaswag", progress=False)) == 4
    assert any(m == "GET" and r == "bytes=100-" for m, _, r in server.log)
    tampered = file_bytes("hellaswag").replace(b"roof", b"hoof")
    server.files[url_path("hellaswag")] = tampered
    for f in (tmp_path / "cache" / "evals" / "hellaswag").iterdir():
        f.unlink()
    with pytest.raises(UserError, match="git blob id"):
        load_task("hellaswag", progress=False)
    assert not (tmp_path / "cache" / "evals" / "hellaswag" / "hellaswag_val.jsonl").exists()


@pytest.mark.parametrize("line3, why", [
    ('{"ctx": "x", "endings": ["a", "b"], "label": 1', "not JSON"),
    ('{"endings": ["a", "b"], "label": 1}', "'ctx'"),
    ('{"ctx": "x", "endings": ["a", "b"], "label": 2}', "'label'"),
    ('{"ctx": "x", "endings": "ab", "label": 0}', "'endings'"),
])
def test_a_malformed_jsonl_line_is_named(tmp_path, line3, why):
    f = tmp_path / "hellaswag_val.jsonl"
    good = json.dumps(HELLASWAG[0])
    f.write_text(f"{good}\n{good}\n{line3}\n{good}\n")
    with pytest.raises(UserError) as e:
        TASKS["hellaswag"].parse(f)
    msg = str(e.value)
    assert msg.startswith(f"{f}, line 3: ") and why in msg and "\n" not in msg


@pytest.mark.parametrize("task, row2, why", [
    ("winogrande", {"sentence": "A _ b.", "option1": "x", "option2": "y", "answer": "3"}, "'answer'"),
    ("winogrande", {"sentence": "No blank.", "option1": "x", "option2": "y", "answer": "1"}, "blank"),
    ("arc_easy", {**ARC[0], "answerKey": "E"}, "answerKey 'E'"),
    ("piqa", {"goal": "g", "sol1": "a", "sol2": None, "label": 0}, "'sol2'"),
    ("openbookqa", {**OPENBOOKQA[0], "choices": {"text": ["a", "b"], "label": ["A"]}}, "choices.label"),
])
def test_a_malformed_parquet_row_is_named(tmp_path, task, row2, why):
    import pyarrow as pa
    import pyarrow.parquet as pq
    f = tmp_path / "t.parquet"
    rows = [RAW[task][0], row2, RAW[task][-1]]
    pq.write_table(pa.Table.from_pylist(rows), f)
    with pytest.raises(UserError) as e:
        TASKS[task].parse(f)
    assert str(e.value).startswith(f"{f}, row 2: ") and why in str(e.value)
    f.write_bytes(b"PAR1 not really")
    with pytest.raises(UserError, match="not a parquet file"):
        TASKS[task].parse(f)


# ---- the oracle: PyTorch scores a small HF GPT-2 independently ---------------------------------------------------
@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    # large init: the choices' losses differ by nats, not by rounding, so the argmins are stable
    cfg = GPT2Config(vocab_size=50257, n_positions=128, n_embd=32, n_layer=2, n_head=2, initializer_range=0.3)
    models, folders = [], []
    for i in range(2):
        m = GPT2LMHeadModel(cfg).eval()
        d = tmp_path_factory.mktemp(f"hf_gpt2_{i}")
        m.save_pretrained(d, safe_serialization=True)
        models.append(m)
        folders.append(d)
    return models, folders


def oracle_rows(task: str, rec: dict, enc) -> tuple[list[tuple[list[int], list[int]]], int, list[float]]:
    """((context tokens, continuation tokens) per choice, label, acc_norm divisors), from the raw record, by the
    sources' rules: llm.c's hellaswag.py, the harness's yaml + _encode_pair (GPT-2: no BOS)."""
    if task == "hellaswag":
        c = enc(rec["ctx"])
        conts = [enc(" " + e) for e in rec["endings"]]
        return [(c, x) for x in conts], rec["label"], [len(x) for x in conts]

    def pair(context, choice):
        whole, c = enc(context + " " + choice), enc(context)
        return c, whole[len(c):]
    if task in ("arc_easy", "arc_challenge", "openbookqa"):
        q = rec["question_stem"] if task == "openbookqa" else f"Question: {rec['question']}\nAnswer:"
        texts = rec["choices"]["text"]
        label = rec["choices"]["label"].index(rec["answerKey"].strip())
        return [pair(q, t) for t in texts], label, [len(t) for t in texts]
    if task == "piqa":
        q = f"Question: {rec['goal']}\nAnswer:"
        return [pair(q, rec["sol1"]), pair(q, rec["sol2"])], rec["label"], [len(rec["sol1"]), len(rec["sol2"])]
    s = rec["sentence"]
    i = s.index("_")
    prefixes = [s[:i] + rec["option1"], s[:i] + rec["option2"]]
    return [pair(p, s[i + 1:].strip()) for p in prefixes], int(rec["answer"]) - 1, [len(p) for p in prefixes]


def oracle_losses(model, rows, T=None) -> np.ndarray:
    """-log p(continuation | context) per row, one unpadded row at a time (the last T+1 tokens when T is given)."""
    import torch
    out = []
    with torch.no_grad():
        for c, x in rows:
            ids = (c + x)[-(T + 1):] if T else c + x
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
            k = min(len(x), len(ids) - 1)
            tgt = torch.tensor(ids[-k:])
            out.append(-logp[len(ids) - 1 - k:len(ids) - 1].gather(1, tgt[:, None]).sum().item())
    return np.array(out)


def oracle_score(model, task, records, enc, T=None):
    sums, accs, norms = [], [0, 0], []
    for rec in records:
        rows, label, norm = oracle_rows(task, rec, enc)
        s = oracle_losses(model, rows, T)
        sums.append(s)
        norms.append(np.array(norm, float))
        accs[0] += int(np.argmin(s)) == label
        accs[1] += int(np.argmin(s / norms[-1])) == label
    return sums, accs[0] / len(records), accs[1] / len(records)


@pytest.mark.slow
def test_our_scores_match_pytorch_on_every_task(hf_gpt2, server):
    from llmpy.formats.checkpoint import load_weights
    models, folders = hf_gpt2
    cfg, params = load_weights(folders[0])
    enc = get_tokenizer("gpt2").encode
    scorer = Scorer(cfg, params, get_backend("cpu"), "gpt2")
    for name in TASKS:
        examples = load_task(name, progress=False)
        want, acc, acc_norm = oracle_score(models[0], name, RAW[name], enc)
        got = scorer.choice_losses(name, examples)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-4)
            assert np.sort(w)[1] - np.sort(w)[0] > 1e-2  # no near-tie: the argmin comparison below means something
        res = scorer.score(name, examples)
        assert res == {"acc": acc, "acc_norm": acc_norm, "n": len(RAW[name]), "metric": TASKS[name].headline}, name
        # the score follows the labels: every label set to the oracle's choice gives 1, one off it gives 0
        best = [Example(e.ctx, e.endings, int(np.argmin(w)), e.suffix) for e, w in zip(examples, want)]
        wrong = [dataclasses.replace(e, label=(e.label + 1) % len(e.endings)) for e in best]
        assert scorer.score(name, best)["acc"] == 1.0 and scorer.score(name, wrong)["acc"] == 0.0
    # new weights through load_params: the other model's scores
    _, params2 = load_weights(folders[1])
    scorer.load_params(params2)
    want, acc, acc_norm = oracle_score(models[1], "hellaswag", HELLASWAG, enc)
    examples = load_task("hellaswag", progress=False)
    np.testing.assert_allclose(np.concatenate(scorer.choice_losses("hellaswag", examples)), np.concatenate(want),
                               rtol=1e-4)
    assert scorer.score("hellaswag", examples, limit=2)["n"] == 2


def test_acc_norm_divides_per_token_for_hellaswag_and_per_character_for_the_harness(hf_gpt2):
    """Endings whose characters-per-token differ a lot, so the two normalizations pick different winners; the labels
    are each rule's winners, so only the right rule scores acc_norm = 1."""
    from llmpy.formats.checkpoint import load_weights
    models, folders = hf_gpt2
    cfg, params = load_weights(folders[0])
    enc = get_tokenizer("gpt2").encode
    endings = ["x y z w v u t", "internationalization", "1 2 3", "photosynthesis is"]
    ctxs = [f"Item {i}: the answer is" for i in range(6)]
    scorer = Scorer(cfg, params, get_backend("cpu"), "gpt2")
    for task in ("hellaswag", "arc_easy"):
        per_tok, per_char = [], []
        for c in ctxs:
            if task == "hellaswag":
                rows = [(enc(c), enc(" " + e)) for e in endings]
            else:
                rows = [(enc(c), enc(c + " " + e)[len(enc(c)):]) for e in endings]
            s = oracle_losses(models[0], rows)
            per_tok.append(int(np.argmin(s / [len(x) for _, x in rows])))
            per_char.append(int(np.argmin(s / [len(e) for e in endings])))
        assert per_tok != per_char  # the fixture tells the rules apart
        labels = per_tok if task == "hellaswag" else per_char
        examples = [Example(c, tuple(endings), k) for c, k in zip(ctxs, labels)]
        assert scorer.score(task, examples)["acc_norm"] == 1.0, task


def test_rows_longer_than_T_lose_the_start_of_their_context(hf_gpt2, server):
    from llmpy.formats.checkpoint import load_weights
    models, folders = hf_gpt2
    cfg, params = load_weights(folders[0])
    enc = get_tokenizer("gpt2").encode
    scorer = Scorer(cfg, params, get_backend("cpu"), None, T=16)
    with pytest.warns(UserWarning, match="longer than 17 tokens"):
        got = scorer.choice_losses("arc_easy", load_task("arc_easy", progress=False))
    want = oracle_score(models[0], "arc_easy", ARC, enc, T=16)[0]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4)
    with pytest.raises(UserError, match="1..128"):
        Scorer(cfg, params, get_backend("cpu"), None, T=129)


def test_evaluate_and_the_command_line(hf_gpt2, server, capsys):
    from llmpy.formats.checkpoint import load_weights
    models, folders = hf_gpt2
    cfg, params = load_weights(folders[0])
    res = evaluate(cfg, params, get_backend("cpu"), None, ["winogrande", "piqa"], limit=2, progress=False)
    assert list(res) == ["winogrande", "piqa"] and res["piqa"]["n"] == 2 and res["winogrande"]["metric"] == "acc"
    # a rank's empty share of the examples: n = 0 and finite accuracies, so n-weighted sums over ranks stay finite
    assert Scorer(cfg, params, get_backend("cpu"), None).score("piqa", []) == {"acc": 0.0, "acc_norm": 0.0, "n": 0,
                                                                              "metric": "acc_norm"}

    argv = ["eval", "--checkpoint", str(folders[0]), "--device", "cpu", "--tasks", "hellaswag", "--limit", "3"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["task", "metric", "acc", "acc_norm", "n"]
    name, metric, acc, acc_norm, n = lines[1].split()
    want = oracle_score(models[0], "hellaswag", HELLASWAG[:3], get_tokenizer("gpt2").encode)
    assert (name, metric, n) == ("hellaswag", "acc_norm", "3")
    assert (float(acc), float(acc_norm)) == pytest.approx(want[1:], abs=1e-4)

    for more, why in ((["--tasks", "hellaswag,lambada"], "unknown task lambada: choose from hellaswag, arc_easy"),
                      (["--tasks", "piqa", "--limit", "0"], "--limit must be >= 1"),
                      (["--tasks", "piqa", "--data", "x"], "--data"),
                      (["--limit", "3"], "--limit goes with --tasks")):
        assert main(["eval", "--checkpoint", str(folders[0]), "--device", "cpu", *more]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and why in err and "\n" not in err, err


def test_a_task_file_of_ones_own_scores_as_hellaswag(hf_gpt2, server, tmp_path, capsys):
    """A .jsonl path as the task: HellaSwag's format and rule, read where it is (no cache, no server)."""
    from llmpy.formats.checkpoint import load_weights
    models, folders = hf_gpt2
    mine = tmp_path / "my task.jsonl"
    mine.write_bytes(file_bytes("hellaswag"))
    n = len(server.log)
    assert check_tasks(f"piqa,{mine}") == ["piqa", str(mine)]
    assert load_task(str(mine), progress=False) == load_task("hellaswag", progress=False)
    assert len(server.log) == n + 2  # the built-in task's download only (HEAD + GET)
    cfg, params = load_weights(folders[0])
    scorer = Scorer(cfg, params, get_backend("cpu"), "gpt2")
    ex = load_task("hellaswag", progress=False)
    assert scorer.score(str(mine), ex) == scorer.score("hellaswag", ex)
    want = oracle_score(models[0], "hellaswag", HELLASWAG, get_tokenizer("gpt2").encode)
    assert main(["eval", "--checkpoint", str(folders[0]), "--device", "cpu", "--tasks", str(mine)]) == 0
    row = capsys.readouterr().out.strip().splitlines()[1]
    assert row.startswith(str(mine)) and row.split()[-4:] == ["acc_norm", f"{want[1]:.4f}", f"{want[2]:.4f}", "4"]
    for bad, why in ((tmp_path / "nope.jsonl", "does not exist"), (tmp_path / "x.txt", "unknown task")):
        with pytest.raises(UserError, match=why):
            check_tasks(str(bad))
    mine.write_text('{"ctx": "x", "endings": ["a", "b"], "label": 3}\n')
    with pytest.raises(UserError, match=r"line 1: .*'label'"):
        load_task(str(mine))


# ---- the GPU against the CPU, every family ---------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("name, tol", [("gpt2:l2h2c64t128", (1e-5, 2e-3)), ("llama3:l2d64h2k1f192t128", (1e-5, 2e-3)),
                                       ("mmfree:l2d64i128v50257t128", (1e-3, 1e-2))])
def test_cuda_scores_match_the_cpu_for_every_family(name, tol, tmp_path):
    """The same weights scored on both backends (fp32 and bf16 on the GPU): the summed losses of every choice of
    every task agree (the MatMul-free model's quantizers may round a tie the other way: a looser bound). Seen on
    an H200 (2026-11-29): fp32 <= 1.8e-7 for all three; bf16 <= 1.7e-4 (GPT-2, Llama 3), 1.2e-3 (MatMul-free)."""
    from llmpy.config import config_from_name, family_of
    from llmpy.models.params import init_params
    cfg = config_from_name(name)
    params = init_params(family_of(cfg).spec(cfg), 0)
    examples = {}
    for task in TASKS:
        f = tmp_path / f"{task}.data"
        f.write_bytes(file_bytes(task))
        examples[task] = TASKS[task].parse(f)
    cpu = Scorer(cfg, params, get_backend("cpu"), "gpt2")
    want = {t: np.concatenate(cpu.choice_losses(t, e)) for t, e in examples.items()}
    for dtype, bound in zip(("fp32", "bf16"), tol):
        gpu = Scorer(cfg, params, get_backend("cuda", dtype), "gpt2")
        for task, ex in examples.items():
            got = np.concatenate(gpu.choice_losses(task, ex))
            err = float(np.max(np.abs(got - want[task]) / np.abs(want[task])))
            print(f"{name} {dtype} {task}: max relative error {err:.2e}")
            assert err < bound, (name, dtype, task, err)
            assert gpu.score(task, ex)["n"] == len(ex)


@pytest.mark.gpu
def test_cuda_training_scores_what_eval_of_its_checkpoint_scores(tmp_path, monkeypatch):
    """The scorer a CUDA training run keeps (its own backend, weights reloaded at every eval) and a fresh scorer on
    the final checkpoint give bitwise the same choice losses, so `llmpy eval` repeats the last logged accuracy."""
    import json

    from llmpy.data.shards import write_shard
    from llmpy.evals import scoring
    from llmpy.formats.checkpoint import load_weights
    from llmpy.train import TrainConfig, run
    seen = []
    real = scoring.Scorer._score

    def spy(self, task, examples):
        out = real(self, task, examples)
        seen.append(np.concatenate(out[0]))
        return out
    monkeypatch.setattr(scoring.Scorer, "_score", spy)
    f = tmp_path / "task.jsonl"
    rows = [dict(HELLASWAG[i % 4], ctx=f"{i}: " + HELLASWAG[i % 4]["ctx"]) for i in range(40)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_shard(tmp_path / "tr_000.bin", np.random.default_rng(0).integers(0, 50257, 40000))
    out = tmp_path / "run"
    res = run(TrainConfig(init="l2h2c64t128", train_data=str(tmp_path / "tr_*.bin"), batch_size=4, seq_len=64,
                          steps=4, lr=3e-3, warmup_steps=1, val_every=0, sample_tokens=0, progress=False,
                          device="cuda", dtype="bf16", eval_tasks=str(f), eval_every=2, out=str(out)))
    assert [e[0] for e in res.evals] == [0, 2, 4] and len(seen) == 3
    assert not np.array_equal(seen[0], seen[-1])  # the weights did change between the evals
    cfg, params = load_weights(out / "checkpoint.safetensors")
    monkeypatch.setattr(scoring.Scorer, "_score", real)
    fresh = scoring.Scorer(cfg, params, get_backend("cuda", "bf16"), "gpt2")
    got = np.concatenate(fresh.choice_losses(str(f), load_task(str(f))))
    np.testing.assert_array_equal(got, seen[-1])
    r = fresh.score(str(f), load_task(str(f)))
    assert (r["acc"], r["acc_norm"]) == res.evals[-1][2:]


# ---- during training (train/loop.py) ---------------------------------------------------------------------------
@pytest.mark.slow
def test_training_logs_task_accuracy_that_eval_reproduces(server, tmp_path, capsys):
    """--eval-tasks/--eval-every: accuracy before steps 0, 2 and after the last in metrics.jsonl (and the progress
    lines, and the plot's second panel); the last one is the saved checkpoint's, as `llmpy eval --tasks` scores it."""
    import json

    from llmpy.cli import main
    from llmpy.data.shards import write_shard
    r = np.random.default_rng(0)
    write_shard(tmp_path / "tr_000.bin", r.integers(0, 50257, 20000))
    out = tmp_path / "run"
    assert main(["train", "--init", "l2h2c32t128", "--train-data", str(tmp_path / "tr_*.bin"), "--batch-size", "2",
                 "--seq-len", "32", "--steps", "3", "--eval-tasks", "hellaswag,piqa", "--eval-every", "2",
                 "--sample-tokens", "0", "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    ev = [json.loads(line) for line in open(out / "metrics.jsonl")]
    got = {(e["step"], e["eval_task"]): e for e in ev if "eval_task" in e}
    assert sorted(got) == [(s, t) for s in (0, 2, 3) for t in ("hellaswag", "piqa")]
    assert all(0 <= e["acc"] <= 1 and 0 <= e["acc_norm"] <= 1 and e["n"] > 0 for e in got.values())
    assert "step 3: hellaswag acc" in printed.out + printed.err
    assert (out / "loss.png").stat().st_size > 0
    assert main(["eval", "--checkpoint", str(out), "--tasks", "hellaswag,piqa"]) == 0
    table = capsys.readouterr().out
    for task in ("hellaswag", "piqa"):
        row = next(line for line in table.splitlines() if task in line)
        assert f"{got[(3, task)]['acc']:.4f}" in row and f"{got[(3, task)]['acc_norm']:.4f}" in row, (row, got)


@pytest.mark.slow
def test_training_evals_are_shared_out_over_data_parallel_ranks(server, tmp_path):
    """Each rank scores every world-th example and the counts are summed: two thread ranks log what one process
    accumulating two micro-batches logs (the same examples in all, the same weights up to fp32 rounding)."""
    import json

    from fakes import FakeComm
    from test_data_parallel import ThreadDist, on_threads

    from llmpy.data.shards import write_shard
    from llmpy.train import TrainConfig, run
    r = np.random.default_rng(1)
    write_shard(tmp_path / "tr_000.bin", r.integers(0, 50257, 12000))

    def config(out, **kw):
        return TrainConfig(init="l2h2c32t128", train_data=str(tmp_path / "tr_*.bin"), batch_size=2, seq_len=16,
                           steps=4, lr=3e-3, warmup_steps=1, val_every=0, sample_tokens=0, checkpoint_every=0,
                           shuffle=False, progress=False, device="cpu", eval_tasks="hellaswag,piqa", eval_every=2,
                           out=str(out), **kw)

    def evals(out):
        return {(e["step"], e["eval_task"]): e for e in map(json.loads, open(out / "metrics.jsonl")) if "eval_task" in e}
    run(config(tmp_path / "one", grad_accum=2))
    comms = FakeComm.group(2, timeout=60)
    on_threads(2, lambda k: run(config(tmp_path / "dp"), dist=ThreadDist(comms[k])))
    one, dp = evals(tmp_path / "one"), evals(tmp_path / "dp")
    assert sorted(one) == sorted(dp) == [(s, t) for s in (0, 2, 4) for t in ("hellaswag", "piqa")]
    for key, e in one.items():
        assert dp[key]["n"] == e["n"] == len(load_task(key[1]))
        assert dp[key]["acc"] == pytest.approx(e["acc"]) and dp[key]["acc_norm"] == pytest.approx(e["acc_norm"])
