"""`llmpy convert X DIR --to hf` makes a folder transformers uses on its own (offline, local files only): its
pipeline generates the same greedy text as `llmpy sample --temperature 0`, and its AutoTokenizer encodes like ours.
transformers is the oracle here (tests only, from the [test] extras)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from llmpy.cli import main
from llmpy.data.tokenizers.gpt2 import _data_file, get_tokenizer
from llmpy.formats.checkpoint import save_checkpoint
from llmpy.formats.hf import write_hf_model
from llmpy.models.gpt2 import GPT2Config, spec

transformers = pytest.importorskip("transformers")
pytest.importorskip("torch")

CFG = GPT2Config(max_seq_len=64, vocab_size=50257, padded_vocab_size=50304, num_layers=2, num_heads=2, channels=32)
TEXTS = ["Hello world", "ROMEO: But, soft! what light through yonder window breaks?",
         "  leading spaces, trailing   \n\n\tand tabs", "it's we're they'll I'd 12345 3.14159 $100",
         "ünïcödé ✓ 日本語 emoji 🙂 and\r\nCRLF", "x" * 50 + " " + "ab" * 30]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random GPT-2 with GPT-2's vocabulary (weights large enough that greedy choices are clear-cut), as our
    checkpoint and as the folder `llmpy convert` writes from it."""
    d = tmp_path_factory.mktemp("export")
    r = np.random.default_rng(0)
    params = {s.name: (r.standard_normal(s.shape) * (0.5 if s.init == "normal" else 0.1) + (s.init == "ones"))
              .astype(np.float32) for s in spec(CFG)}
    params["wte"][CFG.vocab_size:] = 0
    save_checkpoint(d / "ck.safetensors", CFG, params)
    assert main(["convert", str(d / "ck.safetensors"), str(d / "hf"), "--to", "hf"]) == 0
    return d


def test_the_folder_holds_tokenizer_and_generation_config(exported):
    hf = exported / "hf"
    assert {p.name for p in hf.iterdir()} == {"model.safetensors", "config.json", "generation_config.json",
                                              "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"}
    assert (hf / "vocab.json").read_bytes() == _data_file("encoder.json").read_bytes()
    assert (hf / "merges.txt").read_bytes() == _data_file("vocab.bpe").read_bytes()
    gen = json.loads((hf / "generation_config.json").read_text())
    assert gen["eos_token_id"] == gen["bos_token_id"] == 50256
    assert json.loads((hf / "tokenizer_config.json").read_text())["model_max_length"] == CFG.max_seq_len


def test_auto_tokenizer_encodes_like_ours(exported, tmp_path):
    ours = get_tokenizer()
    tok = transformers.AutoTokenizer.from_pretrained(exported / "hf")
    assert len(tok) == 50257 and tok.eos_token_id == 50256
    for text in TEXTS:
        ids = ours.encode(text)
        assert tok(text)["input_ids"] == ids, text
        assert tok.decode(ids) == text

    # vocab.json + merges.txt alone (what tools without tokenizer.json read) give the same tokenizer
    (tmp_path / "t").mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (tmp_path / "t" / name).write_bytes((exported / "hf" / name).read_bytes())
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "t")
    assert len(tok) == 50257 and all(tok(t)["input_ids"] == ours.encode(t) for t in TEXTS)


def test_pipeline_generates_what_llmpy_sample_does(exported, capsys):
    prompt, n = "ROMEO: But, soft!", 24
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(exported / "ck.safetensors"), "--prompt", prompt, "-n", str(n),
                 "--temperature", "0", "--device", "cpu"]) == 0
    ours = capsys.readouterr().out
    model = transformers.AutoModelForCausalLM.from_pretrained(exported / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(exported / "hf")
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=n, do_sample=False)[0, ids.shape[1]:].tolist()
    assert len(out) == n and 50256 not in out  # no early stop at <|endoftext|>: both made n tokens
    assert ours == prompt + get_tokenizer().decode(out) + "\n"
    pipe = transformers.pipeline("text-generation", model=str(exported / "hf"), device="cpu")
    text = pipe(prompt, max_new_tokens=n, do_sample=False)[0]["generated_text"]
    assert text == tok.decode(ids[0].tolist() + out)


def test_a_model_without_gpt2s_vocabulary_gets_no_tokenizer(tmp_path):
    cfg = GPT2Config(max_seq_len=8, vocab_size=100, padded_vocab_size=128, num_layers=1, num_heads=1, channels=8)
    params = {s.name: np.zeros(s.shape, np.float32) for s in spec(cfg)}
    with pytest.warns(UserWarning, match=r"no tokenizer exported: the model's vocabulary \(100\)"):
        write_hf_model(tmp_path, cfg, params)
    assert {p.name for p in tmp_path.iterdir()} == {"model.safetensors", "config.json"}


