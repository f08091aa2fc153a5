"""The whole Llama 3 model against Hugging Face transformers' LlamaForCausalLM (test oracle only, CPU, fp32): logits,
loss and every parameter gradient within 1e-5, then 10 AdamW steps with clipping from the same weights. Our q and k
rows are in Meta's interleaved RoPE order; HF's are permuted (rotate_half pairs): the conversion here is written
independently of llmpy's (transformers' convert_llama_weights_to_hf permutation)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmpy.backends import get_backend  # noqa: E402
from llmpy.config import config_from_name  # noqa: E402
from llmpy.models.llama3 import Llama  # noqa: E402
from llmpy.train.optim import AdamW  # noqa: E402

B, T = 3, 16


def relerr(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def meta_to_hf_rows(w, heads, d):
    """(heads*d, C) in interleaved pairs -> HF's halves: W.view(h, d/2, 2, C).transpose(1, 2)."""
    return w.reshape(heads, d // 2, 2, -1).transpose(0, 2, 1, 3).reshape(heads * d, -1)


def hf_to_meta_rows(w, heads, d):
    return w.reshape(heads, 2, d // 2, -1).transpose(0, 2, 1, 3).reshape(heads * d, -1)


def hf_model(cfg, p):
    H, K, d, F, C = cfg.num_heads, cfg.num_kv_heads, cfg.head_size, cfg.ffn_hidden, cfg.channels
    hc = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=C, intermediate_size=F, num_hidden_layers=cfg.num_layers,
        num_attention_heads=H, num_key_value_heads=K, max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tied, attention_bias=False, mlp_bias=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": cfg.rope_theta, "factor": cfg.rope_factor,
                         "low_freq_factor": cfg.rope_low_freq_factor, "high_freq_factor": cfg.rope_high_freq_factor,
                         "original_max_position_embeddings": cfg.rope_original_context})
    hc._attn_implementation = "eager"
    m = transformers.LlamaForCausalLM(hc).float()
    V = cfg.vocab_size
    sd = {"model.embed_tokens.weight": p["wte"][:V], "model.norm.weight": p["lnfw"]}
    if not cfg.tied:
        sd["lm_head.weight"] = p["lm_head"][:V]
    for l in range(cfg.num_layers):
        q, k, v = np.split(p["qkvw"][l], [H * d, (H + K) * d])
        up, gate = np.split(p["fcw"][l], 2)
        pre = f"model.layers.{l}."
        sd |= {pre + "input_layernorm.weight": p["ln1w"][l], pre + "post_attention_layernorm.weight": p["ln2w"][l],
               pre + "self_attn.q_proj.weight": meta_to_hf_rows(q, H, d),
               pre + "self_attn.k_proj.weight": meta_to_hf_rows(k, K, d), pre + "self_attn.v_proj.weight": v,
               pre + "self_attn.o_proj.weight": p["attprojw"][l], pre + "mlp.gate_proj.weight": gate,
               pre + "mlp.up_proj.weight": up, pre + "mlp.down_proj.weight": p["fcprojw"][l]}
    missing, unexpected = m.load_state_dict({k: torch.tensor(np.ascontiguousarray(v)) for k, v in sd.items()},
                                            strict=False)
    assert not unexpected and all("rotary" in k or (cfg.tied and k == "lm_head.weight") for k in missing), missing
    return m


def our_grads_from_hf(cfg, m):
    """HF's parameter gradients in our names and layout (the inverse conversion)."""
    H, K, d, V = cfg.num_heads, cfg.num_kv_heads, cfg.head_size, cfg.vocab_size
    g = {k: v.grad.detach().numpy().astype(np.float64) for k, v in m.named_parameters()}
    L = cfg.num_layers
    out = {"wte": g["model.embed_tokens.weight"], "lnfw": g["model.norm.weight"]}
    if not cfg.tied:
        out["lm_head"] = g["lm_head.weight"]
    lay = lambda name: [g[f"model.layers.{l}.{name}"] for l in range(L)]  # noqa: E731
    out["ln1w"], out["ln2w"] = np.stack(lay("input_layernorm.weight")), np.stack(lay("post_attention_layernorm.weight"))
    out["qkvw"] = np.stack([np.concatenate([hf_to_meta_rows(q, H, d), hf_to_meta_rows(k, K, d), v]) for q, k, v in
                            zip(lay("self_attn.q_proj.weight"), lay("self_attn.k_proj.weight"),
                                lay("self_attn.v_proj.weight"))])
    out["attprojw"] = np.stack(lay("self_attn.o_proj.weight"))
    out["fcw"] = np.stack([np.concatenate([u, gt]) for u, gt in zip(lay("mlp.up_proj.weight"),
                                                                     lay("mlp.gate_proj.weight"))])
    out["fcprojw"] = np.stack(lay("mlp.down_proj.weight"))
    return out, V


