"""Packed ternary inference (formats/ternary.py, `llmpy convert --to ternary`): the codes of both packings, the file
(CRC-checked, malformed codes and scales refused, never trained from), and the packed model giving the latent
model's logits bit for bit and its tokens on the CPU."""
import numpy as np
import pytest

from llmpy.backends import get_backend
from llmpy.cli import main
from llmpy.config import config_from_name
from llmpy.data.shards import write_shard
from llmpy.errors import UserError
from llmpy.formats.bf16 import bf16_bits_to_fp32, fp32_to_bf16_bits
from llmpy.formats.checkpoint import load_weights, save_checkpoint
from llmpy.formats.safetensors import load_safetensors, save_safetensors
from llmpy.formats.ternary import PackedTernary, pack, packed_size, read_ternary, write_ternary
from llmpy.layers import quantize_weight, unpack_codes
from llmpy.models.base import inference_model
from llmpy.models.decode import decoder, generate
from llmpy.models.mmfree import MMFree
from llmpy.train import TrainConfig, run
from mmfree_weights import trained_like as _trained_like

NAME = "mmfree:l2d64i96v300t32"


@pytest.mark.parametrize("packing, per_byte", [("base3", 5), ("2bit", 4)])
@pytest.mark.parametrize("K", [1, 4, 5, 63, 64])
def test_codes_round_trip(packing, per_byte, K):
    q = np.random.default_rng(K).integers(-1, 2, (7, K)).astype(np.int8)
    codes = pack(q, packing)
    assert codes.dtype == np.uint8 and codes.shape == (7, -(-K // per_byte))
    np.testing.assert_array_equal(unpack_codes(codes, K, packing), q)
    if packing == "base3":
        assert codes.max() <= 242


def trained_like(seed=0):
    return _trained_like(NAME, seed)


@pytest.mark.parametrize("packing", ["base3", "2bit"])
def test_the_file_holds_the_codes_and_scales_the_model_computes_with(tmp_path, packing):
    cfg, p = trained_like()
    write_ternary(tmp_path / "t.safetensors", cfg, p, packing)
    cfg2, q = read_ternary(tmp_path / "t.safetensors")
    assert cfg2 == cfg
    for name in MMFree.TERNARY:
        assert isinstance(q[name], PackedTernary)
        ws = p[name] if p[name].ndim == 3 else p[name][None]
        rows = cfg.vocab_size if name == "lm_head" else None
        for i, w in enumerate(ws):
            qw, sw = quantize_weight(w, rows)
            codes = q[name].codes[i] if p[name].ndim == 3 else q[name].codes
            np.testing.assert_array_equal(unpack_codes(codes, w.shape[1], packing), qw.astype(np.int8))
            assert float(np.atleast_1d(q[name].scale)[i]) == np.float32(sw)
    np.testing.assert_array_equal(q["wte"][:cfg.vocab_size], bf16_bits_to_fp32(fp32_to_bf16_bits(p["wte"][:300])))
    assert np.all(q["wte"][cfg.vocab_size:] == 0)
    for name in ("lower_bounds", "gnormw", "downn", "lnfw"):
        np.testing.assert_array_equal(q[name], p[name])


@pytest.mark.parametrize("packing", ["base3", "2bit"])
def test_packed_model_gives_the_latent_models_logits_and_tokens(tmp_path, packing):
    cfg, p = trained_like(1)
    write_ternary(tmp_path / "t.safetensors", cfg, p, packing)
    _, q = read_ternary(tmp_path / "t.safetensors")
    p["wte"] = bf16_bits_to_fp32(fp32_to_bf16_bits(p["wte"]))  # the one rounding the file makes
    x = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16)).astype(np.int32)
    be = get_backend("cpu")
    latent, packed = inference_model(cfg, p, be, 2, 16), inference_model(cfg, q, be, 2, 16)
    assert packed.is_packed and "iw" not in packed.params.shapes
    latent.forward(x)
    packed.forward(x)
    np.testing.assert_array_equal(packed.acts["logits"], latent.acts["logits"])  # bit for bit
    toks = [generate(decoder(cfg, w, be), [1, 2, 3], 40, rng=np.random.default_rng(7), temperature=1.0)
            for w in (p, q)]
    assert toks[0] == toks[1]


