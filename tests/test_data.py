"""Token shards, prepare and the DataLoader, each checked against a direct computation from the spec."""
import json
import struct

import numpy as np
import pytest

from llmpy.data.loader import DataLoader
from llmpy.data.prepare import prepare
from llmpy.data.shards import read_shard, write_shard
from llmpy.errors import UserError
from llmpy.data.tokenizers import get_tokenizer

EOT = 50256


# ------------------------------------------------------------------------------------------------ shards

def test_shard_round_trip_and_exact_layout(tmp_path):
    toks = np.random.default_rng(0).integers(0, 65536, size=1000)
    toks[:2] = [0, 65535]
    p = tmp_path / "s.bin"
    write_shard(p, toks)
    raw = p.read_bytes()
    assert raw[:12] == struct.pack("<3i", 20240520, 1, 1000) and raw[12:1024] == bytes(1012)
    assert raw[1024:] == struct.pack("<1000H", *toks.tolist())
    got = read_shard(p, vocab_size=65536)
    assert got.dtype == np.uint16 and np.array_equal(got, toks)
    write_shard(p, [])
    assert len(read_shard(p, vocab_size=10)) == 0
    assert [q.name for q in tmp_path.iterdir()] == ["s.bin"]  # no temp file left behind


@pytest.mark.parametrize("bad, message", [([1, -1], "-1"), ([1, 65536], "65536"), ([0.5], "integers")])
def test_write_shard_rejects_bad_tokens(tmp_path, bad, message):
    with pytest.raises(UserError, match=message):
        write_shard(tmp_path / "s.bin", np.array(bad))
    assert not (tmp_path / "s.bin").exists()


def _shard_bytes(tokens, magic=20240520, version=1, ntok=None):
    ntok = len(tokens) if ntok is None else ntok
    return struct.pack("<3i", magic, version, ntok) + bytes(1012) + struct.pack(f"<{len(tokens)}H", *tokens)


@pytest.mark.parametrize("raw, message", [
    (bytes(100), "shorter than the 1024-byte header"),
    (_shard_bytes([1, 2, 3], magic=20240328), "magic 20240328"),
    (_shard_bytes([1, 2, 3], version=2), "version 2"),
    (_shard_bytes([1, 2, 3], ntok=4), "truncated: its header says 4 tokens"),
    (_shard_bytes([1, 2, 3], ntok=2), "header says 2 tokens"),
    (_shard_bytes([1, 2, 3], ntok=-1), "header says -1 tokens"),
])
def test_read_shard_rejects_bad_files(tmp_path, raw, message):
    p = tmp_path / "bad.bin"
    p.write_bytes(raw)
    with pytest.raises(UserError, match=message) as e:
        read_shard(p)
    assert str(p) in str(e.value)


def test_read_shard_checks_vocab(tmp_path):
    p = tmp_path / "s.bin"
    p.write_bytes(_shard_bytes([5, 0, 999, 1000, 3, 4000]))
    assert len(read_shard(p, vocab_size=4001)) == 6
    with pytest.raises(UserError, match=r"token id 1000 at position 3 .*size 1000") as e:
        read_shard(p, vocab_size=1000)
    assert str(p) in str(e.value)


# ------------------------------------------------------------------------------------------------ prepare

@pytest.fixture
def corpus_dir(tmp_path):
    texts = {"d/b.txt": "Second file.\n", "d/a.txt": "First file, first line.\nSecond line?\n",
             "d/sub/c.txt": "Nested ünïcödé 😀", "d/notes.md": "not a .txt: ignored", "e.txt": "Outside file."}
    for rel, text in texts.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text, encoding="utf-8")
    order = ["d/a.txt", "d/b.txt", "d/sub/c.txt", "e.txt"]  # sorted paths
    tok = get_tokenizer()
    stream = [t for rel in order for t in [EOT] + tok.encode(texts[rel])]
    return tmp_path, np.array(stream)


