"""Downloads from the Hugging Face Hub (formats/hub.py) against a local server on 127.0.0.1 that behaves like the Hub:
`resolve` URLs, large files behind a redirect carrying X-Linked-Etag (sha256) and X-Linked-Size, Range requests.
The server serves a small GPT-2 the test writes; nothing here touches the network."""
from __future__ import annotations

import hashlib
import http.server
import json
import threading

import numpy as np
import pytest

from llmpy.cli import main
from llmpy.data.shards import write_shard
from llmpy.errors import UserError
from llmpy.formats import hub
from llmpy.formats.checkpoint import load_weights
from llmpy.formats.hf import write_hf_model
from llmpy.formats.safetensors import load_safetensors, save_safetensors
from llmpy.models.gpt2 import GPT2Config, spec

pytestmark = pytest.mark.filterwarnings("ignore:no tokenizer exported")
CFG = GPT2Config(max_seq_len=32, vocab_size=200, padded_vocab_size=256, num_layers=2, num_heads=2, channels=16)
REPO = "openai-community/gpt2"


class FakeHub(http.server.ThreadingHTTPServer):
    """files: {"owner/name/file": bytes}; safetensors files are 'LFS': redirected to /cdn/<sha256>."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.files: dict[str, bytes] = {}
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.cuts: list[int] = []        # each GET of a large file sends only this many bytes, then hangs up
        self.wrong_sha = False
        self.ignore_range = False

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self._serve(body=False)

    def do_GET(self):
        self._serve(body=True)

    def _serve(self, body: bool):
        hub_, path = self.server, self.path.lstrip("/")
        hub_.log.append((self.command, path, self.headers.get("Range")))
        if path.startswith("cdn/"):
            blobs = {hashlib.sha256(b).hexdigest(): b for b in hub_.files.values()}
            return self._send(blobs.get(path[4:]), body, ranged=True)
        repo_file = path.replace("/resolve/main/", "/", 1)
        data = hub_.files.get(repo_file)
        if data is None or not repo_file.endswith(".safetensors"):
            return self._send(data, body, etag=f'"{hashlib.sha1(data or b"").hexdigest()}"')
        sha = hashlib.sha256(data).hexdigest()
        self.send_response(302)
        self.send_header("Location", f"/cdn/{sha}")
        self.send_header("X-Linked-Etag", f'"{"0" * 64 if hub_.wrong_sha else sha}"')
        self.send_header("X-Linked-Size", str(len(data)))
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send(self, data, body, etag=None, ranged=False):
        if data is None:
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        if ranged and rng and not self.server.ignore_range:
            start = int(rng.removeprefix("bytes=").rstrip("-"))
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        if etag:
            self.send_header("ETag", etag)
        self.end_headers()
        if body:
            out = data[start:]
            if ranged and self.server.cuts:
                out = out[:self.server.cuts.pop(0)]
            self.wfile.write(out)


@pytest.fixture
def server(tmp_path, monkeypatch):
    s = FakeHub()
    t = threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    monkeypatch.setenv("LLMPY_HF_ENDPOINT", s.url)
    monkeypatch.setenv("LLMPY_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LLMPY_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield s
    s.shutdown()
    s.server_close()


def publish(server, tmp_path, repo=REPO, seed=0):
    """Writes a small GPT-2 as HF files and puts them on the server; returns the parameters."""
    r = np.random.default_rng(seed)
    params = {s.name: r.standard_normal(s.shape).astype(np.float32) for s in spec(CFG)}
    params["wte"][CFG.vocab_size:] = 0
    d = tmp_path / f"published{seed}"
    write_hf_model(d, CFG, params)
    for name in ("model.safetensors", "config.json"):
        server.files[f"{repo}/{name}"] = (d / name).read_bytes()
    return params


def assert_same(got, params):
    for n, a in params.items():
        np.testing.assert_array_equal(got[n], a, err_msg=n)


def cached(tmp_path, repo=REPO):
    return tmp_path / "cache" / "hub" / repo.replace("/", "--") / "main"


def test_names():
    assert hub.hub_repo("gpt2") == ("openai-community/gpt2", "main")
    assert hub.hub_repo("gpt2-xl") == ("openai-community/gpt2-xl", "main")
    assert hub.hub_repo("hf:someone/tiny-gpt2@v1.0") == ("someone/tiny-gpt2", "v1.0")
    assert hub.hub_repo("d12") is None and hub.hub_repo("gpt2:d12") is None
    for bad in ("hf:../x", "hf:a/b/c", "hf:a/b@x/y", "hf:a"):
        with pytest.raises(UserError, match="hf:owner/name"):
            hub.hub_repo(bad)


def test_fetch_then_read_from_the_cache_offline(server, tmp_path, monkeypatch):
    params = publish(server, tmp_path)
    cfg, got = load_weights("gpt2")
    assert cfg == CFG
    assert_same(got, params)
    assert sorted(p.name for p in cached(tmp_path).iterdir() if not p.name.startswith(".")) == \
        ["config.json", "model.safetensors"]
    # only config.json and safetensors files are ever asked for: nothing that would be unpickled
    assert {p.split("/")[-1] for _, p, _ in server.log if "resolve" in p} == {"config.json", "model.safetensors"}
    n = len(server.log)
    monkeypatch.setenv("LLMPY_OFFLINE", "1")
    assert_same(load_weights("gpt2")[1], params)
    assert len(server.log) == n  # the cache alone


def test_a_cut_download_resumes_with_a_range_request(server, tmp_path):
    params = publish(server, tmp_path)
    size = len(server.files[f"{REPO}/model.safetensors"])
    server.cuts = [1000]
    assert_same(load_weights("gpt2")[1], params)
    gets = [rng for m, p, rng in server.log if m == "GET" and p.startswith("cdn/")]
    assert gets == [None, "bytes=1000-"] and size > 1000


def test_a_download_cut_every_time_is_kept_for_the_next_run(server, tmp_path, capsys):
    params = publish(server, tmp_path)
    server.cuts = [700, 300, 500]  # one call makes 3 attempts: 1500 bytes arrive
    with pytest.raises(UserError) as e:
        load_weights("gpt2")
    msg = str(e.value)
    assert "\n" not in msg and "model.safetensors of openai-community/gpt2" in msg and "run again to resume" in msg
    assert not (cached(tmp_path) / "model.safetensors").exists()
    (part,) = cached(tmp_path).glob("model.safetensors.*.part")
    assert part.stat().st_size == 1500
    server.log.clear()
    assert_same(load_weights("gpt2")[1], params)
    assert [rng for m, p, rng in server.log if m == "GET" and p.startswith("cdn/")] == ["bytes=1500-"]
    assert not list(cached(tmp_path).glob("*.part"))


def test_a_server_ignoring_range_restarts_cleanly(server, tmp_path):
    params = publish(server, tmp_path)
    server.cuts, server.ignore_range = [1000], True
    assert_same(load_weights("gpt2")[1], params)


def test_a_part_of_another_version_is_not_spliced(server, tmp_path):
    params = publish(server, tmp_path)
    folder = cached(tmp_path)
    folder.mkdir(parents=True)
    (folder / "model.safetensors.0123456789abcdef.part").write_bytes(b"x" * 5000)  # a stale version
    assert_same(load_weights("gpt2")[1], params)
    assert not list(folder.glob("*.part"))


def test_a_damaged_download_is_refused_and_deleted(server, tmp_path):
    publish(server, tmp_path)
    server.wrong_sha = True
    with pytest.raises(UserError, match="download of model.safetensors of openai-community/gpt2 from http://127"
                                        ".0.0.1:[0-9]+ is damaged: its sha256 is [0-9a-f]{64}, the Hub says 0{64}"):
        load_weights("gpt2")
    assert not list(cached(tmp_path).glob("model.safetensors*"))


def test_offline_and_missing(server, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="config.json of openai-community/gpt2-medium .*no such file or public"):
        load_weights("gpt2-medium")
    monkeypatch.setenv("LLMPY_OFFLINE", "1")
    with pytest.raises(UserError, match="not in the cache .* downloads are off"):
        load_weights("gpt2")
    monkeypatch.delenv("LLMPY_OFFLINE")
    server.shutdown()
    server.server_close()  # nothing listens there any more: like being offline
    with pytest.raises(UserError, match=r"cannot download config.json of openai-community/gpt2 from http://127"):
        load_weights("gpt2")


def test_sharded_repository(server, tmp_path):
    params = publish(server, tmp_path, repo="someone/sharded")
    t, meta = load_safetensors(tmp_path / "published0" / "model.safetensors")
    del server.files["someone/sharded/model.safetensors"]
    names = sorted(t)
    wm = {}
    for i, part in enumerate((names[::2], names[1::2])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_safetensors(tmp_path / fname, {n: t[n] for n in part}, meta, checksums=False)
        server.files[f"someone/sharded/{fname}"] = (tmp_path / fname).read_bytes()
        wm |= {n: fname for n in part}
    server.files["someone/sharded/model.safetensors.index.json"] = json.dumps({"weight_map": wm}).encode()
    assert_same(load_weights("hf:someone/sharded")[1], params)


def test_train_init_gpt2_starts_from_the_hub_weights(server, tmp_path):
    params = publish(server, tmp_path)
    write_shard(tmp_path / "tr_000.bin", np.random.default_rng(1).integers(0, CFG.vocab_size, 2000))
    out = tmp_path / "run"
    assert main(["train", "--init", "gpt2", "--train-data", str(tmp_path / "tr_*.bin"), "-b", "2", "-t", "16",
                 "--steps", "1", "--lr", "1e-30", "--val-every", "0", "--sample-tokens", "0", "--device", "cpu",
                 "--no-progress", "--out", str(out)]) == 0
    cfg, got = load_weights(out / "checkpoint.safetensors")
    assert cfg == CFG
    for n, a in params.items():  # one step at lr 1e-30 leaves the downloaded weights
        np.testing.assert_allclose(got[n], a, rtol=1e-6, atol=1e-20, err_msg=n)
