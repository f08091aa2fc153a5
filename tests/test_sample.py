"""Generation: decoding one position at a time through the model's own forward with a KV cache, against the
full-sequence forward; the sampler's distribution; seeding and context checks."""
import numpy as np
import pytest

from llmpy.backends import get_backend
from llmpy.errors import UserError
from llmpy.models.decode import decoder, generate, sample_token
from llmpy.models.gpt2 import GPT2, GPT2Config

CFG = GPT2Config(max_seq_len=24, vocab_size=300, padded_vocab_size=384, num_layers=3, num_heads=2, channels=16)


def test_kv_cache_matches_full_forward():
    n = 20
    model = GPT2(CFG, get_backend("cpu"), 1, n, training=False)
    model.init_weights(4)
    p = model.params_numpy()
    for name in ("qkvb", "fcb", "ln1b", "lnfw"):  # non-trivial biases/gains so every term matters
        p[name] = p[name] + np.random.default_rng(1).standard_normal(p[name].shape).astype(np.float32) * 0.1
    model.load_params(p)
    toks = np.random.default_rng(2).integers(0, CFG.vocab_size, (1, n)).astype(np.int32)
    model.forward(toks)
    full = model.acts["logits"]                      # (n, V)
    dec = decoder(CFG, p, get_backend("cpu"))
    state = dec.new_decode_state(CFG.max_seq_len)
    got = [dec.decode_step(toks[:, :7], state)[0]]   # a prompt of 7, then one token at a time
    got += [dec.decode_step(toks[:, i:i + 1], state)[0] for i in range(7, n)]
    assert state.pos == n
    ref = full[6:]
    err = np.linalg.norm(np.stack(got) - ref) / np.linalg.norm(ref)
    assert err < 1e-5
    with pytest.raises(UserError, match="context"):
        dec.decode_step(np.zeros((1, CFG.max_seq_len - n + 1), np.int32), state)


def test_sampler_greedy_topk_and_distribution():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(50).astype(np.float32)
    assert sample_token(logits, rng, temperature=0) == int(np.argmax(logits))
    assert sample_token(logits, rng, top_k=1) == int(np.argmax(logits))
    draws = np.array([sample_token(logits, rng, temperature=0.7, top_k=5) for _ in range(20000)])
    top5 = np.argsort(logits)[-5:]
    assert set(np.unique(draws)) <= set(top5)
    p = np.exp(logits[top5] / 0.7)
    p /= p.sum()
    freq = np.array([(draws == t).mean() for t in top5])
    assert np.abs(freq - p).max() < 0.015


def test_generate_is_seeded_and_checks_the_vocabulary():
    p = GPT2(CFG, get_backend("cpu"), 1, 4, training=False)
    p.init_weights(0)
    model = decoder(CFG, p.params_numpy(), get_backend("cpu"))
    a = generate(model, [1, 2, 3], 10, rng=np.random.default_rng(5))
    b = generate(model, [1, 2, 3], 10, rng=np.random.default_rng(5))
    c = generate(model, [1, 2, 3], 10, rng=np.random.default_rng(6))
    assert a == b and a != c and len(a) == 10
    with pytest.raises(UserError, match="vocabulary"):
        generate(model, [CFG.vocab_size], 1, rng=np.random.default_rng(0))
    stopped = generate(model, [1, 2, 3], 10, rng=np.random.default_rng(5), stop_at=a[2])
    assert stopped == a[:a.index(a[2]) + 1]


def test_generation_past_the_context_slides_the_window():
    """Past maxT the last maxT-1 tokens are fed again into a fresh state: the tokens before that point are those of
    a plain generation, the one after it is what a fresh decoder makes of those maxT-1 tokens, and any length
    works (generation longer than the context once failed)."""
    p = GPT2(CFG, get_backend("cpu"), 1, 4, training=False)
    p.init_weights(1)
    model = decoder(CFG, p.params_numpy(), get_backend("cpu"))
    prompt, maxT = [5, 6, 7], CFG.max_seq_len
    fits = generate(model, prompt, maxT - len(prompt), rng=np.random.default_rng(0), temperature=0)
    long = generate(model, prompt, 3 * maxT, rng=np.random.default_rng(0), temperature=0)
    assert len(long) == 3 * maxT and long[:len(fits)] == fits
    seq = prompt + long
    fresh = decoder(CFG, p.params_numpy(), get_backend("cpu"))
    want = int(np.argmax(fresh.decode_step(np.array([seq[maxT + 1 - (maxT - 1):maxT + 1]]),
                                           fresh.new_decode_state(maxT))[0]))
    assert seq[maxT + 1] == want
    # a prompt longer than the context is read from its last maxT tokens
    many = list(range(1, 2 * maxT))
    assert (generate(model, many, 4, rng=np.random.default_rng(0), temperature=0)
            == generate(model, many[-maxT:], 4, rng=np.random.default_rng(0), temperature=0))


def test_top_p_keeps_the_nucleus_and_settings_are_checked():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    draws = {sample_token(logits, rng, top_p=0.75) for _ in range(2000)}
    assert draws == {0, 1}  # 0.5 < 0.75 <= 0.5 + 0.3
    assert {sample_token(logits, rng, top_p=0.5) for _ in range(200)} == {0}
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    assert ([sample_token(logits, a, top_p=1.0) for _ in range(50)]
            == [sample_token(logits, b) for _ in range(50)])  # top-p 1 is off: the same draws
    p = GPT2(CFG, get_backend("cpu"), 1, 4, training=False)
    p.init_weights(0)
    model = decoder(CFG, p.params_numpy(), get_backend("cpu"))
    for kw, msg in ((dict(temperature=float("nan")), "temperature"), (dict(temperature=-1.0), "temperature"),
                    (dict(top_k=-3), "top-k"), (dict(top_p=0.0), "top-p"), (dict(top_p=1.5), "top-p")):
        with pytest.raises(UserError, match=msg):
            generate(model, [1], 2, rng=np.random.default_rng(0), **kw)
    with pytest.raises(UserError, match="new tokens"):
        generate(model, [1], -5, rng=np.random.default_rng(0))
