"""benchmarks/quality.py's spread report (no GPU needed: the curves are given)."""
from benchmarks.quality import spread_report


def _runs(curves: dict) -> dict:
    return {k: {"curve": [[s, x] for s, x in c.items()]} for k, c in curves.items()}


def test_spread_report_says_inside_or_outside_and_pairs_by_seed():
    lines = spread_report(_runs({
        "master:1": {0: 10.0, 50: 5.0}, "master:2": {0: 10.2, 50: 5.2},
        "fp8:1": {0: 10.1, 50: 5.3}, "fp8:2": {0: 10.2, 50: 5.4}}))
    assert lines[0] == ("step 0: master [10.0000, 10.2000]; fp8 10.1000, 10.2000 inside, paired +0.0500")
    assert lines[1] == ("step 50: master [5.0000, 5.2000]; fp8 5.3000, 5.4000 OUTSIDE, paired +0.2500")


def test_spread_report_without_a_common_seed_gives_no_paired_figure():
    lines = spread_report(_runs({"master:1": {0: 1.0}, "master:2": {0: 2.0}, "fp8:3": {0: 1.5}}))
    assert lines == ["step 0: master [1.0000, 2.0000]; fp8 1.5000 inside"]


def test_plot_draws_every_result_and_refuses_a_missing_result_list(tmp_path):
    import json

    import pytest

    from benchmarks.quality import main
    r = {"model": "d12", "settings": {"batch_size": 8, "seq_len": 1024},
         "variants": {"master:1": {"curve": [[0, 11.0], [25, 6.0], [50, 5.0]]},
                      "fp8:1": {"curve": [[0, 11.0], [25, 6.1], [50, 5.1]]}}}
    (tmp_path / "r.json").write_text(json.dumps(r))
    out = tmp_path / "q.png"
    assert main(["--plot", str(out), str(tmp_path / "r.json"), str(tmp_path / "r.json")]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="needs OUT.png and at least one"):
        main(["--plot", str(out)])
