"""A model folder's own tokenizer (data/tokenizers/files.py): a small BPE the test trains with Hugging Face's
`tokenizers` library, saved as tokenizer.json beside an exported MatMul-free model, is what `sample` reads, and
what `prepare --tokenizer` shards text with; and a small SentencePiece tokenizer.model (the released models' kind),
whose word-initial spaces `sample` must keep while streaming."""
import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers")

from llmpy.backends import get_backend
from llmpy.cli import main
from llmpy.config import config_from_name
from llmpy.data.shards import read_shard
from llmpy.data.tokenizers import get_tokenizer, tokenizer_for
from llmpy.errors import UserError
from llmpy.formats.hf import write_hf_model
from llmpy.models.mmfree import MMFree

TEXT = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine",
        "to be or not to be that is the question"] * 20


def small_bpe(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))
    return tok


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    ref = small_bpe(d / "tokenizer.json")
    cfg = config_from_name(f"mmfree:l1d32v{ref.get_vocab_size()}t64")  # the model's vocabulary is the tokenizer's
    m = MMFree(cfg, get_backend("cpu"), 1, 1, training=False)
    m.init_weights(0)
    write_hf_model(d, cfg, m.params_numpy())
    return d, ref


def test_the_folders_tokenizer_is_read(folder):
    d, ref = folder
    tok = get_tokenizer(str(d))
    assert tok.vocab_size == ref.get_vocab_size() and (tok.doc, tok.eot) == (1, 2)  # <s>, </s>
    ids = tok.encode("the lazy fox")
    assert ids == ref.encode("the lazy fox").ids and tok.decode(ids) == "the lazy fox"
    assert tokenizer_for(400, str(d)) == str(d)  # a larger model vocabulary is fine
    with pytest.raises(UserError, match="more than the model's vocabulary"):
        tokenizer_for(100, str(d))


def test_sample_uses_the_checkpoint_folders_tokenizer(folder, capsys):
    d, ref = folder
    assert main(["sample", "--checkpoint", str(d), "--prompt", "the quick", "--max-new-tokens", "8", "--seed",
                 "0", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("the quick")
    # the continuation is the small tokenizer's text of the model's tokens (GPT-2's would decode them otherwise)
    from llmpy.formats.checkpoint import load_weights
    from llmpy.models.decode import decoder, generate
    cfg, p = load_weights(d)
    new = generate(decoder(cfg, p, get_backend("cpu")), ref.encode("the quick").ids, 8,
                   rng=np.random.default_rng(0), temperature=0)
    assert out.rstrip("\n") == "the quick" + ref.decode(new, skip_special_tokens=False)


def test_prepare_shards_text_with_a_tokenizer_file(folder, tmp_path):
    d, ref = folder
    (tmp_path / "a.txt").write_text("to be or not to be")
    (tmp_path / "b.txt").write_text("the quick brown fox")
    assert main(["prepare", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), "--out", str(tmp_path / "shards"),
                 "--tokenizer", str(d / "tokenizer.json"), "--val-tokens", "0"]) == 0
    shard = next((tmp_path / "shards").glob("*_train_*.bin"))
    want = [1] + ref.encode("to be or not to be").ids + [1] + ref.encode("the quick brown fox").ids
    assert read_shard(shard).tolist() == want


def test_a_bad_tokenizer_file_is_a_one_line_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="is not a tokenizer file") as e:
        get_tokenizer(str(tmp_path))
    assert "\n" not in str(e.value)


def test_a_sentencepiece_tokenizer_model_is_read(tmp_path, capsys):
    """The released MatMul-free models ship Mistral's SentencePiece `tokenizer.model`: a small one the test trains
    (unigram, <s> = 1 and </s> = 2 as SentencePiece numbers them) is what get_tokenizer and `sample` read."""
    spm = pytest.importorskip("sentencepiece")
    import io
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT), model_writer=buf, vocab_size=40,
                                   character_coverage=1.0, model_type="unigram", minloglevel=2)
    d = tmp_path / "model"
    d.mkdir()
    (d / "tokenizer.model").write_bytes(buf.getvalue())
    ref = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    tok = get_tokenizer(str(d))
    assert tok.vocab_size == ref.get_piece_size() == 40 and (tok.doc, tok.eot) == (1, 2)
    ids = tok.encode("the lazy fox")
    assert ids == ref.encode("the lazy fox") and len(ids) > 1 and tok.decode(ids) == "the lazy fox"
    assert tok.encode_batch(["to be", "a stitch"]) == [ref.encode("to be"), ref.encode("a stitch")]
    cfg = config_from_name("mmfree:l1d32v40t64")  # the model's vocabulary is the tokenizer's
    m = MMFree(cfg, get_backend("cpu"), 1, 1, training=False)
    m.init_weights(0)
    write_hf_model(d, cfg, m.params_numpy())
    assert main(["sample", "--checkpoint", str(d), "--prompt", "to be", "--max-new-tokens", "6", "--seed", "0",
                 "--temperature", "0"]) == 0
    from llmpy.formats.checkpoint import load_weights
    from llmpy.models.decode import decoder, generate
    cfg, p = load_weights(d)
    new = generate(decoder(cfg, p, get_backend("cpu")), ref.encode("to be"), 6, rng=np.random.default_rng(0),
                   temperature=0)
    assert capsys.readouterr().out.rstrip("\n") == ref.decode(ref.encode("to be") + new)
