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


# ---- batches: several sequences decoded together --------------------------------------------------------------
def test_sampling_a_batch_draws_each_row_as_it_would_alone():
    """sample_tokens: row b of a batch is the token sample_token draws from that row with rngs[b] (a row's arithmetic
    is its own), for every sampler setting; greedy needs no generator."""
    logits = np.random.default_rng(0).standard_normal((6, 50)).astype(np.float32) * 3
    from llmpy.models.decode import sample_tokens
    for kw in (dict(), dict(top_k=5), dict(top_p=0.8), dict(temperature=0.5, top_k=10, top_p=0.9)):
        for seed in range(20):
            got = sample_tokens(logits, [np.random.default_rng(seed + b) for b in range(6)], **kw)
            alone = [sample_token(logits[b], np.random.default_rng(seed + b), **kw) for b in range(6)]
            assert got.tolist() == alone, kw
    assert sample_tokens(logits, [], temperature=0).tolist() == np.argmax(logits, axis=1).tolist()


@pytest.mark.parametrize("name", list(TINY))
def test_a_batch_generates_each_sequence_as_generated_alone(name, tmp_path):
    """generate_batch of B sequences, sequence b drawing with the generator of seed + b, gives the tokens that
    generate gives one sequence with that generator: inside the context and past it (the windows slide together;
    a recurrent model goes on), greedy and sampled. Its decoding steps' logits agree with one sequence's to fp32
    rounding (the products' shapes differ; the MatMul-free LM's are bit for bit)."""
    from llmpy.models.decode import generate_batch
    cfg, p = tiny(name, tmp_path)
    be = get_backend("cpu")
    one = decoder(cfg, p, be)
    batch = decoder(cfg, p, be, 3, weights_of=one)
    maxT = cfg.max_seq_len
    for prompt, kw in (([5, 6, 7], dict(temperature=0)), ([5, 6, 7], dict(top_k=40)),
                       (list(range(1, 2 * maxT)), dict(temperature=0.8, top_p=0.9))):
        got = generate_batch(batch, prompt, 3 * maxT, rngs=[np.random.default_rng(10 + b) for b in range(3)], **kw)
        alone = [generate(one, prompt, 3 * maxT, rng=np.random.default_rng(10 + b), **kw) for b in range(3)]
        assert got == alone, kw
        if kw.get("temperature") != 0:
            assert got[0] != got[1]  # the generators differ
    toks = np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 6))
    state, alone = batch.new_decode_state(maxT), [one.new_decode_state(maxT) for _ in range(3)]
    for i in range(6):
        a = batch.decode_step(toks[:, i:i + 1], state)
        b = np.concatenate([one.decode_step(toks[r:r + 1, i:i + 1], alone[r]) for r in range(3)])
        assert rel(a, b) < 1e-6
        if name.startswith("mmfree"):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["gpt2", "mmfree"])
def test_a_batch_prefills_its_prompt_once_and_steps_all_rows_in_one_forward(name, tmp_path, monkeypatch):
    """One prefill of the prompt (one sequence) for the whole batch, then one forward of B rows per new token; past
    the context an attention model refills each sequence's window (one prefill each), a recurrent model never."""
    from llmpy.models.decode import generate_batch
    cfg, p = tiny(name, tmp_path)
    batch = decoder(cfg, p, get_backend("cpu"), 4)
    maxT, seen = cfg.max_seq_len, []
    forward = type(batch).forward

    def spy(self, *a, **kw):
        seen.append((self.B, self.T))
        return forward(self, *a, **kw)

    monkeypatch.setattr(type(batch), "forward", spy)
    generate_batch(batch, [1, 2, 3], maxT - 3, rngs=[np.random.default_rng(b) for b in range(4)])
    assert seen == [(1, 3)] + [(4, 1)] * (maxT - 4)
    seen.clear()
    generate_batch(batch, [1, 2, 3], 2 * maxT, rngs=[np.random.default_rng(b) for b in range(4)])
    prefills = [s for s in seen if s[1] > 1]
    if name == "mmfree":
        assert prefills == [(1, 3)] and seen.count((4, 1)) == 2 * maxT - 1
    else:  # the prompt once; then each slide feeds the 4 sequences' windows through one plan
        assert prefills[0] == (1, maxT - 1) and set(prefills) == {(1, maxT - 1)} and (len(prefills) - 1) % 4 == 0


