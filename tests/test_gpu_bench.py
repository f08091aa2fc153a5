"""benchmarks/gpu.py's energy accounting (no GPU needed: the counter's readings are given)."""
from benchmarks.gpu import EnergyCounter, joules_per_step, watts


def test_joules_per_step_from_two_readings():
    assert joules_per_step(1_000, 5_000, 2) == 2.0  # 4,000 mJ over two steps
    assert joules_per_step(0, 112_460, 1) == 112.46
    assert joules_per_step(None, 5_000, 2) is None  # no counter: no figure, never a made-up one
    assert joules_per_step(1_000, None, 2) is None
    assert joules_per_step(1_000, 5_000, 0) is None


def test_mean_watts_from_two_readings():
    assert watts(1_000, 70_000, 0.1) == 690.0  # 69 J in 100 ms
    assert watts(None, 70_000, 0.1) is None
    assert watts(1_000, 70_000, 0.0) is None


def test_energy_counter_without_the_library_reads_none(monkeypatch):
    import ctypes

    def missing(name, *a, **k):
        raise OSError(f"{name}: cannot open shared object file")
    monkeypatch.setattr(ctypes, "CDLL", missing)
    assert EnergyCounter().mj() is None


def test_unknown_side_is_refused_before_any_side_runs():
    import pytest

    from benchmarks.gpu import main
    with pytest.raises(SystemExit, match="unknown side 'llmpy\\+turbo'"):
        main(["--sides", "llmpy+tune,llmpy+turbo"])
