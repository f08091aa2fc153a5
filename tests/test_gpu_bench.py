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


def test_power_profile_is_the_mean_between_the_first_and_last_update():
    from benchmarks.gpu import power_profile
    # 10 ms at 700 W, then 30 ms at 300 W, then 10 ms at 700 W (counter in mJ): 23 J in 50 ms
    pts = [(0.00, 0), (0.01, 7_000), (0.04, 16_000), (0.05, 23_000)]
    p = power_profile(pts)
    assert p["update_ms"] == 10.0 and p["span_s"] == 0.05 and p["watts"] == 460.0
    assert power_profile(pts[:2]) is None


def test_power_trace_without_a_counter_reports_nothing():
    from benchmarks.gpu import PowerTrace

    class NoCounter:
        def mj(self):
            return None
    assert PowerTrace(NoCounter()).start().stop() is None


def test_power_trace_follows_a_moving_counter():
    import time

    from benchmarks.gpu import PowerTrace

    class Kilowatt:  # 1 mJ a microsecond: 1,000 W
        def mj(self):
            return int(time.perf_counter() * 1e6)
    tr = PowerTrace(Kilowatt(), period=0.001).start()
    time.sleep(0.05)
    p = tr.stop()
    assert p is not None and p["span_s"] > 0.02
    assert 950 < p["watts"] < 1050


def test_compare_families_writes_outside_the_tracked_docs_and_replaces_nothing(tmp_path, capsys):
    """benchmarks/compare_families.py: by default into runs/compare/ (ignored by git), never over the published
    docs/compare_*.png/json; an earlier comparison's files stop it before anything runs, unless --overwrite."""
    import argparse

    import pytest

    from benchmarks import compare_families as cf
    assert cf.OUT == cf.ROOT / "runs" / "compare"
    assert "/runs/" in (cf.ROOT / ".gitignore").read_text().split()
    out, runs = cf.targets(argparse.Namespace(preset="cpu", out=str(cf.OUT), runs=None, overwrite=True))
    assert out.parent == cf.OUT and all(d.parent == cf.OUT for d in runs.values())
    (tmp_path / "compare_cpu.json").write_text("mine")
    with pytest.raises(SystemExit, match="compare_cpu.json already exists: .*--overwrite"):
        cf.main(["--out", str(tmp_path), "--steps", "1"])
    assert (tmp_path / "compare_cpu.json").read_text() == "mine"
    out, _ = cf.targets(argparse.Namespace(preset="cpu", out=str(tmp_path), runs=None, overwrite=True))
    assert out == tmp_path / "compare_cpu"