@pytest.mark.parametrize("packing", ["base3", "2bit"])
@pytest.mark.parametrize("K", [5, 63, 128])
def test_a_few_rows_run_from_the_codes_bit_for_bit(packing, K):
    """bitlinear_packed_forward: up to CODE_ROWS rows from the codes' tables (code_products), more rows by unpacking;
    both give bitlinear_forward's bits from the latent weights."""
    from llmpy.layers.bitlinear import CODE_ROWS, bitlinear_forward, bitlinear_packed_forward
    r = np.random.default_rng(K)
    w = r.standard_normal((24, K)).astype(np.float32)
    qw, sw = quantize_weight(w)
    codes, gamma = pack(qw, packing), (1 + 0.1 * r.standard_normal(K)).astype(np.float32)
    for M in (1, 3, CODE_ROWS, CODE_ROWS + 1, 16):
        x = r.standard_normal((M, K)).astype(np.float32)
        want, got = np.empty((M, 24), np.float32), np.full((M, 24), np.nan, np.float32)
        r1, r2 = np.empty(M, np.float32), np.empty(M, np.float32)
        bitlinear_forward(want, r1, x, w, gamma)
        bitlinear_packed_forward(got, r2, x, codes, np.float32(sw), K, packing, gamma)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(r2, r1)


def test_the_cpu_decoder_holds_the_embedding_in_bf16_and_never_unpacks_the_head(tmp_path, monkeypatch):
    """A packed model on the CPU keeps its embedding as bf16 (as the file and the GPU do: half the fp32 bytes) and
    decodes with the latent model's logits bit for bit, prefill and steps, without unpacking any codes."""
    import ml_dtypes

    import llmpy.layers.bitlinear as bl
    cfg, p = trained_like(6)
    write_ternary(tmp_path / "t.safetensors", cfg, p)
    _, q = read_ternary(tmp_path / "t.safetensors")
    p["wte"] = bf16_bits_to_fp32(fp32_to_bf16_bits(p["wte"]))
    be = get_backend("cpu")
    latent, packed = decoder(cfg, p, be), decoder(cfg, q, be)
    assert packed.bf16["wte"].dtype == ml_dtypes.bfloat16 and "wte" not in packed.params.shapes
    np.testing.assert_array_equal(packed.bf16["wte"].astype(np.float32), q["wte"])
    assert packed.memory_plan()["parameters"] == packed.params.nbytes() + 2 * q["wte"].size
    toks = np.random.default_rng(1).integers(0, cfg.vocab_size, 40)
    a, b = latent.new_decode_state(64), packed.new_decode_state(64)
    np.testing.assert_array_equal(packed.decode_step(toks[None, :8], b), latent.decode_step(toks[None, :8], a))

    def refuse(*args, **kw):
        raise AssertionError("codes unpacked while decoding")

    monkeypatch.setattr(bl, "unpack_codes", refuse)
    for t in toks[8:]:
        np.testing.assert_array_equal(packed.decode_step(np.array([[t]]), b), latent.decode_step(np.array([[t]]), a))


def test_sizes(tmp_path):
    """Our packed file and its packed_size estimate agree; at the released shapes the file is under 1/10 of the
    fp32 model (base 3, bf16 embedding included)."""
    cfg = config_from_name("mmfree:l4d256v250")  # padded to 256 rows: the padding is in neither count
    m = MMFree(cfg, get_backend("cpu"), 1, 1, training=False)
    m.init_weights(0)
    out = write_ternary(tmp_path / "t.safetensors", cfg, m.params_numpy())
    est = packed_size(cfg)
    assert out["bytes"] == est["bytes"] and out["fp32_bytes"] == est["fp32_bytes"]
    assert (tmp_path / "t.safetensors").stat().st_size < est["bytes"] + 16384  # + the header
    for name in ("mmfree:370m", "mmfree:1.3b", "mmfree:2.7b"):
        s = packed_size(config_from_name(name))
        assert s["fp32_bytes"] / s["bytes"] > 10, name
    s = packed_size(config_from_name("mmfree:370m"), "2bit")
    assert 9 < s["fp32_bytes"] / s["bytes"] < 10  # 4 per byte: just over 1/10 at 370M (the bf16 embedding)


