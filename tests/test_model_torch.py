"""The whole model against PyTorch (test oracle only): logits, loss, every parameter gradient, then 10 AdamW
steps with clipping, all in float32, within 1e-5 relative."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks.torch_gpt2 import TorchGPT2  # noqa: E402
from llmpy.backends import get_backend  # noqa: E402
from llmpy.models.gpt2 import GPT2Config, spec  # noqa: E402
from llmpy.models.gpt2 import GPT2  # noqa: E402
from llmpy.train.optim import AdamW  # noqa: E402

CFG = GPT2Config(max_seq_len=32, vocab_size=250, padded_vocab_size=256, num_layers=2, num_heads=4, channels=32)
B, T = 4, 16


def relerr(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = GPT2(CFG, get_backend("cpu"), B, T)
    model.init_weights(7)
    rng = np.random.default_rng(3)
    x = rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int32)
    y = rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int32)
    ref = TorchGPT2(CFG, model.params_numpy())
    return model, ref, x, y


def test_logits_loss_grads(setup):
    model, ref, x, y = setup
    model.forward(x)
    logits = model.acts["logits"].reshape(B, T, -1).copy()
    model.zero_grad()
    loss = model.forward(x, y, grad_scale=1.0 / (B * T))
    model.backward()
    tl, tloss = ref(torch.tensor(x, dtype=torch.long), torch.tensor(y, dtype=torch.long))
    tloss.backward()
    assert relerr(logits, tl[..., :CFG.vocab_size].detach().numpy()) < 1e-5
    assert abs(loss - tloss.item()) / tloss.item() < 1e-5
    for name in (s.name for s in spec(CFG)):
        g = model.grads[name]
        tg = getattr(ref, name).grad.numpy()
        assert relerr(g, tg) < 1e-5, name
    assert np.all(model.grads["wte"][CFG.vocab_size:] == 0)


def test_ten_adamw_steps(setup):
    _, _, x0, _ = setup
    model = GPT2(CFG, get_backend("cpu"), B, T)
    model.init_weights(11)
    ref = TorchGPT2(CFG, model.params_numpy())
    lr, betas, eps, wd, clip = 3e-3, (0.9, 0.95), 1e-8, 0.1, 1.0
    opt = AdamW(model, beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=wd)
    topt = ref.optimizer(lr, betas, eps, wd)
    rng = np.random.default_rng(5)
    ours, theirs, clipped = [], [], 0
    x = rng.integers(0, CFG.vocab_size, (B, T + 1)).astype(np.int32)
    x, y = np.ascontiguousarray(x[:, :-1]), np.ascontiguousarray(x[:, 1:])
    for step in range(10):  # one batch over and over: the loss must fall as it is memorised
        model.zero_grad()
        ours.append(model.forward(x, y, grad_scale=1.0 / (B * T)))
        model.backward()
        norm = opt.step(lr, grad_clip=clip)
        clipped += norm > clip
        topt.zero_grad()
        _, tloss = ref(torch.tensor(x, dtype=torch.long), torch.tensor(y, dtype=torch.long))
        tloss.backward()
        tnorm = torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
        assert abs(norm - tnorm.item()) / tnorm.item() < 1e-5
        topt.step()
        theirs.append(tloss.item())
    assert clipped > 0, "the test should exercise clipping"
    assert ours[-1] < ours[0] - 0.1, "the model should memorise the batch"
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=0)
    C = CFG.channels
    for name in (s.name for s in spec(CFG)):
        ours_p, ref_p = model.params[name], getattr(ref, name).detach().numpy()
        if name == "qkvb":  # the key bias has an exactly-zero true gradient (softmax is shift-invariant), so
            keep = np.r_[0:C, 2 * C:3 * C]  # both sides update it from rounding noise that Adam amplifies
            ours_p, ref_p = ours_p[:, keep], ref_p[:, keep]
        assert relerr(ours_p, ref_p) < 1e-5, name


def test_chunked_lm_head_matches_one_chunk(setup):
    """Forming the logits a chunk of rows at a time (and the LM head's backward with them) changes nothing."""
    _, _, x, y = setup
    out = []
    for chunk in (B * T, 24):  # 24 does not divide 64 rows: a short last chunk too
        m = GPT2(CFG, get_backend("cpu"), B, T, logits_chunk=chunk)
        m.init_weights(7)
        loss = m.forward(x, y, grad_scale=1.0 / (B * T))
        m.backward()
        out.append((loss, {s.name: m.grads[s.name].copy() for s in spec(CFG)}))
    (l1, g1), (l2, g2) = out
    assert abs(l1 - l2) <= 1e-6 * l1
    for n in g1:
        assert relerr(g2[n], g1[n]) < 1e-6, n
