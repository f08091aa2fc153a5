"""Downloads from the Hugging Face Hub (formats/hub.py) against a local server on 127.0.0.1 that behaves like the Hub:
`resolve` URLs, large files behind a redirect carrying X-Linked-Etag (sha256) and X-Linked-Size, Range requests.
The server serves a small GPT-2 the test writes; nothing here touches the network."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fake_hub import FakeHub, serving

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


@pytest.fixture
def server(tmp_path, monkeypatch):
    with serving(FakeHub(), tmp_path, monkeypatch) as s:
        yield s


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
