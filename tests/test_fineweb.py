"""`llmpy prepare fineweb-edu` (data/fineweb.py, formats/hub.py's dataset files) against a local server on 127.0.0.1
that behaves like the Hub: the tree API (paginated with a Link header), `resolve` URLs answered with an LFS-style
redirect carrying X-Linked-Etag (sha256) and X-Linked-Size, Range requests. It serves small parquet files the test
writes; the shards must equal the tokenizer's encoding of each text, a document token before each, in file and row
order, cut llm.c's way (the first shard val, the others train). Nothing here touches the network."""
from __future__ import annotations

import hashlib
import json
import os
import urllib.parse
from pathlib import Path

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from fake_hub import FakeHub, Handler, serving  # noqa: E402  (the Hub double: Range, cuts, the cdn)

from llmpy.cli import main  # noqa: E402
from llmpy.data import fineweb  # noqa: E402
from llmpy.data.shards import read_shard  # noqa: E402
from llmpy.data.tokenizers import get_tokenizer  # noqa: E402
from llmpy.errors import UserError  # noqa: E402

REPO = "HuggingFaceFW/fineweb-edu"
FOLDER = "sample/10BT"
NAMES = ["000_00000.parquet", "000_00001.parquet", "001_00000.parquet"]
WORDS = ["the", "cat", "sat", "on", "a", "mat", "naïve", "café", "—", "12345", "tokens", "\n\n", "\t", "<|endoftext|>",
         "Hello", "world", "!", "über", "日本語", "emoji🙂", "  spaces", "x" * 30]