def _read_all(paths):
    return np.concatenate([read_shard(p) for p in paths]) if paths else np.zeros(0, np.uint16)


def test_prepare_eot_order_and_split(corpus_dir, capsys):
    root, stream = corpus_dir
    train, val = prepare([root / "e.txt", root / "d", root / "d" / "a.txt"], root / "out", "tiny", val_tokens=10)
    assert [p.name for p in val] == ["tiny_val_000000.bin"]
    assert [p.name for p in train] == ["tiny_train_000000.bin"]
    assert np.array_equal(_read_all(val), stream[:10])
    assert np.array_equal(_read_all(train), stream[10:])
    assert "4 documents" in capsys.readouterr().out


def test_prepare_default_fraction_and_shard_splitting(corpus_dir):
    root, stream = corpus_dir
    n_val = len(stream) // 4
    frac = (n_val + 0.75) / len(stream)  # rounding down matters here
    train, val = prepare([root], root / "out", "tiny", val_fraction=frac, shard_tokens=7)
    assert [len(read_shard(p)) for p in val] == [7] * (n_val // 7) + ([n_val % 7] if n_val % 7 else [])
    assert all(len(read_shard(p)) == 7 for p in train[:-1]) and 1 <= len(read_shard(train[-1])) <= 7
    assert [p.name for p in train] == [f"tiny_train_{k:06d}.bin" for k in range(len(train))]
    assert np.array_equal(np.concatenate([_read_all(val), _read_all(train)]), stream)

    # a second run with bigger shards, told to overwrite, removes the first run's extra shards (a glob would find
    # them)
    train2, val2 = prepare([root], root / "out", "tiny", val_tokens=0, overwrite=True)
    assert val2 == [] and len(train2) == 1
    assert sorted(p.name for p in (root / "out").iterdir()) == ["tiny_train_000000.bin"]
    assert np.array_equal(read_shard(train2[0]), stream)


def test_prepare_never_replaces_shards_it_did_not_make(corpus_dir, capsys):
    """The same --name in the same --out a second time (another tokenizer, other texts) is refused in one line and
    touches nothing; --overwrite replaces the shards; another --name sits beside them."""
    from llmpy.cli import main
    root, stream = corpus_dir
    out = root / "data"
    argv = ["prepare", str(root / "d"), str(root / "e.txt"), "--out", str(out), "--name", "mydata",
            "--val-tokens", "10"]
    assert main(argv) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main(argv[:-1] + ["5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already holds shards named mydata" in err and "--overwrite" in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main(argv[:-1] + ["5", "--overwrite"]) == 0
    assert np.array_equal(read_shard(out / "mydata_val_000000.bin"), stream[:5])
    assert main(argv[:-3] + ["other"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["mydata_train_000000.bin", "mydata_val_000000.bin",
                                                     "other_train_000000.bin", "other_val_000000.bin"]


def test_prepare_errors(tmp_path, corpus_dir):
    root, stream = corpus_dir
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no text files"):
        prepare([tmp_path / "empty"], tmp_path / "out", "x")
    (tmp_path / "empty" / "blank.txt").write_text("")
    with pytest.raises(UserError, match="no text"):
        prepare([tmp_path / "empty"], tmp_path / "out", "x")
    with pytest.raises(UserError, match="does not exist"):
        prepare([tmp_path / "missing"], tmp_path / "out", "x")
    with pytest.raises(UserError, match="leaves no training data"):
        prepare([root / "e.txt"], tmp_path / "out", "x", val_tokens=len(stream))
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(UserError, match="latin1.txt is not UTF-8"):
        prepare([tmp_path / "latin1.txt"], tmp_path / "out", "x")
    with pytest.raises(UserError, match="bad dataset name"):
        prepare([root], tmp_path / "out", "../x")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ loader

def _make_shards(folder, sizes):
    """Shard k holds k*10000 + j at position j, so a token tells where it came from."""
    folder.mkdir(exist_ok=True)
    shards = [np.arange(n) + 10000 * k for k, n in enumerate(sizes)]
    for k, toks in enumerate(shards):
        write_shard(folder / f"d_train_{k:06d}.bin", toks)
    return str(folder / "d_train_*.bin"), shards


def _reference_sequential(shards, B, T, rank, world):
    """llm.c's dataloader, written from its formula: forever over the shards in order."""
    while True:
        for toks in shards:
            for i in range((len(toks) - 1) // (B * T * world)):
                start = i * B * T * world + rank * B * T
                w = toks[start:start + B * T + 1]
                yield w[:-1].reshape(B, T), w[1:].reshape(B, T)


def _reference_shuffled(shards, B, T, rank, world, seed):
    e = 0
    while True:
        for k in np.random.default_rng([seed, e]).permutation(len(shards)):
            ns = (len(shards[k]) - 1) // (B * T * world)
            for i in np.random.default_rng([seed, e, k]).permutation(ns):
                start = i * B * T * world + rank * B * T
                w = shards[k][start:start + B * T + 1]
                yield w[:-1].reshape(B, T), w[1:].reshape(B, T)
        e += 1


SIZES = [50, 13, 37, 25]  # with B*T*world = 12: 4, 1, 3, 2 batches


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("rank, world, B, T", [(0, 1, 2, 6), (0, 2, 2, 3), (1, 2, 2, 3), (2, 3, 1, 4)])
def test_loader_matches_reference(tmp_path, shuffle, rank, world, B, T):
    pattern, shards = _make_shards(tmp_path / "shards", SIZES)
    dl = DataLoader(pattern, B, T, rank=rank, world=world, shuffle=shuffle, seed=7, vocab_size=60000)
    assert dl.num_batches_per_epoch == sum((n - 1) // (B * T * world) for n in SIZES) == 10
    ref = (_reference_shuffled(shards, B, T, rank, world, 7) if shuffle
           else _reference_sequential(shards, B, T, rank, world))
    first = None
    for step in range(35):  # three and a half epochs: wraps around twice
        x, y = dl.next_batch()
        rx, ry = next(ref)
        assert x.dtype == np.int32 and x.shape == (B, T)
        assert np.array_equal(x, rx) and np.array_equal(y, ry), step
        first = (x, y) if first is None else first
        assert x is first[0] and y is first[1]  # the same preallocated buffers every call
    dl.reset()
    ref = (_reference_shuffled(shards, B, T, rank, world, 7) if shuffle
           else _reference_sequential(shards, B, T, rank, world))
    for _ in range(3):
        assert np.array_equal(dl.next_batch()[0], next(ref)[0])


def test_ranks_read_disjoint_windows(tmp_path):
    pattern, _ = _make_shards(tmp_path / "shards", SIZES)
    loaders = [DataLoader(pattern, 2, 3, rank=r, world=2, shuffle=True, seed=1) for r in range(2)]
    for _ in range(20):
        a, b = (dl.next_batch()[0].copy() for dl in loaders)
        assert a[0, 0] // 10000 == b[0, 0] // 10000 and b[0, 0] - a[0, 0] == 6  # same shard, next B*T tokens


def _epoch_starts(dl, n):
    return [int(dl.next_batch()[0][0, 0]) for _ in range(n)]


def test_shuffle_is_deterministic_and_covers_every_sample_once(tmp_path):
    pattern, shards = _make_shards(tmp_path / "shards", SIZES)
    B, T = 3, 4
    every = sorted(10000 * k + i * B * T for k, n in enumerate(SIZES) for i in range((n - 1) // (B * T)))
    a = DataLoader(pattern, B, T, shuffle=True, seed=3)
    b = DataLoader(pattern, B, T, shuffle=True, seed=3)
    c = DataLoader(pattern, B, T, shuffle=True, seed=4)
    n = a.num_batches_per_epoch
    ea = [_epoch_starts(a, n) for _ in range(3)]
    assert ea == [_epoch_starts(b, n) for _ in range(3)]
    assert ea != [_epoch_starts(c, n) for _ in range(3)]
    assert all(sorted(e) == every for e in ea)
    assert ea[0] != ea[1] and ea[0] != sorted(ea[0])  # reshuffled each epoch, not in file order


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("steps", [0, 4, 5, 9, 10, 23])  # 4: at the end of a shard; 10: at the end of an epoch
def test_state_resumes_exactly(tmp_path, shuffle, steps):
    pattern, _ = _make_shards(tmp_path / "shards", SIZES)
    a = DataLoader(pattern, 2, 6, shuffle=shuffle, seed=5)
    for _ in range(steps):
        a.next_batch()
    saved = json.loads(json.dumps(a.state()))
    expected = [tuple(t.copy() for t in a.next_batch()) for _ in range(25)]
    b = DataLoader(pattern, 2, 6, shuffle=shuffle, seed=5)
    b.next_batch()
    b.load_state(saved)
    for x, y in expected:
        bx, by = b.next_batch()
        assert np.array_equal(bx, x) and np.array_equal(by, y)


def test_load_state_mismatches(tmp_path):
    pattern, _ = _make_shards(tmp_path / "shards", SIZES)
    saved = DataLoader(pattern, 2, 6, shuffle=True, seed=5).state()
    for kwargs, message in [(dict(B=3, T=4), "B=2 \\(saved\\) vs 3"), (dict(T=3), "T=6"),
                            (dict(B=1, world=2), "world=1 \\(saved\\) vs 2"), (dict(seed=6), "seed=5"),
                            (dict(shuffle=False), "shuffle")]:
        args = {"B": 2, "T": 6, "shuffle": True, "seed": 5, **kwargs}
        dl = DataLoader(pattern, args.pop("B"), args.pop("T"), **args)
        with pytest.raises(UserError, match=message):
            dl.load_state(saved)
    fewer = DataLoader(str(tmp_path / "shards" / "d_train_00000[012].bin"), 2, 6, shuffle=True, seed=5)
    with pytest.raises(UserError, match="saved over 4 shards"):
        fewer.load_state(saved)
    dl = DataLoader(pattern, 2, 6, shuffle=True, seed=5)
    with pytest.raises(UserError, match="malformed"):
        dl.load_state({"epoch": 0})
    with pytest.raises(UserError, match="impossible position"):
        dl.load_state({**saved, "shard_pos": 4})
    with pytest.raises(UserError, match=r"sample 5 but shard .* has \d batches"):
        dl.load_state({**saved, "sample_pos": 5})


def test_loader_errors(tmp_path):
    with pytest.raises(UserError, match="no token shards match .*nothing_\\*"):
        DataLoader(str(tmp_path / "nothing_*.bin"), 2, 3)
    pattern, _ = _make_shards(tmp_path / "shards", [50, 12])
    with pytest.raises(UserError, match=r"d_train_000001.bin has 12 tokens, too few .* 13 tokens"):
        DataLoader(pattern, 2, 6)
    with pytest.raises(UserError, match="bad loader settings"):
        DataLoader(pattern, 0, 6)
    with pytest.raises(UserError, match="bad loader settings"):
        DataLoader(pattern, 1, 6, rank=2, world=2)


def test_loader_checks_token_ids_when_a_shard_is_first_used(tmp_path):
    pattern, _ = _make_shards(tmp_path / "shards", [25, 25])  # shard 1 holds ids 10000..10024
    dl = DataLoader(pattern, 2, 6, vocab_size=10010)  # headers are fine: no error yet
    for _ in range(2):
        dl.next_batch()
    with pytest.raises(UserError, match=r"d_train_000001.bin: token id 10010 at position 10"):
        dl.next_batch()


def test_loader_expands_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    _make_shards(tmp_path / "shards", [25])
    assert DataLoader("~/shards/d_train_*.bin", 2, 6).num_batches_per_epoch == 2