def test_cli_convert_sample_and_eval_from_a_packed_file(tmp_path, capsys):
    cfg, p = trained_like(2)
    save_checkpoint(tmp_path / "c.safetensors", cfg, p)
    assert main(["convert", str(tmp_path / "c.safetensors"), str(tmp_path / "t.safetensors"), "--to",
                 "ternary"]) == 0
    assert "ternary" in capsys.readouterr().out
    assert main(["sample", "--checkpoint", str(tmp_path / "t.safetensors"), "--max-new-tokens", "5", "--seed",
                 "1"]) == 0
    assert len(capsys.readouterr().out) > 0
    write_shard(tmp_path / "va_000.bin", np.random.default_rng(0).integers(0, 300, 2000))
    losses = []
    for f in ("c.safetensors", "t.safetensors"):
        assert main(["eval", "--checkpoint", str(tmp_path / f), "--data", str(tmp_path / "va_*.bin"),
                     "--batch-size", "2", "--seq-len", "16", "--batches", "3", "--device", "cpu"]) == 0
        losses.append(float(capsys.readouterr().out.split()[2]))
    assert abs(losses[0] - losses[1]) < 1e-3  # the same model but for the bf16 embedding


def test_packed_files_refuse_training_and_converting(tmp_path):
    cfg, p = trained_like(3)
    write_ternary(tmp_path / "t.safetensors", cfg, p)
    with pytest.raises(UserError, match="for sample and eval only"):
        load_weights(tmp_path / "t.safetensors")
    with pytest.raises(UserError, match="for sample and eval only"):
        run(TrainConfig(init=str(tmp_path / "t.safetensors"), out=str(tmp_path / "run"), steps=1, device="cpu",
                        progress=False))
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserError, match="inference only"):
        MMFree(cfg, get_backend("cpu"), 1, 4, packed=True)


@pytest.mark.parametrize("damage, why", [
    (lambda t: t.__setitem__("iw.codes", np.full_like(t["iw.codes"], 250)), "not base3 ternary codes"),
    (lambda t: t.__setitem__("ow.scale", np.array([1.0, np.nan], np.float32)), "non-finite or non-positive"),
    (lambda t: t.__setitem__("gw.scale", np.array([1.0, -2.0], np.float32)), "non-finite or non-positive"),
    (lambda t: t.__setitem__("downw.codes", t["downw.codes"][:, :, :-1]), "want uint8"),
    (lambda t: t.pop("fw.scale"), "missing the codes or the scale of fw"),
])
def test_malformed_codes_and_scales_are_one_line_errors(tmp_path, damage, why):
    cfg, p = trained_like(4)
    write_ternary(tmp_path / "t.safetensors", cfg, p)
    t, meta = load_safetensors(tmp_path / "t.safetensors", bf16_as_fp32=False)
    damage(t)
    bf16 = {"wte": t.pop("wte")}
    save_safetensors(tmp_path / "bad.safetensors", t, meta, bf16=bf16)
    with pytest.raises(UserError, match=why) as e:
        read_ternary(tmp_path / "bad.safetensors")
    assert "\n" not in str(e.value)


def test_a_damaged_byte_is_caught_by_the_checksums(tmp_path):
    cfg, p = trained_like(5)
    write_ternary(tmp_path / "t.safetensors", cfg, p)
    raw = bytearray((tmp_path / "t.safetensors").read_bytes())
    raw[-100] ^= 1
    (tmp_path / "t.safetensors").write_bytes(bytes(raw))
    with pytest.raises(UserError, match="(?i)crc|damaged|checksum"):
        read_ternary(tmp_path / "t.safetensors")
