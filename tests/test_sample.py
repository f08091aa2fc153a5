"""Generation: decoding one position at a time through the model's own forward with a KV cache, against the
full-sequence forward; the sampler's distribution; seeding and context checks; prefills (a window in one forward)
against decoding steps, and generation past the context, for every family."""
import numpy as np
import pytest
from decoding import TINY, stepwise_greedy, tiny

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


# ---- prefill: a window in one forward -------------------------------------------------------------------------
def state_arrays(state, n):
    """What a decoding state holds after n positions: the caches' first n positions, or the recurrent states."""
    return [state.k[..., :n, :], state.v[..., :n, :]] if hasattr(state, "k") else [state.h]


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


@pytest.mark.parametrize("name", list(TINY))
def test_a_prefill_leaves_what_decoding_steps_leave(name, tmp_path):
    """A window fed in one forward (plain, or padded to a longer prefill plan) gives the logits and the state that
    feeding it one position at a time gives, and the steps after it agree."""
    cfg, p = tiny(name, tmp_path)
    dec = decoder(cfg, p, get_backend("cpu"))
    toks = np.random.default_rng(3).integers(0, cfg.vocab_size, (1, 11)).astype(np.int32)
    steps = dec.new_decode_state(cfg.max_seq_len)
    want = [dec.decode_step(toks[:, i:i + 1], steps) for i in range(11)][-1]
    for plan in (None, cfg.max_seq_len - 1):
        state = dec.new_decode_state(cfg.max_seq_len)
        got = dec.decode_step(toks, state, prefill_len=plan)
        assert dec.prefill_model(plan or 11).T == (plan or 11) and state.pos == 11 and state.span == 1
        assert rel(got, want) < 1e-5, plan
        for a, b in zip(state_arrays(state, 11), state_arrays(steps, 11), strict=True):
            assert rel(a, b) < 1e-5
    for t in (5, 9, 2):  # decoding goes on alike from either state
        assert rel(dec.decode_step(np.array([[t]]), state), dec.decode_step(np.array([[t]]), steps)) < 1e-5


@pytest.mark.parametrize("name", list(TINY))
def test_generation_gives_the_tokens_of_decoding_steps_past_the_context(name, tmp_path):
    """Greedy fp32 generation with prefills gives the tokens of one decoding step at a time: inside the context,
    past it (attention models slide their window, a recurrent model goes on with its state) and from a prompt longer
    than the context; the same again after other calls have planned other prefills."""
    cfg, p = tiny(name, tmp_path)
    dec = decoder(cfg, p, get_backend("cpu"))
    maxT = cfg.max_seq_len
    for prompt in ([5, 6, 7], list(np.random.default_rng(1).integers(0, cfg.vocab_size, 2 * maxT + 3))):
        want = stepwise_greedy(dec, prompt, 3 * maxT)
        assert generate(dec, prompt, 3 * maxT, rng=np.random.default_rng(0), temperature=0) == want
    assert generate(dec, [5, 6, 7], 3 * maxT, rng=np.random.default_rng(0), temperature=0) == \
        stepwise_greedy(dec, [5, 6, 7], 3 * maxT)


@pytest.mark.parametrize("name", ["gpt2", "llama3", "mmfree"])
def test_a_token_past_the_context_costs_at_most_one_window_forward(name, tmp_path, monkeypatch):
    """Each new token past the context is one forward: a decoding step, or (attention models, every other token) a
    prefill of the last maxT-1 tokens through one plan; a recurrent model prefills only its prompt."""
    cfg, p = tiny(name, tmp_path)
    dec = decoder(cfg, p, get_backend("cpu"))
    maxT, seen = cfg.max_seq_len, []
    forward = type(dec).forward

    def spy(self, *a, **kw):
        seen.append(self.T)
        return forward(self, *a, **kw)

    monkeypatch.setattr(type(dec), "forward", spy)
    n = 4 * maxT
    generate(dec, [1, 2, 3], n, rng=np.random.default_rng(0))
    prefills = [t for t in seen if t > 1]
    assert len(seen) == n  # the prompt's prefill, then one forward for each token drawn but the last
    if name == "mmfree":
        assert prefills == [3]
    else:
        assert set(prefills) == {maxT - 1} and len(prefills) > n // 3


def test_the_prefill_model_shares_the_decoders_weights(tmp_path):
    """load_params (the trainer's samples reload the decoder) reaches the prefill model too."""
    cfg, p = tiny("gpt2", tmp_path)
    dec = decoder(cfg, p, get_backend("cpu"))
    toks = np.array([[3, 1, 4, 1, 5, 9]])
    dec.decode_step(toks, dec.new_decode_state(8))
    q = {k: v * 1.5 for k, v in p.items()}
    dec.load_params(q)
    fresh = decoder(cfg, q, get_backend("cpu"))
    np.testing.assert_array_equal(dec.decode_step(toks, dec.new_decode_state(8)),
                                  fresh.decode_step(toks, fresh.new_decode_state(8)))
    assert dec.prefill_model(6).params is dec.params


def test_a_recurrent_state_has_no_capacity_to_overrun(tmp_path):
    cfg, p = tiny("mmfree", tmp_path)
    dec = decoder(cfg, p, get_backend("cpu"))
    state = dec.new_decode_state(4)
    dec.decode_step(np.arange(cfg.max_seq_len)[None], state)
    for t in range(2 * cfg.max_seq_len):
        dec.decode_step(np.array([[t]]), state)
    assert state.pos == 3 * cfg.max_seq_len