class DatasetHandler(Handler):
    """Handler's `resolve` and `cdn/` answers, plus the tree API and LFS-style redirects for parquet files."""

    def _serve(self, body: bool):
        hub_, raw = self.server, self.path.lstrip("/")
        path, _, query = raw.partition("?")
        path = urllib.parse.unquote(path)
        if path.startswith("api/"):
            hub_.log.append((self.command, f"{path}?{query}", None))
            return self._tree(path, query)
        if not path.endswith(".parquet"):  # cdn/ and anything else: test_hub's Handler (it logs)
            if path.startswith("cdn/") and path[4:] in hub_.corrupt:
                hub_.log.append((self.command, path, self.headers.get("Range")))
                data = bytearray(hub_.blob(path[4:]))
                data[len(data) // 2] ^= 0xFF  # a bit flipped on the way
                return self._send(bytes(data), body, ranged=True)
            return super()._serve(body)
        hub_.log.append((self.command, path, self.headers.get("Range")))
        data = hub_.files.get(path.replace("/resolve/main/", "/", 1))
        if data is None:
            return self._send(None, body)
        self._redirect(data)

    def _tree(self, path: str, query: str):
        prefix, _, folder = path.partition("/tree/main/")
        repo = prefix.removeprefix("api/")  # datasets/owner/name
        entries = [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f"{folder}/sub"}]
        for key, data in sorted(self.server.files.items()):
            if key.startswith(f"{repo}/{folder}/") and "/" not in key[len(repo) + len(folder) + 2:]:
                sha = hashlib.sha256(data).hexdigest()
                entries.append({"type": "file", "oid": hashlib.sha1(data).hexdigest(), "size": len(data),
                                "path": key[len(repo) + 1:],
                                "lfs": {"oid": sha, "size": len(data), "pointerSize": 134}})
        if not entries[1:]:
            return self._send(None, True)
        start = int(urllib.parse.parse_qs(query).get("cursor", ["0"])[0])
        page = self.server.page
        out = json.dumps(entries[start:start + page]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        if start + page < len(entries):
            self.send_header("Link", f'<{self.server.url}/{self.path.lstrip("/").partition("?")[0]}'
                                     f'?cursor={start + page}>; rel="next"')
        self.end_headers()
        self.wfile.write(out)


class DatasetHub(FakeHub):
    def __init__(self):
        super().__init__(DatasetHandler)
        self.page = 2                  # entries per page of the tree API
        self.corrupt: set[str] = set()  # sha256s whose bytes the cdn damages

    def blob(self, sha: str) -> bytes:
        return next(b for b in self.files.values() if hashlib.sha256(b).hexdigest() == sha)

    def requests(self, kind: str = "") -> list[tuple[str, str, str | None]]:
        return [x for x in self.log if kind in x[1]]


@pytest.fixture
def server(tmp_path, monkeypatch):
    with serving(DatasetHub(), tmp_path, monkeypatch) as s:
        yield s


def texts_of(seed: int, n: int) -> list[str | None]:
    r = np.random.default_rng(seed)
    out = [" ".join(r.choice(WORDS, size=r.integers(1, 40))) for _ in range(n)]
    out[3] = ""        # an empty document is still a document: its token alone
    out[5] = None      # a null text is no document
    return out


@pytest.fixture
def published(server, tmp_path):
    """Three parquet files on the server (several row groups each); returns their texts in order."""
    texts = []
    for i, name in enumerate(NAMES):
        t = texts_of(i, 30)
        table = pa.table({"text": t, "id": [f"<urn:{i}:{j}>" for j in range(len(t))]})
        pq.write_table(table, tmp_path / name, row_group_size=7)
        server.files[f"datasets/{REPO}/{FOLDER}/{name}"] = (tmp_path / name).read_bytes()
        texts += t
    server.files[f"datasets/{REPO}/{FOLDER}/README.md"] = b"not parquet"
    return texts


def expected_tokens(texts) -> np.ndarray:
    tok = get_tokenizer("gpt2")
    return np.array([i for t in texts if t is not None for i in [tok.doc, *tok.encode(t)]], dtype=np.uint16)


def fetched(server) -> list[str]:
    """The files asked for (a HEAD of the resolve URL, then a GET of where it redirects), in order."""
    return [p.rsplit("/", 1)[1] for m, p, _ in server.requests("/resolve/") if m == "HEAD"]


def shards(out: Path, name: str = "edu_fineweb") -> list[Path]:
    return sorted(out.glob(f"{name}_*.bin"), key=lambda p: p.name.rsplit("_", 1)[1])


def run(out, **kw):
    kw = {"out_dir": out, "shard_tokens": 500, "workers": 1, "progress": False} | kw
    return fineweb.prepare_fineweb("fineweb-edu", "10BT", **kw)


def test_shards_are_the_documents_tokenized_in_order_and_cut_llmc_style(server, published, tmp_path):
    want = expected_tokens(published)
    assert len(want) > 3 * 500
    train, val = run(tmp_path / "out")
    assert (train, val) == (str(tmp_path / "out" / "edu_fineweb_train_*.bin"),
                            str(tmp_path / "out" / "edu_fineweb_val_*.bin"))
    got = shards(tmp_path / "out")
    k = -(-len(want) // 500)
    assert [p.name for p in got] == ["edu_fineweb_val_000000.bin"] + [f"edu_fineweb_train_{i:06d}.bin"
                                                                     for i in range(1, k)]
    toks = [read_shard(p) for p in got]
    assert all(t.dtype == np.uint16 for t in toks)
    assert [len(t) for t in toks] == [500] * (k - 1) + [len(want) - 500 * (k - 1)]
    np.testing.assert_array_equal(np.concatenate(toks), want)
    # five entries (a folder, README.md, three parquet files) took three pages of the tree API; only the parquet
    # files were downloaded, in name order
    assert [(m, p) for m, p, _ in server.requests("api/")] == [
        ("GET", f"api/datasets/{REPO}/tree/main/{FOLDER}?{q}") for q in ("", "cursor=2", "cursor=4")]
    assert fetched(server) == NAMES and len(server.requests("cdn/")) == 3
    cache = tmp_path / "cache" / "hub" / "datasets" / "HuggingFaceFW--fineweb-edu" / "main" / FOLDER
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == [".tree.json"] + NAMES


def test_tokens_stops_there_and_downloads_only_the_files_it_needs(server, published, tmp_path):
    want = expected_tokens(published)
    first = len(expected_tokens(published[:30]))
    n = first - 37  # within the first file
    run(tmp_path / "out", tokens=n, shard_tokens=200)
    got = [read_shard(p) for p in shards(tmp_path / "out")]
    assert [len(t) for t in got] == [200] * (n // 200) + [n % 200]
    np.testing.assert_array_equal(np.concatenate(got), want[:n])
    assert fetched(server) == NAMES[:1]
    # asking for more later fetches the next file only; fewer shards than before leaves no stale one behind
    run(tmp_path / "out", tokens=first + 10, shard_tokens=200)
    got = [read_shard(p) for p in shards(tmp_path / "out")]
    np.testing.assert_array_equal(np.concatenate(got), want[:first + 10])
    assert fetched(server) == NAMES[:2]
    run(tmp_path / "out", tokens=450, shard_tokens=200)
    assert [len(read_shard(p)) for p in shards(tmp_path / "out")] == [200, 200, 50]
    with pytest.raises(UserError, match="only the val shard"):
        run(tmp_path / "out", tokens=200, shard_tokens=200)


def test_a_second_run_uses_the_cache(server, published, tmp_path, monkeypatch):
    run(tmp_path / "a")
    first = {p.name: p.read_bytes() for p in shards(tmp_path / "a")}
    server.log.clear()
    run(tmp_path / "a")  # the stamp: nothing to do
    monkeypatch.setenv("LLMPY_OFFLINE", "1")
    run(tmp_path / "b")  # listing and files from the cache: tokenized again, no request
    assert server.log == []
    assert {p.name: p.read_bytes() for p in shards(tmp_path / "b")} == first
    (tmp_path / "b" / "edu_fineweb_train_000002.bin").unlink()  # a shard gone: the stamp no longer holds
    run(tmp_path / "b")
    assert {p.name: p.read_bytes() for p in shards(tmp_path / "b")} == first
    with pytest.raises(UserError, match="sample/100BT .*not in the cache .*downloads are off"):
        fineweb.prepare_fineweb("fineweb-edu", "100BT", tmp_path / "c", workers=1, progress=False)


def test_a_cut_download_resumes_with_a_range_request(server, published, tmp_path):
    server.cuts = [300]
    run(tmp_path / "out")
    gets = [rng for m, p, rng in server.requests("cdn/") if m == "GET"]
    assert gets == [None, "bytes=300-", None, None]
    np.testing.assert_array_equal(np.concatenate([read_shard(p) for p in shards(tmp_path / "out")]),
                                  expected_tokens(published))


def test_a_corrupt_download_is_one_line_naming_the_file_and_leaves_nothing(server, published, tmp_path, capsys):
    bad = f"{FOLDER}/{NAMES[1]}"
    server.corrupt = {hashlib.sha256(server.files[f"datasets/{REPO}/{bad}"]).hexdigest()}
    out = tmp_path / "out"
    assert main(["prepare", "fineweb-edu", "--out", str(out), "--workers", "1", "--shard-tokens", "100000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # "downloading ..." lines, then the error
    assert [e for e in err if e.startswith("error")] == err[-1:]
    err = err[-1]
    assert err.startswith(f"error: the download of {bad} of {REPO} from http://127.0.0.1:")
    assert "is damaged: its sha256 is" in err
    cache = tmp_path / "cache" / "hub" / "datasets" / "HuggingFaceFW--fineweb-edu" / "main" / FOLDER
    assert not list(cache.glob("*.part")) and not (cache / NAMES[1]).exists()
    assert [p.name for p in out.iterdir()] == []  # no shard (the one shard was not full), no temporary file
    server.corrupt = set()
    assert main(["prepare", "fineweb-edu", "--out", str(out), "--workers", "1", "--shard-tokens", "100000"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"--val-data '{out}/edu_fineweb_val_*.bin'")


def test_a_damaged_cached_file_is_named(server, published, tmp_path):
    run(tmp_path / "a")
    cached = tmp_path / "cache" / "hub" / "datasets" / "HuggingFaceFW--fineweb-edu" / "main" / FOLDER / NAMES[0]
    cached.write_bytes(bytes(cached.stat().st_size))  # same size, not parquet
    with pytest.raises(UserError, match=f"{cached} is not a readable parquet file .*delete it and run again"):
        run(tmp_path / "b")
    cached.write_bytes(b"short")  # another size than the listing's: fetched again
    run(tmp_path / "b")
    assert [p.read_bytes() for p in shards(tmp_path / "b")] == [p.read_bytes() for p in shards(tmp_path / "a")]


def test_a_file_changed_since_it_was_listed_or_a_missing_folder(server, published, tmp_path, monkeypatch):
    run(tmp_path / "a", tokens=600)  # lists the folder, fetches the first file
    key = f"datasets/{REPO}/{FOLDER}/{NAMES[2]}"
    server.files[key] = server.files[key] + b"x"
    listing = tmp_path / "cache" / "hub" / "datasets" / "HuggingFaceFW--fineweb-edu" / "main" / FOLDER / ".tree.json"
    with pytest.raises(UserError, match=f"{NAMES[2]} of {REPO} .*: the Hub lists it with sha256 [0-9a-f]{{64}} but "
                                        f"serves [0-9a-f]{{64}} .*; delete {listing} to list the files again"):
        run(tmp_path / "b")
    with pytest.raises(UserError, match=f"cannot list the files of {REPO}/sample/100BT at main from http://127.0.0.1:"
                                        "[0-9]+: HTTP 404 .*no such repository or folder"):
        fineweb.prepare_fineweb("fineweb-edu", "100BT", tmp_path / "c", workers=1, progress=False)
    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
    with pytest.raises(UserError, match=r"pip install pyarrow \(or pip install 'llmpy\[data\]'\)"):
        run(tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_workers_do_not_change_the_shards(server, published, tmp_path, monkeypatch):
    monkeypatch.setattr(fineweb, "TASK_DOCS", 5)  # many small tasks, spread over both workers
    run(tmp_path / "one", workers=1)
    run(tmp_path / "two", workers=2, tokens=1234)
    one, two = shards(tmp_path / "one"), shards(tmp_path / "two")
    assert [p.name for p in two] == [p.name for p in one][:3]
    assert [p.read_bytes() for p in two[:2]] == [p.read_bytes() for p in one[:2]]
    np.testing.assert_array_equal(read_shard(two[2]), read_shard(one[2])[:234])


def test_cli(server, published, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert main(["prepare", "fineweb-edu", "--out", str(out), "--tokens", "700", "--shard-tokens", "300",
                 "--workers", "1", "--name", "edu"]) == 0
    assert capsys.readouterr().out.splitlines()[-2:] == [f"  --train-data '{out}/edu_train_*.bin'",
                                                         f"  --val-data '{out}/edu_val_*.bin'"]
    assert [len(read_shard(p)) for p in shards(out, "edu")] == [300, 300, 100]
    assert main(["prepare", str(tmp_path), "--out", str(out), "--tokens", "5"]) == 2
    assert "--tokens: only for `llmpy prepare fineweb-edu`" in capsys.readouterr().err
    assert main(["prepare", "fineweb-edu", "--val-tokens", "5"]) == 2
    # a folder called fineweb-edu is text files, as before
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fineweb-edu").mkdir()
    (tmp_path / "fineweb-edu" / "a.txt").write_text("hello world " * 50)
    assert main(["prepare", "fineweb-edu", "--out", "txt", "--val-tokens", "10"]) == 0
    assert sorted(p.name for p in (tmp_path / "txt").iterdir()) == ["data_train_000000.bin", "data_val_000000.bin"]


def test_default_folder_and_globs(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMPY_CACHE", str(tmp_path))
    assert fineweb.shard_globs("fineweb", "100BT") == (str(tmp_path / "fineweb100B" / "fineweb_train_*.bin"),
                                                       str(tmp_path / "fineweb100B" / "fineweb_val_*.bin"))
    assert fineweb.default_out_dir("fineweb-edu", "10BT", "llama3") == tmp_path / "edu_fineweb10B-llama3"


def _llama3_offline() -> bytes | None:
    """Llama 3's tokenizer.model if this machine has it without a download (installed, or in the user's cache)."""
    from llmpy.data.tokenizers import llama3
    try:
        data = llama3._from_installed()
    except UserError:
        return None
    if data is None:
        home = Path(os.environ.get("LLMPY_CACHE") or Path.home() / ".cache" / "llmpy")
        f = home / "llama3" / "tokenizer.model"
        data = f.read_bytes() if f.is_file() else None
    if data is None or hashlib.sha256(data).hexdigest() != llama3.MODEL_SHA256:
        return None
    return data


LLAMA3 = _llama3_offline()


@pytest.mark.skipif(LLAMA3 is None, reason="Llama 3's tokenizer is not on this machine (no download in tests)")
def test_llama3_makes_uint32_shards(server, published, tmp_path):
    (tmp_path / "cache" / "llama3").mkdir(parents=True)
    (tmp_path / "cache" / "llama3" / "tokenizer.model").write_bytes(LLAMA3)
    from llmpy.data.tokenizers import llama3
    llama3.get_tokenizer.cache_clear()
    get_tokenizer.cache_clear()
    tok = get_tokenizer("llama3")
    run(tmp_path / "out", tokenizer="llama3", workers=2, shard_tokens=400)
    got = shards(tmp_path / "out")
    assert got[0].read_bytes()[:8] == np.array([20240801, 7], "<i4").tobytes()
    toks = [read_shard(p) for p in got]
    assert all(t.dtype == np.uint32 for t in toks) and len(toks[0]) == 400
    want = [i for t in published if t is not None for i in [128000, *tok.encode(t)]]
    np.testing.assert_array_equal(np.concatenate(toks), want)