def test_a_stopped_sequence_stops_alone(tmp_path):
    """With stop_at a sequence ends after drawing it, the others go on as they would without it."""
    from llmpy.models.decode import generate_batch
    cfg, p = tiny("llama3", tmp_path)
    batch = decoder(cfg, p, get_backend("cpu"), 3)
    rngs = lambda: [np.random.default_rng(b) for b in range(3)]  # noqa: E731
    free = generate_batch(batch, [1, 2], 12, rngs=rngs(), temperature=1.5, top_k=0)
    stop = free[0][4]
    got = generate_batch(batch, [1, 2], 12, rngs=rngs(), temperature=1.5, top_k=0, stop_at=stop)
    for f, g in zip(free, got):
        assert g == (f[:f.index(stop) + 1] if stop in f else f)
    assert len(got[0]) <= 5 and any(len(g) > len(got[0]) for g in got)  # the others went on
    with pytest.raises(ValueError, match="2 random generators for a decoder of 3"):
        generate_batch(batch, [1, 2], 3, rngs=rngs()[:2])


def test_row_bytes_is_what_a_sequence_adds(tmp_path):
    """row_bytes: one sequence's state (a KV cache grows with the length, a recurrent state does not) and its step
    activations; a batch of B holds B such states and at most B such activations (each tensor's alignment padding
    counts once per plan)."""
    from llmpy.models.decode import row_bytes
    for name, kind in (("llama3", "KV cache"), ("mmfree", "recurrent state")):
        cfg, p = tiny(name, tmp_path)
        be = get_backend("cpu")
        one = decoder(cfg, p, be)
        s8, acts, what = row_bytes(one, 8)
        s16 = row_bytes(one, 16)[0]
        assert what == kind and (s16 == 2 * s8 if name == "llama3" else s16 == s8 == cfg.num_layers * cfg.channels * 4)
        batch = decoder(cfg, p, be, 5, weights_of=one)
        st = batch.new_decode_state(8)
        assert sum(a.nbytes for a in ([st.k, st.v] if kind == "KV cache" else [st.h])) == 5 * s8
        assert 2 * acts < batch.acts.nbytes() + batch.stats.nbytes() <= 5 * acts  # a bound: never under


