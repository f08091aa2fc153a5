"""File formats: bf16 rounding, safetensors, llm.c .bin, HF GPT-2 import/export, training checkpoints, atomic writes.

Expected values come from independent computations (float64 arithmetic, hand-made bytes, torch / the
`safetensors` package where installed), never from the code under test."""
from __future__ import annotations

import json
import os
import struct
import zlib

import numpy as np
import pytest

from llmpy.models.base import pad_vocab
from llmpy.models.gpt2 import GPT2Config, spec
from llmpy.errors import UserError
from llmpy.formats import llmc
from llmpy.formats.atomic import atomic_write
from llmpy.formats.bf16 import bf16_bits_to_fp32, fp32_to_bf16_bits
from llmpy.formats.checkpoint import is_checkpoint, load_checkpoint, load_weights, save_checkpoint
from llmpy.formats.hf import is_hf_model, read_hf_model, write_hf_model
from llmpy.formats.llmc import is_llmc_model, read_llmc_model, write_llmc_model
from llmpy.formats.safetensors import load_safetensors, read_safetensors_header, save_safetensors

# the test models' vocabulary is not GPT-2's: HF exports say they leave the tokenizer out (tested in test_hf_export)
pytestmark = pytest.mark.filterwarnings("ignore:no tokenizer exported")

CFG = GPT2Config(max_seq_len=16, vocab_size=200, padded_vocab_size=256, num_layers=2, num_heads=2, channels=8)


def rand_params(cfg: GPT2Config = CFG, seed: int = 0, zero_pad: bool = False) -> dict[str, np.ndarray]:
    r = np.random.default_rng(seed)
    p = {s.name: r.standard_normal(s.shape).astype(np.float32) for s in spec(cfg)}
    if zero_pad:
        p["wte"][cfg.vocab_size:] = 0
    return p