@pytest.fixture(scope="module", params=["l2d64h4k2f192v256t16r32", "l2d64h4k4f128v300t16-tied"])
def setup(request):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = config_from_name("llama3:" + request.param)
    model = Llama(cfg, get_backend("cpu"), B, T, logits_chunk=20)  # several chunks of logits, a short last one
    model.init_weights(7)
    p = model.params_numpy()
    r = np.random.default_rng(2)
    for n in ("ln1w", "ln2w", "lnfw"):  # non-trivial gains so that every term matters
        p[n] = (p[n] + 0.1 * r.standard_normal(p[n].shape)).astype(np.float32)
    model.load_params(p)
    x = r.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    y = r.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    return cfg, model, p, x, y


def test_logits_loss_and_every_gradient(setup):
    cfg, model, p, x, y = setup
    ref = hf_model(cfg, p)
    inference = Llama(cfg, get_backend("cpu"), B, T, training=False)  # logits only: one chunk holds all rows
    inference.load_params(p)
    inference.forward(x)
    logits = inference.acts["logits"].reshape(B, T, -1).copy()
    model.zero_grad()
    loss = model.forward(x, y, grad_scale=1.0 / (B * T))
    model.backward()
    out = ref(input_ids=torch.tensor(x, dtype=torch.long))
    tl = out.logits
    tloss = torch.nn.functional.cross_entropy(tl.reshape(-1, tl.shape[-1]),
                                              torch.tensor(y, dtype=torch.long).reshape(-1))
    tloss.backward()
    assert relerr(logits, tl.detach().numpy()) < 1e-5
    assert abs(loss - tloss.item()) / tloss.item() < 1e-5
    grads, V = our_grads_from_hf(cfg, ref)
    for name, want in grads.items():
        got = model.grads[name]
        got = got[:V] if name in ("wte", "lm_head") else got
        assert relerr(got, want) < 1e-5, name
    for name in ("wte", "lm_head"):
        if name in model.params.shapes:
            assert np.all(model.grads[name][V:] == 0)


def test_ten_adamw_steps(setup):
    cfg, _, p, x0, _ = setup
    model = Llama(cfg, get_backend("cpu"), B, T)
    model.load_params(p)
    ref = hf_model(cfg, p)
    lr, betas, eps, wd, clip = 3e-3, (0.9, 0.95), 1e-8, 0.1, 1.0
    opt = AdamW(model, beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=wd)
    # decay on the tensors our spec decays: every matrix and embedding, not the norms
    decay = [v for k, v in ref.named_parameters() if not k.endswith("norm.weight")]
    other = [v for k, v in ref.named_parameters() if k.endswith("norm.weight")]
    topt = torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": other, "weight_decay": 0.0}],
                             lr=lr, betas=betas, eps=eps)
    r = np.random.default_rng(5)
    w = r.integers(0, cfg.vocab_size, (B, T + 1)).astype(np.int32)
    x, y = np.ascontiguousarray(w[:, :-1]), np.ascontiguousarray(w[:, 1:])
    ours, theirs, clipped = [], [], 0
    for _ in range(10):  # one batch over and over: the loss must fall as it is memorised
        model.zero_grad()
        ours.append(model.forward(x, y, grad_scale=1.0 / (B * T)))
        model.backward()
        norm = opt.step(lr, grad_clip=clip)
        clipped += norm > clip
        topt.zero_grad()
        tl = ref(input_ids=torch.tensor(x, dtype=torch.long)).logits
        tloss = torch.nn.functional.cross_entropy(tl.reshape(-1, tl.shape[-1]),
                                                  torch.tensor(y, dtype=torch.long).reshape(-1))
        tloss.backward()
        tnorm = torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
        assert abs(norm - tnorm.item()) / tnorm.item() < 1e-5
        topt.step()
        theirs.append(tloss.item())
    assert clipped > 0, "the test should exercise clipping"
    assert ours[-1] < ours[0] - 0.1, "the model should memorise the batch"
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=0)