def test_the_sample_command_draws_sample_i_as_seed_plus_i_alone(tmp_path, capsys, monkeypatch):
    """`llmpy sample --num-samples 3 --seed 4` (one batch) prints, for sample i, the text that `--seed 4+i` alone
    prints; a batch that would not fit the free memory is a one-line error that says how many samples would."""
    from llmpy import cli
    from llmpy.formats.ternary import write_ternary
    cfg, p = tiny("mmfree", tmp_path)
    write_ternary(tmp_path / "t.safetensors", cfg, p)
    argv = ["sample", "--checkpoint", str(tmp_path / "t.safetensors"), "-n", "12", "--device", "cpu"]
    assert cli.main(argv + ["--num-samples", "3", "--seed", "4"]) == 0
    out = capsys.readouterr().out.split("--- sample ")
    blocks = [b.split("---\n", 1)[1] for b in out[1:]]
    assert [b.split(" ---")[0] for b in out[1:]] == [f"{i} of 3" for i in (1, 2, 3)]
    for i in range(3):
        assert cli.main(argv + ["--seed", str(4 + i)]) == 0
        assert capsys.readouterr().out == blocks[i]
    assert len(set(blocks)) == 3
    from llmpy.models.decode import row_bytes
    state, acts, _ = row_bytes(decoder(cfg, p, get_backend("cpu")), 13)
    monkeypatch.setattr(cli, "_free_bytes", lambda be: 10 * (state + acts) + 5)
    assert cli.main(argv + ["--num-samples", "10"]) == 0
    capsys.readouterr()
    assert cli.main(argv + ["--num-samples", "11"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the note on the prompt's token
    assert err.startswith("error: --num-samples 11 needs") and "recurrent state" in err and "\n" not in err
    assert err.endswith("at most 10 samples at once here")


def dense_sample(logits, rng, temperature=1.0, top_k=None, top_p=None):
    """The sampler spelled out over the whole vocabulary (dropped tokens kept as zeros): sample_tokens' reference."""
    z = logits.astype(np.float64) / temperature
    if top_k is not None and 0 < top_k < z.size:
        z = np.where(z >= np.partition(z, -top_k)[-top_k], z, -np.inf)
    prob = np.exp(z - z.max())
    if top_p is not None and top_p < 1:
        order = np.argsort(-prob, kind="stable")
        mass = np.cumsum(prob[order])
        cut = int(np.searchsorted(mass, top_p * mass[-1])) + 1
        kept = np.zeros_like(prob)
        kept[order[:cut]] = prob[order[:cut]]
        prob = kept
    cdf = np.cumsum(prob)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), z.size - 1))


def test_the_sampler_draws_what_the_whole_vocabulary_spelled_out_draws():
    """sample_tokens works on the tokens top-k keeps only; it draws the token the dense computation draws, bf16
    logits (ties at the k-th value) included."""
    import ml_dtypes

    from llmpy.models.decode import sample_tokens
    r = np.random.default_rng(1)
    logits = (r.standard_normal((40, 300)) * 2).astype(ml_dtypes.bfloat16).astype(np.float32)
    for kw in (dict(), dict(top_k=7), dict(top_k=40, top_p=0.7), dict(temperature=0.3, top_p=0.95),
               dict(temperature=2.0, top_k=299)):
        got = sample_tokens(logits, [np.random.default_rng(b) for b in range(40)], **kw)
        assert got.tolist() == [dense_sample(logits[b], np.random.default_rng(b), **kw) for b in range(40)], kw


def test_the_kth_largest_of_each_row_is_np_partitions_and_the_sampler_draws_as_dense_at_a_real_vocabulary():
    """kth_largest finds the k-th largest among the values at or above the k-th largest chunk maximum: the same
    value as np.partition for any k (chunk bound used or not), ties (bf16 logits), -inf and NaN rows; at a 32,000
    vocabulary the sampler built on it draws what the dense computation draws."""
    import ml_dtypes

    from llmpy.models.decode import kth_largest, sample_tokens
    r = np.random.default_rng(2)
    x = (r.standard_normal((12, 32000)) * 3).astype(ml_dtypes.bfloat16).astype(np.float32)
    x[1, 5:9000] = -np.inf  # a row mostly -inf
    x[2] = 1.0  # a row of ties
    x[3, 17] = np.nan  # np.partition's own answer
    x[4, 31990:] = 50.0  # the largest values in the tail chunk (32,000 = 250 x 128)
    for k in (1, 2, 40, 250, 251, 4000, 32000):
        assert np.array_equal(kth_largest(x, k), np.partition(x, -k, axis=-1)[:, -k], equal_nan=True), k
    y = x[[0, 1, 2, 4, 5, 6]]
    for kw in (dict(top_k=40), dict(top_k=1), dict(top_k=250, top_p=0.9, temperature=0.7)):
        got = sample_tokens(y, [np.random.default_rng(b) for b in range(6)], **kw)
        assert got.tolist() == [dense_sample(y[b], np.random.default_rng(b), **kw) for b in range(6)], kw