def assert_params_equal(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for n in a:
        assert a[n].dtype == np.float32 and a[n].shape == b[n].shape, n
        np.testing.assert_array_equal(a[n], b[n], err_msg=n)


# ----------------------------------------------------------------------------------------------- bf16

def bf16_value_f64(bits: np.ndarray) -> np.ndarray:
    """Decode bf16 bit patterns in float64 arithmetic, treating exponent 255 as an ordinary binade (2^128..)
    so the rounding reference can measure the distance to the 'value' just past the largest finite bf16."""
    bits = bits.astype(np.int64)
    sign = np.where(bits & 0x8000, -1.0, 1.0)
    e = (bits >> 7) & 0xFF
    m = (bits & 0x7F).astype(np.float64)
    mag = np.where(e == 0, m / 128.0 * 2.0 ** -126, (1.0 + m / 128.0) * np.exp2(e.astype(np.float64) - 127))
    return sign * mag


def reference_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even by comparing distances to the two bf16 neighbours in float64 (finite x only)."""
    u = x.view(np.uint32)
    lo = (u >> 16).astype(np.int64)           # truncation: neighbour towards zero
    hi = lo + 1                               # next bf16 away from zero
    x64 = x.astype(np.float64)
    d_lo = np.abs(x64 - bf16_value_f64(lo))
    d_hi = np.abs(bf16_value_f64(hi) - x64)
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (lo % 2 == 1))
    return np.where(pick_hi, hi, lo).astype(np.uint16)


def test_bf16_random_bits_match_float64_reference():
    r = np.random.default_rng(1)
    u = r.integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32)
    x = u.view(np.float32)
    x = x[np.isfinite(x)]
    np.testing.assert_array_equal(fp32_to_bf16_bits(x), reference_bf16_bits(x))


def test_bf16_ties_round_to_even():
    # halfway cases built by hand: low 16 bits exactly 0x8000
    cases = {
        1.0 + 2.0**-8: 1.0,                     # between 1 (even) and 1+2^-7 (odd) -> 1
        1.0 + 3 * 2.0**-8: 1.0 + 2.0**-6,       # between 1+2^-7 (odd) and 1+2^-6 (even) -> up
        -(1.0 + 2.0**-8): -1.0,
        1.0 + 2.0**-8 + 2.0**-20: 1.0 + 2.0**-7,  # just above the tie -> up
    }
    x = np.array(list(cases), dtype=np.float32)
    want = np.array(list(cases.values()), dtype=np.float32)
    got = bf16_bits_to_fp32(fp32_to_bf16_bits(x))
    np.testing.assert_array_equal(got, want)
    # a tie that carries into the exponent: largest mantissa 0x7F, odd -> rounds up to the next power of 2
    x = np.array([0x3FFF8000], dtype=np.uint32).view(np.float32)
    assert fp32_to_bf16_bits(x)[0] == 0x4000


def test_bf16_inf_nan_overflow_zero():
    bits = np.array([0x7F800000, 0xFF800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F7FFF, 0x80000000, 0x00000001,
                     0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FBFFFFF, 0xFF800001], dtype=np.uint32)
    out = fp32_to_bf16_bits(bits.view(np.float32))
    assert out[0] == 0x7F80 and out[1] == 0xFF80              # +-inf stay inf
    assert out[2] == 0x7F80 and out[3] == 0xFF80              # float32 max rounds to inf (beyond bf16 midpoint)
    assert out[4] == 0x7F7F                                   # just below the midpoint: largest finite bf16
    assert out[5] == 0x8000                                   # -0 keeps its sign
    assert out[6] == 0x0000                                   # tiniest subnormal rounds to +0
    back = bf16_bits_to_fp32(out[7:])
    assert np.isnan(back).all()                               # every NaN stays NaN, incl. low-bit payloads
    np.testing.assert_array_equal(np.signbit(back), [False, True, False, False, True])


def test_bf16_decode_all_patterns():
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    f = bf16_bits_to_fp32(bits)
    assert f.dtype == np.float32 and f.shape == bits.shape
    exp_all_ones = (bits.astype(np.int64) >> 7 & 0xFF) == 0xFF
    mant = bits.astype(np.int64) & 0x7F
    nan = exp_all_ones & (mant != 0)
    assert np.isnan(f[nan]).all() and not np.isnan(f[~nan]).any()
    inf = exp_all_ones & (mant == 0)
    np.testing.assert_array_equal(f[inf], np.where(bits[inf] & 0x8000, -np.inf, np.inf))
    ok = ~exp_all_ones
    np.testing.assert_array_equal(f[ok].astype(np.float64), bf16_value_f64(bits[ok]))
    # every bf16 value is exact in fp32, so the way back must give the same bits
    np.testing.assert_array_equal(fp32_to_bf16_bits(f[~nan]), bits[~nan])


def test_bf16_shapes_and_dtypes():
    x = np.float32(1.5) * np.ones((2, 3, 4), dtype=np.float32)
    assert fp32_to_bf16_bits(x).shape == (2, 3, 4)
    assert fp32_to_bf16_bits(np.array(3.0, dtype=np.float32)).shape == ()
    assert bf16_bits_to_fp32(np.array(0x3F80, dtype=np.uint16)) == 1.0
    with pytest.raises(TypeError):
        fp32_to_bf16_bits(np.ones(3))  # float64 would be rounded twice


def test_bf16_matches_torch():
    torch = pytest.importorskip("torch")
    r = np.random.default_rng(2)
    with np.errstate(over="ignore"):  # magnitudes from fp32 subnormals to overflow (inf)
        scaled = (r.standard_normal(50_000) * 10.0 ** r.integers(-44, 40, 50_000)).astype(np.float32)
    x = np.concatenate([scaled, r.integers(0, 2**32, 50_000, dtype=np.uint64).astype(np.uint32).view(np.float32)])
    x = x[~np.isnan(x)]
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(fp32_to_bf16_bits(x), want)


# ----------------------------------------------------------------------------------------- safetensors

def every_dtype(r: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "f64": r.standard_normal((3, 2)), "f32": r.standard_normal((4,)).astype(np.float32),
        "f16": r.standard_normal((2, 2, 2)).astype(np.float16),
        "i64": r.integers(-2**62, 2**62, (5,)), "i32": r.integers(-2**31, 2**31, (2, 3)).astype(np.int32),
        "i16": r.integers(-2**15, 2**15, (3,)).astype(np.int16), "i8": np.arange(-128, 128, dtype=np.int8),
        "u8": r.integers(0, 256, (7,)).astype(np.uint8), "u16": r.integers(0, 2**16, (3, 1)).astype(np.uint16),
        "u32": np.array([0, 2**32 - 1], dtype=np.uint32), "u64": np.array([2**64 - 1], dtype=np.uint64),
        "bool": np.array([[True, False, True]]), "scalar": np.array(2.5, dtype=np.float32),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }


def test_safetensors_roundtrip_every_dtype(tmp_path):
    r = np.random.default_rng(3)
    t = every_dtype(r)
    bf_vals = np.array([1.0, -2.5, 0.0078125, 2.0**127 * 1.5, -0.0], dtype=np.float32)  # all exact in bf16
    bf_bits = (bf_vals.view(np.uint32) >> 16).astype(np.uint16)
    meta = {"format": "pt", "note": "ünïcode ✓"}
    p = tmp_path / "t.safetensors"
    save_safetensors(p, t, meta, bf16={"bf": bf_bits})
    got, gmeta = load_safetensors(p)
    assert gmeta == meta
    assert set(got) == set(t) | {"bf"}
    for k, a in t.items():
        assert got[k].dtype == a.dtype and got[k].shape == a.shape, k
        np.testing.assert_array_equal(got[k], a)
    assert got["bf"].dtype == np.float32
    np.testing.assert_array_equal(got["bf"], bf_vals)
    assert np.signbit(got["bf"][4])
    raw, _ = load_safetensors(p, bf16_as_fp32=False)
    assert raw["bf"].dtype == np.uint16
    np.testing.assert_array_equal(raw["bf"], bf_bits)
    infos, _ = read_safetensors_header(p)
    assert infos["bf"].dtype == "BF16" and infos["u16"].dtype == "U16" and infos["bool"].dtype == "BOOL"


def test_safetensors_layout_bytes(tmp_path):
    p = tmp_path / "t.safetensors"
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([1, 2, 3], dtype=np.uint8)
    c = np.array([7], dtype=np.int64)
    save_safetensors(p, {"b": b, "a": a, "c": c}, {"k": "v"})
    blob = p.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    assert n % 8 == 0 and len(blob) == 8 + n + a.nbytes + b.nbytes + c.nbytes
    text = blob[8:8 + n].decode()
    assert text.startswith("{") and text == text.rstrip(" ") + " " * (len(text) - len(text.rstrip(" ")))
    header = json.loads(text)
    crcs = json.loads(header["__metadata__"].pop("llmpy.crc32"))
    assert header["__metadata__"] == {"k": "v"}
    assert int(crcs.pop("__metadata__"), 16) == zlib.crc32(b'{"k":"v"}')  # canonical JSON of the rest
    data = blob[8 + n:]
    spans = []
    for name, arr in {"a": a, "b": b, "c": c}.items():
        e = header[name]
        assert e["shape"] == list(arr.shape)
        lo, hi = e["data_offsets"]
        assert lo % arr.itemsize == 0                          # aligned within the data
        assert data[lo:hi] == arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        assert int(crcs.pop(name), 16) == zlib.crc32(data[lo:hi])
        spans.append((lo, hi))
    assert crcs == {}
    spans.sort()
    assert spans[0][0] == 0 and spans[-1][1] == len(data)
    assert all(x[1] == y[0] for x, y in zip(spans, spans[1:]))


def test_safetensors_noncontiguous_bigendian_and_no_alias(tmp_path):
    p = tmp_path / "t.safetensors"
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    be = np.arange(5, dtype=">i4")
    save_safetensors(p, {"t": base.T, "be": be})
    got, _ = load_safetensors(p)
    np.testing.assert_array_equal(got["t"], base.T)
    np.testing.assert_array_equal(got["be"], np.arange(5))
    # overwrite the file in place: arrays already returned must not change
    before = got["t"].copy()
    with open(p, "r+b") as f:
        f.seek(-got["be"].nbytes - 1, os.SEEK_END)
        f.write(b"\xff")
    np.testing.assert_array_equal(got["t"], before)
    got["t"][0, 0] = 99.0  # writable


def test_safetensors_names_filter(tmp_path):
    p = tmp_path / "t.safetensors"
    save_safetensors(p, {"a": np.ones(2, np.float32), "b": np.zeros(3, np.int8)})
    got, _ = load_safetensors(p, names=["b"])
    assert list(got) == ["b"]
    with pytest.raises(UserError, match="no tensor 'c'"):
        load_safetensors(p, names=["c"])


def test_safetensors_package_reads_ours_and_we_read_theirs(tmp_path):
    st_np = pytest.importorskip("safetensors.numpy")
    from safetensors import safe_open
    r = np.random.default_rng(4)
    t = {k: v for k, v in every_dtype(r).items()}
    ours = tmp_path / "ours.safetensors"
    save_safetensors(ours, t, {"format": "np", "x": "y"})
    theirs_view = st_np.load_file(str(ours))
    assert set(theirs_view) == set(t)
    for k, a in t.items():
        assert theirs_view[k].dtype == a.dtype, k
        np.testing.assert_array_equal(theirs_view[k], a)
    with safe_open(str(ours), "np") as f:
        meta = f.metadata()
    assert set(json.loads(meta.pop("llmpy.crc32"))) == set(t) | {"__metadata__"}
    assert meta == {"format": "np", "x": "y"}
    theirs = tmp_path / "theirs.safetensors"
    st_np.save_file(t, str(theirs), metadata={"a": "b"})
    got, meta = load_safetensors(theirs)
    assert meta == {"a": "b"}
    for k, a in t.items():
        assert got[k].dtype == a.dtype, k
        np.testing.assert_array_equal(got[k], a)


def test_safetensors_package_bf16(tmp_path):
    pytest.importorskip("safetensors")
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file, save_file
    x = torch.randn(5, 3).to(torch.bfloat16)
    theirs = tmp_path / "theirs.safetensors"
    save_file({"x": x}, str(theirs))
    got, _ = load_safetensors(theirs)
    np.testing.assert_array_equal(got["x"], x.float().numpy())
    ours = tmp_path / "ours.safetensors"
    bits = x.view(torch.int16).numpy().view(np.uint16)
    save_safetensors(ours, {}, bf16={"x": bits})
    back = load_file(str(ours))["x"]
    assert back.dtype == torch.bfloat16 and torch.equal(back, x)


def write_raw(p, header: bytes | dict, data: bytes = b"", n: int | None = None) -> None:
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    p.write_bytes(struct.pack("<Q", len(hb) if n is None else n) + hb + data)


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
CORRUPT_SAFETENSORS = {
    "empty": (b"", None, b""),
    "five bytes": (b"\x01\x02\x03\x04\x05", None, None),
    "size past end": (b"{}", 1000, b""),
    "bad json": (b"{not json", None, b""),
    "not utf8": (b'{"\xff": 1}', None, b""),
    "json list": (b"[1, 2]", None, b""),
    "duplicate key": (b'{"a":' + json.dumps(F32x2).encode() + b',"a":' + json.dumps(F32x2).encode() + b"}", None,
                      bytes(8)),
    "unknown dtype": ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, None, bytes(8)),
    "negative dim": ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, None, bytes(8)),
    "bool dim": ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, None, bytes(4)),
    "size mismatch": ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, None, bytes(8)),
    "begin after end": ({"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}, None, bytes(8)),
    "out of range": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, None, bytes(8)),
    "overlap": ({"a": F32x2, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, None, bytes(12)),
    "gap": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, None, bytes(8)),
    "truncated": ({"a": F32x2}, None, bytes(5)),
    "trailing": ({"a": F32x2}, None, bytes(12)),
    "metadata not str": ({"__metadata__": {"k": 1}, "a": F32x2}, None, bytes(8)),
    "bool byte 2": ({"a": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}}, None, b"\x01\x02"),
    "absurd empty shape": ({"a": {"dtype": "F64", "shape": [0, 2**62], "data_offsets": [0, 0]}}, None, b""),
}


@pytest.mark.parametrize("case", list(CORRUPT_SAFETENSORS))
def test_safetensors_corrupt(tmp_path, case):
    header, n, data = CORRUPT_SAFETENSORS[case]
    p = tmp_path / "bad.safetensors"
    if data is None:
        p.write_bytes(header)
    else:
        write_raw(p, header, data, n)
    with pytest.raises(UserError, match="bad.safetensors"):
        load_safetensors(p)


def test_safetensors_header_over_100mb(tmp_path):
    p = tmp_path / "huge.safetensors"
    with open(p, "wb") as f:  # sparse 200 MB file whose header claims 150 MB: refused before reading it
        f.write(struct.pack("<Q", 150_000_000))
        f.truncate(200_000_000)
    with pytest.raises(UserError, match="header size 150000000 is absurd"):
        load_safetensors(p)


def test_safetensors_missing_and_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_safetensors(tmp_path / "nope.safetensors")
    with pytest.raises(UserError, match="folder"):
        load_safetensors(tmp_path)


def test_safetensors_writer_rejects_bad_input(tmp_path):
    p = tmp_path / "t.safetensors"
    with pytest.raises(UserError, match="unsupported dtype complex"):
        save_safetensors(p, {"c": np.ones(2, dtype=np.complex64)})
    with pytest.raises(UserError, match="uint16 bits"):
        save_safetensors(p, {}, bf16={"b": np.ones(2, dtype=np.float32)})
    with pytest.raises(UserError, match="bad tensor name"):
        save_safetensors(p, {"__metadata__": np.ones(2, dtype=np.float32)})
    with pytest.raises(UserError, match="strings"):
        save_safetensors(p, {}, {"k": 1})
    assert not p.exists()


# ----------------------------------------------------------------------------------------------- llm.c

def test_llmc_fp32_roundtrip_and_bytes(tmp_path):
    params = rand_params()
    p = tmp_path / "m.bin"
    write_llmc_model(p, CFG, params)
    n = CFG.num_params()
    assert p.stat().st_size == 1024 + 4 * n
    h = np.fromfile(p, dtype="<i4", count=256)
    np.testing.assert_array_equal(h[:8], [20240326, 3, 16, 200, 2, 2, 8, 256])
    assert not h[8:].any()
    body = np.fromfile(p, dtype="<f4", offset=1024)
    np.testing.assert_array_equal(body, np.concatenate([params[s.name].ravel() for s in spec(CFG)]))
    cfg, got = read_llmc_model(p)
    assert cfg == CFG
    assert list(got) == [s.name for s in spec(CFG)]
    assert_params_equal(got, params)
    assert is_llmc_model(p)


def test_llmc_bf16_roundtrip_within_rounding(tmp_path):
    params = rand_params(seed=5)
    p = tmp_path / "m_bf16.bin"
    write_llmc_model(p, CFG, params, dtype="bf16")
    assert p.stat().st_size == 1024 + 2 * CFG.num_params()
    h = np.fromfile(p, dtype="<i4", count=256)
    np.testing.assert_array_equal(h[:8], [20240326, 5, 16, 200, 2, 2, 8, 256])
    cfg, got = read_llmc_model(p)
    assert cfg == CFG
    for name, a in params.items():
        g = got[name]
        assert g.dtype == np.float32 and g.shape == a.shape
        assert not (g.view(np.uint32) & 0xFFFF).any()          # representable in bf16
        # 8 significant bits: half an ulp is at most 2^-8 relative
        assert np.all(np.abs(g.astype(np.float64) - a) <= 2.0**-8 * np.abs(a.astype(np.float64))), name
    body = np.fromfile(p, dtype="<u2", offset=1024)
    assert body[0] == got["wte"].ravel()[:1].view(np.uint32)[0] >> 16


def header_bytes(vals) -> bytes:
    h = np.zeros(256, dtype="<i4")
    h[:len(vals)] = vals
    return h.tobytes()


def good_header():
    return [20240326, 3, 16, 200, 2, 2, 8, 256]


@pytest.mark.parametrize("case", ["empty", "short", "header only", "truncated", "trailing", "magic", "version 4",
                                  "version 1", "vp zero", "vp below v", "negative", "heads"])
def test_llmc_corrupt(tmp_path, case):
    p = tmp_path / "m.bin"
    write_llmc_model(p, CFG, rand_params())
    blob = p.read_bytes()
    body = blob[1024:]
    h = good_header()
    edits = {"magic": (0, 20240327), "version 4": (1, 4), "version 1": (1, 1), "vp zero": (7, 0),
             "vp below v": (7, 199), "negative": (4, -2), "heads": (5, 3)}
    if case == "empty":
        blob = b""
    elif case == "short":
        blob = blob[:1000]
    elif case == "header only":
        blob = blob[:1024]
    elif case == "truncated":
        blob = blob[:-4]
    elif case == "trailing":
        blob = blob + b"\0\0"
    else:
        i, v = edits[case]
        h[i] = v
        blob = header_bytes(h) + body
    p.write_bytes(blob)
    with pytest.raises(UserError, match="m.bin"):
        read_llmc_model(p)


def test_llmc_misc(tmp_path):
    assert not is_llmc_model(tmp_path / "missing.bin")
    st = tmp_path / "x.safetensors"
    save_safetensors(st, {"a": np.ones(3, np.float32)})
    assert not is_llmc_model(st)
    with pytest.raises(UserError, match="does not exist"):
        read_llmc_model(tmp_path / "missing.bin")
    params = rand_params()
    del params["lnfb"]
    with pytest.raises(UserError, match="missing lnfb"):
        write_llmc_model(tmp_path / "m.bin", CFG, params)
    params = rand_params()
    params["qkvw"] = params["qkvw"][:, :, :4]
    with pytest.raises(UserError, match="qkvw"):
        write_llmc_model(tmp_path / "m.bin", CFG, params)
    with pytest.raises(UserError, match="fp16"):
        write_llmc_model(tmp_path / "m.bin", CFG, rand_params(), dtype="fp16")
    assert not (tmp_path / "m.bin").exists()


# ------------------------------------------------------------------------------------------------- HF

def test_hf_roundtrip_and_disk_layout(tmp_path):
    params = rand_params(seed=6, zero_pad=True)
    d = tmp_path / "gpt2"
    write_hf_model(d, CFG, params)
    cfg, got = read_hf_model(d)
    assert cfg == GPT2Config(max_seq_len=16, vocab_size=200, padded_vocab_size=pad_vocab(200), num_layers=2,
                             num_heads=2, channels=8)
    assert_params_equal(got, params)
    raw, meta = load_safetensors(d / "model.safetensors")
    assert meta.get("format") == "pt"
    assert raw["wte.weight"].shape == (200, 8)
    np.testing.assert_array_equal(raw["wte.weight"], params["wte"][:200])
    C = CFG.channels
    for i in range(CFG.num_layers):
        assert raw[f"h.{i}.attn.c_attn.weight"].shape == (C, 3 * C)
        np.testing.assert_array_equal(raw[f"h.{i}.attn.c_attn.weight"], params["qkvw"][i].T)
        np.testing.assert_array_equal(raw[f"h.{i}.attn.c_proj.weight"], params["attprojw"][i].T)
        assert raw[f"h.{i}.mlp.c_fc.weight"].shape == (C, 4 * C)
        np.testing.assert_array_equal(raw[f"h.{i}.mlp.c_fc.weight"], params["fcw"][i].T)
        assert raw[f"h.{i}.mlp.c_proj.weight"].shape == (4 * C, C)
        np.testing.assert_array_equal(raw[f"h.{i}.mlp.c_proj.weight"], params["fcprojw"][i].T)
        np.testing.assert_array_equal(raw[f"h.{i}.attn.c_attn.bias"], params["qkvb"][i])
        np.testing.assert_array_equal(raw[f"h.{i}.ln_2.weight"], params["ln2w"][i])
    assert all(a.dtype == np.float32 for a in raw.values())
    conf = json.loads((d / "config.json").read_text())
    assert conf["model_type"] == "gpt2" and conf["architectures"] == ["GPT2LMHeadModel"]
    assert (conf["n_layer"], conf["n_head"], conf["n_embd"], conf["n_positions"], conf["n_ctx"],
            conf["vocab_size"]) == (2, 2, 8, 16, 16, 200)
    assert conf["layer_norm_epsilon"] == 1e-5 and conf["activation_function"] == "gelu_new"
    assert is_hf_model(d) and is_hf_model(d / "model.safetensors")


def test_hf_padding_rows_dropped(tmp_path):
    params = rand_params(seed=7)  # random (non-zero) padded rows
    write_hf_model(tmp_path / "w.safetensors", CFG, params)
    _, got = read_hf_model(tmp_path / "w.safetensors")
    np.testing.assert_array_equal(got["wte"][:200], params["wte"][:200])
    assert not got["wte"][200:].any()


def hf_tensors(params) -> dict[str, np.ndarray]:
    """HF layout built independently of hf.py (by transposing by hand)."""
    t = {"wte.weight": params["wte"][:200], "wpe.weight": params["wpe"], "ln_f.weight": params["lnfw"],
         "ln_f.bias": params["lnfb"]}
    for i in range(CFG.num_layers):
        t |= {f"h.{i}.ln_1.weight": params["ln1w"][i], f"h.{i}.ln_1.bias": params["ln1b"][i],
              f"h.{i}.attn.c_attn.weight": params["qkvw"][i].T, f"h.{i}.attn.c_attn.bias": params["qkvb"][i],
              f"h.{i}.attn.c_proj.weight": params["attprojw"][i].T, f"h.{i}.attn.c_proj.bias": params["attprojb"][i],
              f"h.{i}.ln_2.weight": params["ln2w"][i], f"h.{i}.ln_2.bias": params["ln2b"][i],
              f"h.{i}.mlp.c_fc.weight": params["fcw"][i].T, f"h.{i}.mlp.c_fc.bias": params["fcb"][i],
              f"h.{i}.mlp.c_proj.weight": params["fcprojw"][i].T, f"h.{i}.mlp.c_proj.bias": params["fcprojb"][i]}
    return t


def write_hf_config(d, **over):
    conf = {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 8, "n_ctx": 16, "vocab_size": 200} | over
    (d / "config.json").write_text(json.dumps(conf))


def test_hf_prefix_buffers_tied_head(tmp_path):
    params = rand_params(seed=8, zero_pad=True)
    t = {"transformer." + k: v for k, v in hf_tensors(params).items()}
    t["lm_head.weight"] = params["wte"][:200]
    for i in range(CFG.num_layers):
        t[f"transformer.h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 16, 16), np.float32))
        t[f"transformer.h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    save_safetensors(tmp_path / "model.safetensors", t)
    write_hf_config(tmp_path)  # n_ctx only (older configs), no n_positions
    assert is_hf_model(tmp_path)
    cfg, got = read_hf_model(tmp_path)
    assert cfg == CFG
    assert_params_equal(got, params)
    # bf16 HF files are read too (converted to float32)
    bits = {k: (np.ascontiguousarray(v, np.float32).view(np.uint32) >> 16).astype(np.uint16)
            for k, v in hf_tensors(params).items()}
    save_safetensors(tmp_path / "model.safetensors", {}, bf16=bits)
    _, got = read_hf_model(tmp_path)
    np.testing.assert_array_equal(got["qkvw"][1], (params["qkvw"][1].view(np.uint32) & 0xFFFF0000).view(np.float32))


@pytest.mark.parametrize("case", ["untied head", "missing tensor", "extra tensor", "config mismatch", "activation",
                                  "bad config json", "no config, C not multiple of 64", "int dtype"])
def test_hf_errors(tmp_path, case):
    params = rand_params(seed=9, zero_pad=True)
    t = hf_tensors(params)
    write_hf_config(tmp_path)
    if case == "untied head":
        t["lm_head.weight"] = params["wte"][:200] + 1
    elif case == "missing tensor":
        del t["h.1.mlp.c_fc.bias"]
    elif case == "extra tensor":
        t["h.0.crossattention.q_attn.weight"] = np.ones((8, 8), np.float32)
    elif case == "config mismatch":
        write_hf_config(tmp_path, n_embd=16)
    elif case == "activation":
        write_hf_config(tmp_path, activation_function="relu")
    elif case == "bad config json":
        (tmp_path / "config.json").write_text("{oops")
    elif case == "no config, C not multiple of 64":
        (tmp_path / "config.json").unlink()
    elif case == "int dtype":
        t["ln_f.bias"] = np.ones(8, np.int32)
    save_safetensors(tmp_path / "model.safetensors", t)
    with pytest.raises(UserError):
        read_hf_model(tmp_path)


def test_hf_gpt2_without_config_json_is_refused_not_guessed(tmp_path):
    """The number of heads is in no tensor's shape: without config.json it would be a guess (here a wrong one: a
    head size of 64 would make 2 heads 1)."""
    cfg = GPT2Config(max_seq_len=8, vocab_size=130, padded_vocab_size=256, num_layers=1, num_heads=2, channels=128)
    write_hf_model(tmp_path, cfg, rand_params(cfg, seed=10, zero_pad=True))
    assert read_hf_model(tmp_path / "model.safetensors")[0] == cfg
    (tmp_path / "config.json").unlink()
    with pytest.raises(UserError, match="needs its config.json beside it"):
        read_hf_model(tmp_path / "model.safetensors")


# ---------------------------------------------------------------------------------------- checkpoints

def test_checkpoint_roundtrip(tmp_path):
    params, m, v = rand_params(seed=11), rand_params(seed=12), rand_params(seed=13)
    rng_state = np.random.default_rng(14).bit_generator.state     # 128-bit integers inside
    state = {"step": 17, "loader": {"shard": 2, "pos": 12345}, "rng": rng_state, "lr": 6e-4, "args": ["--x", 1]}
    p = tmp_path / "ck.safetensors"
    save_checkpoint(p, CFG, params, adam_m=m, adam_v=v, state=state)
    ck = load_checkpoint(p)
    assert ck.cfg == CFG and ck.state == state
    assert_params_equal(ck.params, params)
    assert_params_equal(ck.adam_m, m)
    assert_params_equal(ck.adam_v, v)
    g = np.random.default_rng()
    g.bit_generator.state = ck.state["rng"]
    assert g.random() == np.random.default_rng(14).random()
    _, meta = read_safetensors_header(p)
    assert meta["format"] == "llmpy-train-state" and meta["version"] == "1"
    assert json.loads(meta["config"]) == CFG.to_dict()
    assert is_checkpoint(p) and not is_hf_model(p) and not is_llmc_model(p)
    w = load_checkpoint(p, weights_only=True)
    assert w.adam_m is None and w.adam_v is None
    assert_params_equal(w.params, params)


def test_checkpoint_weights_only(tmp_path):
    p = tmp_path / "w.safetensors"
    params = rand_params(seed=15)
    save_checkpoint(p, CFG, params)
    ck = load_checkpoint(p)
    assert ck.adam_m is None and ck.adam_v is None and ck.state == {}
    assert_params_equal(ck.params, params)
    infos, _ = read_safetensors_header(p)
    assert set(infos) == {s.name for s in spec(CFG)}


def ck_meta(cfg=CFG, **over):
    return {"format": "llmpy-train-state", "version": "1", "config": json.dumps(cfg.to_dict()), "state": "{}"} | over


@pytest.mark.parametrize("case", ["missing", "extra", "wrong shape", "wrong dtype", "half the moments",
                                  "bad config", "bad version"])
def test_checkpoint_bad_tensors(tmp_path, case):
    t = dict(rand_params(seed=16))
    t |= {f"adam_m.{n}": a for n, a in rand_params(seed=17).items()}
    t |= {f"adam_v.{n}": a for n, a in rand_params(seed=18).items()}
    meta = ck_meta()
    match = "ck.safetensors"
    if case == "missing":
        del t["adam_v.fcb"]
        match = "missing adam_v.fcb"
    elif case == "extra":
        t["bonus"] = np.ones(3, np.float32)
        match = "unexpected bonus"
    elif case == "wrong shape":
        t["wpe"] = np.ones((8, 8), np.float32)
        match = "wpe"
    elif case == "wrong dtype":
        t["lnfw"] = t["lnfw"].astype(np.float64)
        match = "lnfw"
    elif case == "half the moments":
        t = {k: a for k, a in t.items() if not k.startswith("adam_v.")}
        match = "missing adam_v"
    elif case == "bad config":
        meta = ck_meta(config='{"channels": 8}')
    elif case == "bad version":
        meta = ck_meta(version="2")
    p = tmp_path / "ck.safetensors"
    save_safetensors(p, t, meta)
    with pytest.raises(UserError, match=match):
        load_checkpoint(p)


def test_checkpoint_save_errors(tmp_path):
    p = tmp_path / "ck.safetensors"
    with pytest.raises(UserError, match="together"):
        save_checkpoint(p, CFG, rand_params(), adam_m=rand_params())
    with pytest.raises(UserError, match="JSON"):
        save_checkpoint(p, CFG, rand_params(), state={"x": object()})
    bad = rand_params()
    bad["fcw"] = bad["fcw"][:1]
    with pytest.raises(UserError, match="fcw"):
        save_checkpoint(p, CFG, rand_params(), adam_m=bad, adam_v=rand_params())
    assert not p.exists()


def test_load_weights_detects_formats(tmp_path):
    params = rand_params(seed=19, zero_pad=True)
    write_llmc_model(tmp_path / "m.bin", CFG, params)
    save_checkpoint(tmp_path / "ck.safetensors", CFG, params, adam_m=params, adam_v=params, state={"step": 1})
    write_hf_model(tmp_path / "hf", CFG, params)
    for src in (tmp_path / "m.bin", tmp_path / "ck.safetensors", tmp_path / "hf",
                tmp_path / "hf" / "model.safetensors"):
        cfg, got = load_weights(src)
        assert cfg == CFG, src
        assert_params_equal(got, params)
    (tmp_path / "junk.bin").write_bytes(b"\x00" * 2000)
    (tmp_path / "junk").write_bytes(b"\x00" * 2000)
    save_safetensors(tmp_path / "other.safetensors", {"w": np.ones(2, np.float32)})
    for bad, match in [("junk.bin", "not an llm.c model: bad magic 0"),
                       ("junk", "starts with neither llm.c's magic number nor a safetensors header"),
                       ("other.safetensors", ("a safetensors file but neither an llmpy checkpoint nor a Hugging "
                                              "Face model of a known family; its tensors: w"))]:
        with pytest.raises(UserError, match=match):
            load_weights(tmp_path / bad)
    with pytest.raises(UserError, match="does not exist"):
        load_weights(tmp_path / "missing.bin")


# --------------------------------------------------------------------------------------------- atomic

def leftovers(folder) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.endswith(".tmp"))


def test_atomic_write_failure_keeps_previous_file(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"previous")

    def boom(f):
        f.write(b"half of the new ")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(p, boom)
    assert p.read_bytes() == b"previous"
    assert leftovers(tmp_path) == []
    atomic_write(p, lambda f: f.write(b"new"))
    assert p.read_bytes() == b"new" and leftovers(tmp_path) == []
    umask = os.umask(0)
    os.umask(umask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~umask


def test_atomic_write_failure_inside_a_writer(tmp_path, monkeypatch):
    p = tmp_path / "m.bin"
    write_llmc_model(p, CFG, rand_params())
    before = p.read_bytes()
    calls = []

    def failing_convert(x):
        calls.append(1)
        if len(calls) == 3:  # after a header and two tensors went to the temporary file
            raise KeyboardInterrupt
        return fp32_to_bf16_bits(x)

    monkeypatch.setattr(llmc, "fp32_to_bf16_bits", failing_convert)
    with pytest.raises(KeyboardInterrupt):
        write_llmc_model(p, CFG, rand_params(seed=1), dtype="bf16")
    assert p.read_bytes() == before and leftovers(tmp_path) == []


def test_atomic_write_missing_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        atomic_write(tmp_path / "no" / "f.bin", lambda f: f.write(b"x"))
