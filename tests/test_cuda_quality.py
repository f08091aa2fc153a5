"""Quality: d12 trained 300 steps in bf16 on the GPU ends within 2% (val loss) of a PyTorch reference run of the
same model, init, data order and settings (benchmarks/quality.py). Needs a GPU and torch with CUDA."""
import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_d12_300_steps_matches_pytorch():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA here")
    from benchmarks.quality import compare, parser
    r = compare(parser().parse_args([]))
    print(r)
    assert r["llmpy_val_loss"] < 6.0, "the run should have learned (init is ~10.9)"
    assert abs(r["relative_difference"]) <= 0.02
