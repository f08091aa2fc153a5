"""The FP8 recipe against PyTorch (test oracle only): nanoGPT's GPT-2 (benchmarks/torch_gpt2.py) whose four block
products and LM head run on FP8 operands cast by torch's own float8 types, scaled per tensor by
2^floor(log2(fmax / amax)) (the first step of a fresh run scales each operand by its own amax; the head's output
gradient by its bound, the loss's gradient per token), fp32 accumulation. llmpy's CPU emulation of --dtype fp8 must
give the same logits, loss and gradients."""
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("ml_dtypes")

import benchmarks.torch_gpt2 as tg  # noqa: E402
from llmpy.backends import get_backend  # noqa: E402
from llmpy.models.gpt2 import GPT2, GPT2Config, spec  # noqa: E402

CFG = GPT2Config(max_seq_len=32, vocab_size=250, padded_vocab_size=256, num_layers=2, num_heads=4, channels=64)
B, T = 4, 16
E4M3, E5M2 = (torch.float8_e4m3fn, 448.0), (torch.float8_e5m2, 57344.0)


def scale(t, fmt):
    a = t.detach().abs().max().item()
    return 2.0 ** math.floor(math.log2(fmt[1] / a))


def cast(t, s, fmt):
    """t on the FP8 grid at scale s (as fp32 values of t * s)."""
    return (t.detach() * s).clamp(-fmt[1], fmt[1]).to(fmt[0]).to(torch.float32)


class Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, dloss=None):
        # dloss: the LM head (no bias), whose output gradient is bounded by dloss and scaled by that bound
        sx, sw = scale(x, E4M3), scale(w, E4M3)
        xq, wq = cast(x, sx, E4M3).reshape(-1, x.shape[-1]), cast(w, sw, E4M3)
        ctx.save_for_backward(xq, wq)
        ctx.s, ctx.shape, ctx.dloss = (sx, sw), x.shape, dloss
        out = (xq @ wq.T) / (sx * sw)
        return (out if b is None else out + b).reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, dy):
        xq, wq = ctx.saved_tensors
        sx, sw = ctx.s
        d2 = dy.reshape(-1, dy.shape[-1])
        sd = scale(d2, E5M2) if ctx.dloss is None else 2.0 ** math.floor(math.log2(E5M2[1] / ctx.dloss))
        dq = cast(d2, sd, E5M2)
        dx = (dq @ wq) / (sd * sw)
        dw = (dq.T @ xq) / (sd * sx)
        return dx.reshape(ctx.shape), dw, None if ctx.dloss is not None else d2.sum(0), None


class _Functional:
    """torch.nn.functional with `linear` on FP8 operands; the LM head's (the tied embedding's, without bias) too
    where dloss is given, its output gradient under the fixed scale of that bound, else in fp32."""

    def __init__(self, model, dloss):
        self.model, self.dloss = model, dloss

    def __getattr__(self, name):
        return getattr(torch.nn.functional, name)

    def linear(self, x, w, b=None):
        if w.data_ptr() != self.model.wte.data_ptr():
            return Fp8Linear.apply(x, w, b)
        if self.dloss is None:  # the head in fp32
            return torch.nn.functional.linear(x, w, b)
        return Fp8Linear.apply(x, w, None, self.dloss)


def relerr(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("head", [False, True])
def test_fp8_gpt2_matches_pytorch_float8(monkeypatch, head):
    monkeypatch.setenv("LLMPY_FP8_HEAD", "1" if head else "0")  # the LM head an FP8 product too, or fp32
    torch.manual_seed(0)
    torch.set_num_threads(1)
    be = get_backend("cpu", "fp8")
    model = GPT2(CFG, be, B, T)
    model.init_weights(7)
    be.fp8_quantize_weights()
    be.fp8_begin_step()
    rng = np.random.default_rng(3)
    x = rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int32)
    y = rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int32)
    ref = tg.TorchGPT2(CFG, model.params_numpy())
    monkeypatch.setattr(tg, "F", _Functional(ref, 1.0 / (B * T) if head else None))
    loss = model.forward(x, y, grad_scale=1.0 / (B * T))
    model.backward()
    tl, tloss = ref(torch.tensor(x, dtype=torch.long), torch.tensor(y, dtype=torch.long))
    tloss.backward()
    # the same quantized operands, fp32 sums in another order (an operand within an fp32 ulp of a rounding
    # midpoint could round the other way: none does here)
    assert abs(loss - tloss.item()) / tloss.item() < 1e-5
    for name in (s.name for s in spec(CFG)):
        assert relerr(model.grads[name], getattr(ref, name).grad.numpy()) < 1e-5, name
    # and FP8 is not fp32: the fp32 reference differs by far more
    monkeypatch.setattr(tg, "F", torch.nn.functional)
    ref32 = tg.TorchGPT2(CFG, model.params_numpy())
    _, loss32 = ref32(torch.tensor(x, dtype=torch.long), torch.tensor(y, dtype=torch.long))
    loss32.backward()
    assert relerr(model.grads["fcw"], ref32.fcw.grad.numpy()) > 1e-3