# ---- Llama 3 and the MatMul-free LM: the tokenizer llmpy reads the model with goes into the folder -----------------

@pytest.fixture(scope="module")
def llama_exported(tmp_path_factory):
    """A random Llama 3 with Llama 3's vocabulary (its tokenizer fetched once into a temporary cache, as in
    test_llama_data.py), as our checkpoint and as the folder `llmpy convert` writes from it."""
    from llmpy.models.llama3 import LlamaConfig
    from llmpy.models.llama3 import spec as llama_spec
    d = tmp_path_factory.mktemp("llama-export")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMPY_CACHE", str(d / "cache"))
        from llmpy.data.tokenizers import llama3
        llama3.get_tokenizer.cache_clear()
        cfg = LlamaConfig(max_seq_len=64, num_layers=2, channels=32, num_heads=2, num_kv_heads=1, ffn_hidden=64)
        r = np.random.default_rng(0)
        params = {s.name: (r.standard_normal(s.shape) * (0.5 if s.init == "normal" else 0.1) + (s.init == "ones"))
                  .astype(np.float32) for s in llama_spec(cfg)}
        save_checkpoint(d / "ck.safetensors", cfg, params)
        assert main(["convert", str(d / "ck.safetensors"), str(d / "hf")]) == 0
        ours = llama3.get_tokenizer()
    yield d, cfg, params, ours
    llama3.get_tokenizer.cache_clear()  # it was read from this module's cache


