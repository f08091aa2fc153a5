"""The zero-shot multiple-choice tasks: where each file comes from, and its rows as `Example`s.

| task          | source (downloaded once into `cache_dir()/evals/<task>/`)               | split      | headline |
|---------------|--------------------------------------------------------------------------|------------|----------|
| hellaswag     | GitHub rowanz/hellaswag `data/hellaswag_val.jsonl` (llm.c's file)        | val, 10042 | acc_norm |
| arc_easy      | HF dataset allenai/ai2_arc `ARC-Easy/test-00000-of-00001.parquet`        | test, 2376 | acc_norm |
| arc_challenge | HF dataset allenai/ai2_arc `ARC-Challenge/test-00000-of-00001.parquet`   | test, 1172 | acc_norm |
| piqa          | HF dataset baber/piqa `piqa_validation.parquet`                          | val, 1838  | acc_norm |
| winogrande    | HF dataset allenai/winogrande `winogrande_xl/validation-00000-of-00001.parquet` | val, 1267 | acc |
| openbookqa    | HF dataset allenai/openbookqa `main/test-00000-of-00001.parquet`         | test, 500  | acc_norm |

HellaSwag is scored as llm.c's dev/data/hellaswag.py and build-nanogpt's hellaswag.py score it: the raw `ctx`, each
ending encoded on its own as " " + ending; acc = the lowest summed loss of the ending's tokens, acc_norm = the lowest
mean (the sum over the number of ending tokens). The other five follow the EleutherAI lm-evaluation-harness task
files (lm_eval/tasks/{arc,piqa,winogrande,openbookqa}/*.yaml, read at its commit 4e7e0d4 of 2026-08): the prompt
`doc_to_text`, the choices `doc_to_choice`, the answer `doc_to_target`, the target delimiter " "; acc_norm divides
the summed loss by the choice's length in characters (`len(choice)`, the harness's `acc_norm`). WinoGrande is the
harness's partial scoring: each option fills the blank of the sentence's first part, and what is scored is the
same rest of the sentence after each; the harness lists only acc for it (our acc_norm divides by the option-filled
prefix's length, as the harness's formula would). The headline metric is the one llm.c reports for HellaSwag
(acc_norm), acc_norm for ARC, PIQA and OpenBookQA (as the Open LLM Leaderboard and most papers report them), acc for
WinoGrande; both are always computed.

Sources and their pinning. HellaSwag: llm.c downloads
https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl; we read the same file at the
repository's last commit a29ff8e (2020-05-28, its master) and check it against the git blob id that commit records
(0f5ee25d...: the sha1 of "blob <size>\\0" + the bytes). The HF datasets are the ones the harness loads
(`dataset_path`/`dataset_name`/split of each yaml; piqa moved from ybisk/piqa, a loading script, to the parquet
mirror baber/piqa). Their parquet paths and the revisions pinned below were not listed from the Hub here (no
network where this was written): they are the revisions and paths that several independent public projects pin
for these datasets (ARC 210d026, WinoGrande 01e7417, OpenBookQA 388097e, baber/piqa 142f6d7) and should be checked
against `https://huggingface.co/api/datasets/<repo>/tree/<revision>` once. The Hub's own sha256 (X-Linked-Etag) and
size are checked on download (formats/hub.py).

Environment: `LLMPY_EVALS_URL` replaces https://raw.githubusercontent.com (a mirror, or a test server);
`LLMPY_HF_ENDPOINT` the Hub; `LLMPY_OFFLINE=1` uses the cache only.

Parquet files are read with pyarrow (imported only for those tasks: `pip install pyarrow`).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..formats import hub
from ..formats.atomic import fsync_dir
from ..paths import cache_dir, check_file, file_problem, open_input, reason

GITHUB_RAW = "https://raw.githubusercontent.com"


@dataclass(frozen=True)
class Example:
    """One question. Choice i is scored as the continuation " " + endings[i] after `ctx`; with a `suffix`
    (WinoGrande's partial scoring) it is the continuation " " + suffix after ctx + endings[i] instead."""
    ctx: str
    endings: tuple[str, ...]
    label: int
    suffix: str | None = None

    def pairs(self) -> list[tuple[str, str]]:
        """(context, continuation) per choice: the continuation's tokens are the ones scored."""
        if self.suffix is None:
            return [(self.ctx, " " + e) for e in self.endings]
        return [(self.ctx + e, " " + self.suffix) for e in self.endings]

    def choice_texts(self) -> list[str]:
        """What the harness calls the choices (its doc_to_choice); acc_norm divides by their lengths."""
        return list(self.endings) if self.suffix is None else [self.ctx + e for e in self.endings]


@dataclass(frozen=True)
class GitHubFile:
    repo: str
    commit: str
    path: str
    blob: str  # the git blob id (sha1 of "blob <size>\0" + bytes) that the commit records

    @staticmethod
    def server() -> str:
        return (os.environ.get("LLMPY_EVALS_URL") or GITHUB_RAW).rstrip("/")

    def url(self) -> str:
        return f"{self.server()}/{self.repo}/{self.commit}/{self.path}"


@dataclass(frozen=True)
class HFFile:
    repo: str      # a dataset repository
    revision: str
    path: str


@dataclass(frozen=True)
class LocalFile:
    path: str      # a task file of the user's (HellaSwag's jsonl format), read where it is


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    source: GitHubFile | HFFile | LocalFile
    split: str
    parse: Callable[[Path], list[Example]]
    rule: str      # "llmc": ending tokens encoded alone, acc_norm per token; "harness": see the module docstring
    headline: str  # "acc_norm" or "acc"


# ---- parsing: a malformed record is a one-line error naming the file and its line (jsonl) or row (parquet) ------
class _Bad(Exception):
    pass


def _str(rec: dict, key: str) -> str:
    v = rec.get(key)
    if not isinstance(v, str):
        raise _Bad(f"{key!r} is missing or not a string")
    return v


def _strs(v, what: str) -> tuple[str, ...]:
    if not isinstance(v, (list, tuple)) or len(v) < 2 or not all(isinstance(s, str) for s in v):
        raise _Bad(f"{what} must be a list of at least 2 strings")
    return tuple(v)


def _label(v, n: int, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < n:
        raise _Bad(f"{what} must be an integer in 0..{n - 1} (got {v!r})")
    return v


def _records_jsonl(path: Path, one: Callable[[dict], Example]) -> list[Example]:
    out = []
    try:
        with io.TextIOWrapper(open_input(path, "task file"), encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    if not isinstance(rec, dict):
                        raise _Bad("not a JSON object")
                    out.append(one(rec))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}, line {n}: not JSON ({e.msg} at column {e.colno})") from None
                except RecursionError:
                    raise UserError(f"{path}, line {n}: not a task record (JSON nested too deeply)") from None
                except _Bad as e:
                    raise UserError(f"{path}, line {n}: {e}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise UserError(f"cannot read the task file {path}: {reason(e)}") from None
    return out


def _records_parquet(path: Path, one: Callable[[dict], Example]) -> list[Example]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading {path.name} needs the pyarrow package: pip install pyarrow") from None
    check_file(path, "task file")
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # noqa: BLE001 -- pyarrow raises its own types for a file that is not parquet
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: not a parquet file pyarrow reads ({first})") from None
    out = []
    for n, rec in enumerate(rows, 1):
        try:
            out.append(one(rec))
        except _Bad as e:
            raise UserError(f"{path}, row {n}: {e}") from None
    return out


def _hellaswag(rec: dict) -> Example:
    endings = _strs(rec.get("endings"), "'endings'")
    return Example(_str(rec, "ctx"), endings, _label(rec.get("label"), len(endings), "'label'"))


def _choices(rec: dict, answer: str) -> tuple[tuple[str, ...], int]:
    """ARC / OpenBookQA: choices {text: [...], label: ["A", ...]}; the answer is the index of answerKey."""
    ch = rec.get("choices")
    if not isinstance(ch, dict):
        raise _Bad("'choices' is missing or not a {text, label} record")
    texts = _strs(ch.get("text"), "choices.text")
    labels = _strs(ch.get("label"), "choices.label")
    if len(labels) != len(texts):
        raise _Bad(f"choices.text has {len(texts)} entries, choices.label {len(labels)}")
    if answer not in labels:
        raise _Bad(f"answerKey {answer!r} is not one of choices.label {list(labels)}")
    return texts, labels.index(answer)


def _arc(rec: dict) -> Example:
    texts, label = _choices(rec, _str(rec, "answerKey"))
    return Example(f"Question: {_str(rec, 'question')}\nAnswer:", texts, label)


def _openbookqa(rec: dict) -> Example:
    texts, label = _choices(rec, _str(rec, "answerKey").lstrip())
    return Example(_str(rec, "question_stem"), texts, label)


def _piqa(rec: dict) -> Example:
    return Example(f"Question: {_str(rec, 'goal')}\nAnswer:", (_str(rec, "sol1"), _str(rec, "sol2")),
                   _label(rec.get("label"), 2, "'label'"))


def _winogrande(rec: dict) -> Example:
    s = _str(rec, "sentence")
    if "_" not in s:
        raise _Bad("'sentence' has no blank '_'")
    answer = _str(rec, "answer")
    if answer not in ("1", "2"):
        raise _Bad(f"'answer' must be \"1\" or \"2\" (got {answer!r})")
    i = s.index("_")
    return Example(s[:i], (_str(rec, "option1"), _str(rec, "option2")), int(answer) - 1, suffix=s[i + 1:].strip())


def _jsonl(one):
    return lambda path: _records_jsonl(path, one)


def _parquet(one):
    return lambda path: _records_parquet(path, one)


_ARC = ("allenai/ai2_arc", "210d026faf9955653af8916fad021475a3f00453")
TASKS: dict[str, Task] = {t.name: t for t in (
    Task("hellaswag", "HellaSwag", GitHubFile("rowanz/hellaswag", "a29ff8e9a04bba4bd6588223785ce105328adc57",
                                              "data/hellaswag_val.jsonl", "0f5ee25d72216f12317d5d8a7b92deafa423d81e"),
         "validation", _jsonl(_hellaswag), "llmc", "acc_norm"),
    Task("arc_easy", "ARC-Easy", HFFile(*_ARC, "ARC-Easy/test-00000-of-00001.parquet"), "test", _parquet(_arc),
         "harness", "acc_norm"),
    Task("arc_challenge", "ARC-Challenge", HFFile(*_ARC, "ARC-Challenge/test-00000-of-00001.parquet"), "test",
         _parquet(_arc), "harness", "acc_norm"),
    Task("piqa", "PIQA", HFFile("baber/piqa", "142f6d7367fd9877f0fb3b5734ea6a545f54cdd1", "piqa_validation.parquet"),
         "validation", _parquet(_piqa), "harness", "acc_norm"),
    Task("winogrande", "WinoGrande", HFFile("allenai/winogrande", "01e74176c63542e6b0bcb004dcdea22d94fb67b5",
                                            "winogrande_xl/validation-00000-of-00001.parquet"),
         "validation", _parquet(_winogrande), "harness", "acc"),
    Task("openbookqa", "OpenBookQA", HFFile("allenai/openbookqa", "388097ea7776314e93a529163e0fea805b8a6454",
                                            "main/test-00000-of-00001.parquet"), "test", _parquet(_openbookqa),
         "harness", "acc_norm"),
)}


def _is_file_task(name: str) -> bool:
    return name.endswith(".jsonl")


def task(name: str) -> Task:
    """The Task called `name`: one of TASKS, or a local `.jsonl` file in HellaSwag's format (one record a line:
    ctx, endings, label), scored by HellaSwag's rule (llm.c's, headline acc_norm) under its path as the name."""
    if name in TASKS:
        return TASKS[name]
    return Task(name, Path(name).name, LocalFile(name), "file", _jsonl(_hellaswag), "llmc", "acc_norm")


def check_tasks(names: str | list[str]) -> list[str]:
    """Task names from a list or a comma-separated string; unknown ones are a one-line error listing the known.
    A name ending in .jsonl is a local file in HellaSwag's format; it must exist."""
    names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    names = [n for n in names if n]
    missing = [(n, problem) for n in names if _is_file_task(n) and (problem := file_problem(n))]
    if missing:
        raise UserError(f"task file {missing[0][0]} {missing[0][1]} (a .jsonl task is a local file in HellaSwag's "
                        "format: ctx, endings, label a line)")
    unknown = [n for n in names if n not in TASKS and not _is_file_task(n)]
    if unknown or not names:
        raise UserError(f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: choose from "
                        f"{', '.join(TASKS)} or give a .jsonl file in HellaSwag's format" if names
                        else f"no task given: choose from {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


def load_task(name: str, *, progress: bool = True) -> list[Example]:
    """The examples of task `name`, its file downloaded into the cache first if it is not there."""
    t = task(check_tasks([name])[0])
    path = task_file(name, progress=progress)
    examples = t.parse(path)
    if not examples:  # scored, it would read as accuracy 0.0
        raise UserError(f"{path} holds no examples: a task needs at least one")
    return examples


def task_file(name: str, *, progress: bool = True) -> Path:
    """The cached file of task `name` (`cache_dir()/evals/<task>/<file name>`), fetched once; a local task's own
    file."""
    t = task(name)
    src = t.source
    if isinstance(src, LocalFile):
        return Path(src.path)
    dest = cache_dir() / "evals" / name / Path(src.path).name
    if dest.is_file():
        return dest
    if hub.offline():
        raise UserError(f"{t.title} is not in the cache ({dest}) and downloads are off (LLMPY_OFFLINE or "
                        "HF_HUB_OFFLINE is set)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(src, HFFile):
        _hf_dataset_file(src, dest, progress)
    else:
        _github_file(src, dest, progress)
    return dest


def _hf_dataset_file(src: HFFile, dest: Path, progress: bool) -> None:
    """Through formats/hub.py's download of a dataset file (`{endpoint}/datasets/{repo}/resolve/{revision}/{path}`:
    HEAD, resume, size and sha256 checks)."""
    hub.download(src.repo, src.revision, src.path, dest, progress=progress, repo_type="dataset")


def _github_file(src: GitHubFile, dest: Path, progress: bool) -> None:
    """A plain HTTPS GET through hub.py's resumable `_get` (a `.part` file continued with Range, its size checked
    against Content-Length), then the git blob id; renamed into place only when both hold."""
    url, what = src.url(), f"{src.path} of {src.repo} from {src.server()}"
    part = dest.with_name(f"{dest.name}.{src.blob[:16]}.part")
    with hub._locked(dest):
        if dest.is_file():
            return
        try:
            size = _content_length(url)
            for attempt in range(1, hub.ATTEMPTS + 1):
                try:
                    hub._get(url, part, None, size, what, progress)
                    break
                except hub._CUT:
                    if attempt == hub.ATTEMPTS:
                        raise
        except urllib.error.HTTPError as e:
            raise UserError(f"cannot download {what}: HTTP {e.code} {e.reason}") from None
        except hub._CUT as e:
            reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
            raise UserError(f"cannot download {what} ({reason}); offline? LLMPY_EVALS_URL names another server, "
                            "LLMPY_CACHE the cache to look in") from None
        got = _git_blob_id(part)
        if got != src.blob:
            part.unlink()
            raise UserError(f"the download of {what} is not the file commit {src.commit[:7]} holds: its git blob "
                            f"id is {got}, want {src.blob} (the partial file was deleted; run again)")
        os.replace(part, dest)
        fsync_dir(dest.parent)


def _content_length(url: str) -> int | None:
    req = urllib.request.Request(url, method="HEAD", headers=hub._HEADERS)
    with urllib.request.urlopen(req, timeout=hub.TIMEOUT_S) as r:
        return hub._int(r.headers.get("Content-Length"))


def _git_blob_id(path: Path) -> str:
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
