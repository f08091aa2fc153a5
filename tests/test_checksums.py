"""Integrity of the files llmpy writes for itself (formats/safetensors.py's CRC-32 table): a flipped bit anywhere in
a tensor or in the metadata is reported as damage naming the tensor and the file, never loaded; older files without
checksums still load. Which tensor a byte belongs to is found from the header here, independently of the reader."""
from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest

from llmpy.cli import main
from llmpy.data.shards import write_shard
from llmpy.errors import UserError
from llmpy.formats.checkpoint import load_checkpoint, load_weights, save_checkpoint
from llmpy.formats.safetensors import load_safetensors, read_safetensors_header, save_safetensors
from llmpy.models.gpt2 import GPT2Config, spec

CFG = GPT2Config(max_seq_len=16, vocab_size=200, padded_vocab_size=256, num_layers=2, num_heads=2, channels=8)


def rand(seed):
    r = np.random.default_rng(seed)
    return {s.name: r.standard_normal(s.shape).astype(np.float32) for s in spec(CFG)}


def header_of(path):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), 8 + n


def flip(path, offset, bit=0):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ (1 << bit)]))


def full_checkpoint(path):
    compute = {n: (a.view(np.uint32) >> 16).astype(np.uint16) for n, a in rand(4).items()}
    save_checkpoint(path, CFG, rand(1), adam_m=rand(2), adam_v=rand(3), state={"step": 17}, compute_bf16=compute)


@pytest.mark.parametrize("tensor", ["wte", "qkvw", "lnfb", "adam_m.fcw", "adam_v.wpe", "compute_bf16.ln2w"])
def test_flipped_data_bit_is_damage_naming_tensor_and_file(tmp_path, tensor):
    p = tmp_path / "ck.safetensors"
    full_checkpoint(p)
    header, start = header_of(p)
    lo, hi = header[tensor]["data_offsets"]
    flip(p, start + (lo + hi) // 2, bit=3)
    with pytest.raises(UserError) as e:
        load_checkpoint(p)
    msg = str(e.value)
    assert "damaged" in msg and f"'{tensor}'" in msg and str(p) in msg and "\n" not in msg
    if "." not in tensor:  # the weights alone are checked too (load_weights: convert, sample, eval, --init)
        with pytest.raises(UserError, match=f"damaged: tensor '{tensor}'"):
            load_weights(p)


def test_every_tensor_gets_a_crc_of_its_bytes(tmp_path):
    p = tmp_path / "ck.safetensors"
    full_checkpoint(p)
    header, start = header_of(p)
    raw = p.read_bytes()
    table = json.loads(header.pop("__metadata__").pop("llmpy.crc32"))
    assert set(table) == set(header) | {"__metadata__"} and len(header) == 4 * len(spec(CFG))
    for name, e in header.items():
        lo, hi = e["data_offsets"]
        assert int(table[name], 16) == zlib.crc32(raw[start + lo:start + hi]), name


def test_changed_metadata_is_damage(tmp_path):
    p = tmp_path / "ck.safetensors"
    full_checkpoint(p)
    raw = p.read_bytes()
    i = raw.index(b'\\"step\\": 17')  # the state JSON inside the header: 17 -> 97, still valid JSON
    p.write_bytes(raw[:i + 10] + b"9" + raw[i + 11:])
    with pytest.raises(UserError, match="damaged: its metadata fails its CRC-32 check"):
        load_checkpoint(p)


def test_damaged_checksum_table(tmp_path):
    p = tmp_path / "t.safetensors"
    good = {"a": np.arange(4, dtype=np.float32), "b": np.ones(3, np.int8)}
    for table, match in [("{oops", "checksum table is not valid JSON"),
                         (json.dumps({"a": "00000000"}), "does not list the file's tensors"),
                         (json.dumps({"a": 7, "b": "x", "__metadata__": "y"}), "8-digit hex")]:
        save_safetensors(p, good, {"k": "v"}, checksums=False)
        raw = p.read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        h = json.loads(raw[8:8 + n])
        h["__metadata__"]["llmpy.crc32"] = table
        hb = json.dumps(h).encode()
        hb += b" " * (-len(hb) % 8)
        p.write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n:])
        with pytest.raises(UserError, match=match):
            read_safetensors_header(p)


def test_files_without_checksums_still_load(tmp_path):
    # what save_checkpoint wrote before checksums existed: the same file without the table
    p = tmp_path / "old.safetensors"
    params = rand(5)
    meta = {"format": "llmpy-train-state", "version": "1", "family": "gpt2", "config": json.dumps(CFG.to_dict()),
            "state": json.dumps({"step": 3})}
    save_safetensors(p, params, meta, checksums=False)
    assert "llmpy.crc32" not in p.read_bytes().decode("latin-1")
    ck = load_checkpoint(p)
    assert ck.state == {"step": 3}
    for n, a in params.items():
        np.testing.assert_array_equal(ck.params[n], a)


def test_generic_files_and_names_filter(tmp_path):
    # ZeRO shards and any other file llmpy writes go through save_safetensors: checked by default
    p = tmp_path / "shard.safetensors"
    save_safetensors(p, {"adam_m": np.arange(10, dtype=np.float32), "adam_v": np.ones(6, np.float32)}, {"x": "y"})
    assert load_safetensors(p)[1] == {"x": "y"}  # the table is not part of the metadata callers see
    header, start = header_of(p)
    flip(p, start + header["adam_v"]["data_offsets"][0] + 2, bit=7)
    assert load_safetensors(p, names=["adam_m"])[0]["adam_m"][3] == 3  # only what is read is checked
    with pytest.raises(UserError, match="'adam_v' fails its CRC-32 check"):
        load_safetensors(p)
    with pytest.raises(UserError, match="reserved"):
        save_safetensors(p, {}, {"llmpy.crc32": "{}"})


@pytest.mark.slow
def test_resume_of_a_damaged_checkpoint_stops_and_touches_nothing(tmp_path, capsys):
    rng = np.random.default_rng(0)
    write_shard(tmp_path / "tr_000.bin", rng.integers(0, 50257, 3000))
    out = tmp_path / "run"
    common = ["--device", "cpu", "--no-progress"]
    assert main(["train", "--init", "l2h2c32t32", "--train-data", str(tmp_path / "tr_*.bin"), "-b", "2", "-t", "16",
                 "--steps", "4", "--stop-at", "2", "--val-every", "0", "--sample-tokens", "0", "--out", str(out),
                 *common]) == 0
    ck = out / "checkpoint.safetensors"
    header, start = header_of(ck)
    flip(ck, start + header["adam_v.fcw"]["data_offsets"][0] + 5, bit=6)
    before = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
    capsys.readouterr()
    assert main(["train", "--resume", str(out), *common]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "damaged" in err and "'adam_v.fcw'" in err and str(ck) in err
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()} == before