@pytest.mark.slow
def test_a_llama3_folder_tokenizes_and_generates_as_llmpy_does(llama_exported):
    """Llama 3's tokenizer.json (byte-level BPE, Meta's split regex, its 256 special tokens, <|begin_of_text|>
    before a text) encodes as ours; transformers' pipeline on the folder alone gives our greedy tokens."""
    from llmpy.backends import get_backend
    from llmpy.models.decode import decoder, generate
    d, cfg, params, ours = llama_exported
    hf = d / "hf"
    assert {p.name for p in hf.iterdir()} == {"model.safetensors", "config.json", "generation_config.json",
                                              "tokenizer.json", "tokenizer_config.json"}
    gen = json.loads((hf / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (128000, 128001)
    pipe = transformers.pipeline("text-generation", model=str(hf), device="cpu")  # from the folder alone
    tok = pipe.tokenizer
    assert len(tok) == 128256 and (tok.bos_token_id, tok.eos_token_id) == (128000, 128001)
    for text in TEXTS + ["This is a test sentence.", "Naïve café — 12345 tokens\n\n\tend"]:
        ids = ours.encode(text)
        assert tok(text)["input_ids"] == [128000] + ids, text
        assert tok.decode(ids) == text
    assert tok.convert_ids_to_tokens([128009, 128255]) == ["<|eot_id|>", "<|reserved_special_token_245|>"]
    from llmpy.data.tokenizers.files import FileTokenizer
    own = FileTokenizer(hf / "tokenizer.json")  # what `llmpy sample --checkpoint` reads from the folder
    assert (own.doc, own.eot) == (128000, 128001) and all(own.encode(t) == ours.encode(t) for t in TEXTS)
    prompt, n = "ROMEO: But, soft!", 16
    context = [128000] + ours.encode(prompt)
    want = generate(decoder(cfg, params, get_backend("cpu")), context, n, rng=np.random.default_rng(0),
                    temperature=0.0)
    assert len(want) == n and 128001 not in want  # no early stop at <|end_of_text|>: both make n tokens
    got = pipe(prompt, max_new_tokens=n, do_sample=False, return_full_text=False)[0]["generated_text"]
    assert got == ours.decode(want)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    assert pipe.model.generate(ids, max_new_tokens=n, do_sample=False)[0, ids.shape[1]:].tolist() == want


@pytest.mark.parametrize("family", ["llama3", "mmfree"])
def test_small_models_on_gpt2s_tokens_export_gpt2s_tokenizer(tmp_path, family):
    """The small Llama 3 and MatMul-free configs trained on GPT-2's tokens get GPT-2's tokenizer files (the
    folder's own tokenizer, as `llmpy sample` reads it, encodes as GPT-2's); the released MatMul-free shapes'
    vocabulary (Mistral's 32,000) gets none, with a warning."""
    from llmpy.config import config_from_name, family_of
    from llmpy.data.tokenizers.files import FileTokenizer
    name = {"llama3": "llama3:l1d32h2k1f64t16", "mmfree": "mmfree:l1d32t16"}[family]
    cfg = config_from_name(name)
    assert cfg.vocab_size == 50257
    params = {s.name: np.zeros(s.shape, np.float32) for s in family_of(cfg).spec(cfg)}
    files = {p.name for p in write_hf_model(tmp_path / "hf", cfg, params)}
    assert {"tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "generation_config.json"} <= files
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] == 50256
    own = FileTokenizer(tmp_path / "hf" / "tokenizer.json")
    assert (own.doc, own.eot) == (50256, 50256)
    assert all(own.encode(t) == get_tokenizer().encode(t) for t in TEXTS)
    if family == "mmfree":
        cfg = config_from_name("mmfree:l1d32v32000t16")
        params = {s.name: np.zeros(s.shape, np.float32) for s in family_of(cfg).spec(cfg)}
        with pytest.warns(UserWarning, match=r"no tokenizer exported: the model's vocabulary \(32000\)"):
            files = {p.name for p in write_hf_model(tmp_path / "m", cfg, params)}
        assert files == {"model.safetensors", "config.json"}


@pytest.mark.filterwarnings("always:no tokenizer exported")
def test_converting_a_model_folder_carries_its_own_tokenizer(tmp_path, capsys):
    """A released MatMul-free model's 32,000-token SentencePiece is not one llmpy ships: `llmpy convert` of its
    Hugging Face folder writes the folder's own tokenizer files beside the export, byte for byte (and an export
    from a folder without them gets none, as before)."""
    import warnings

    from llmpy.cli import main
    from llmpy.config import config_from_name, family_of
    cfg = config_from_name("mmfree:l1d32v32000t16")
    params = {s.name: np.full(s.shape, 0.01, np.float32) for s in family_of(cfg).spec(cfg)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_hf_model(tmp_path / "released", cfg, params)
    own = {"tokenizer.model": b"\x00sentencepiece bytes\xff", "tokenizer_config.json": b'{"add_bos_token": true}\n',
           "special_tokens_map.json": b'{"bos_token": "<s>"}\n'}
    for name, data in own.items():
        (tmp_path / "released" / name).write_bytes(data)
    assert main(["convert", str(tmp_path / "released"), str(tmp_path / "out"), "--to", "hf"]) == 0
    for name, data in own.items():
        assert (tmp_path / "out" / name).read_bytes() == data, name
    assert not (tmp_path / "out" / "tokenizer.json").exists()
    for name in own:
        (tmp_path / "released" / name).unlink()
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "released"), str(tmp_path / "out2"), "--to", "hf"]) == 0
    assert "warning: no tokenizer exported" in capsys.readouterr().err
    assert not (tmp_path / "out2" / "tokenizer.model").exists()
    # a tokenizer.model beside a named weights file is one of the files an export would replace: refused
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "tokenizer.model").write_bytes(b"the user's own")
    (tmp_path / "released" / "tokenizer.model").write_bytes(b"the source's")
    assert main(["convert", str(tmp_path / "released"), str(tmp_path / "mine" / "model.safetensors")]) == 2
    assert "already holds tokenizer.model" in capsys.readouterr().err
    assert (tmp_path / "mine" / "tokenizer.model").read_bytes() == b"the user's own"


def test_a_llama3_export_without_its_tokenizer_still_writes_the_model(tmp_path, monkeypatch):
    """Offline, where Llama 3's tokenizer.model cannot be fetched, the weights and config are still exported, with a
    warning that says why there is no tokenizer."""
    from llmpy.data.tokenizers import llama3
    from llmpy.errors import UserError
    from llmpy.models.llama3 import LlamaConfig
    from llmpy.models.llama3 import spec as llama_spec

    def offline():
        raise UserError("Llama 3's tokenizer could not be fetched with pip download (no network)")
    monkeypatch.setattr(llama3, "model_file_bytes", offline)
    cfg = LlamaConfig(max_seq_len=8, num_layers=1, channels=8, num_heads=2, num_kv_heads=1, ffn_hidden=16)
    params = {s.name: np.zeros(s.shape, np.float32) for s in llama_spec(cfg)}
    with pytest.warns(UserWarning, match="no tokenizer exported: Llama 3's tokenizer could not be fetched"):
        files = {p.name for p in write_hf_model(tmp_path, cfg, params)}
    assert files == {"model.safetensors", "config.json"}
