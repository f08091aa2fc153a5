"""Decoding fixtures the CPU and GPU tests share: small models of every family (the MatMul-free LM also packed) with a
short context, so that generation runs past it, and greedy generation fed one decoding step at a time."""
import numpy as np

TINY = {"gpt2": "gpt2:l2h2c64t16v300", "llama3": "llama3:l2d64h4k2f128v300t16", "mmfree": "mmfree:l2d64i128v300t16",
        "mmfree packed": "mmfree:l2d64i128v300t16"}


def tiny(name, tmp_path):
    """(config, weights) of TINY[name]: its init with the gains, biases and lower bounds moved off their constants,
    so every term matters; the packed model's as formats/ternary.py reads them back."""
    from llmpy.config import config_from_name, family_of
    from llmpy.formats.ternary import read_ternary, write_ternary
    from llmpy.models.params import init_params
    cfg = config_from_name(TINY[name])
    p = init_params(family_of(cfg).spec(cfg), 7)
    r = np.random.default_rng(7)
    for k, v in p.items():
        if v.ndim == 1 or k in ("lower_bounds", "ln1w", "ln2w", "gnormw"):
            p[k] = (v + 0.1 * r.standard_normal(v.shape)).astype(np.float32)
    if name.endswith("packed"):
        write_ternary(tmp_path / "t.safetensors", cfg, p)
        cfg, p = read_ternary(tmp_path / "t.safetensors")
    return cfg, p


def stepwise_greedy(model, prompt, n):
    """Greedy generation fed one decoding step at a time (no prefill): a prompt from its last maxT tokens; past the
    context a fresh state refilled from the last maxT-1 tokens, for a state of bounded capacity."""
    maxT = model.cfg.max_seq_len
    seq = list(prompt)

    def feed(tokens, state):
        for t in tokens:
            logits = model.decode_step(np.array([[t]]), state)[0]
        return logits

    state = model.new_decode_state(maxT)
    logits, out = feed(seq[-maxT:], state), []
    for i in range(n):
        out.append(int(np.argmax(logits)))
        seq.append(out[-1])
        if i + 1 < n:
            if state.pos >= state.capacity:
                state = model.new_decode_state(maxT)
                logits = feed(seq[-(maxT - 1):], state)
            else:
                logits = feed(seq[-1:], state)
    return out
