"""dev/kernel_profile.py's aggregation of a device timeline (no GPU: synthetic events, times in µs)."""
from dev.kernel_profile import MARKER, aggregate


def ev(kind, name, start, end):
    return {"kind": kind, "name": name, "start": start, "end": end}


def test_gaps_split_by_a_memset_before_the_kernel():
    # one unit between two markers: a (0-10), gap 2, b (12-20), memset (21-22), gap 5 in all, c (25-40), d (40-50)
    events = [ev("kernel", MARKER, -5, -4), ev("kernel", "a", 0, 10), ev("kernel", "b", 12, 20),
              ev("memset", "Memset (Device)", 21, 22), ev("kernel", "c", 25, 40), ev("kernel", "d", 40, 50),
              ev("kernel", MARKER, 60, 61)]
    r = aggregate(events, 1, 60)
    assert r["gaps"]["after_memset"]["count_per_unit"] == 1
    assert abs(r["gaps"]["after_memset"]["ms_per_unit"] - 0.005) < 1e-12
    assert r["gaps"]["other"]["count_per_unit"] == 2  # b (2 µs) and d (0)
    assert abs(r["gaps"]["other"]["ms_per_unit"] - 0.002) < 1e-12
    assert abs(r["idle_ms"] - 0.007) < 1e-12 and r["kernels_per_unit"] == 4


def test_gaps_count_from_the_latest_end_of_overlapping_kernels():
    # b runs inside a's span: c's gap is from a's end (30), not b's (15)
    events = [ev("kernel", MARKER, -2, -1), ev("kernel", "a", 0, 30), ev("kernel", "b", 5, 15),
              ev("kernel", "c", 33, 40), ev("kernel", MARKER, 50, 51)]
    r = aggregate(events, 1, 60)
    assert abs(r["gaps"]["other"]["ms_per_unit"] - 0.003) < 1e-12


def test_gap_pairs_name_the_idle_transitions():
    # x -> y twice with 3 µs each, y -> x once with 1 µs
    events = [ev("kernel", MARKER, -2, -1), ev("kernel", "x", 0, 5), ev("kernel", "y", 8, 10),
              ev("kernel", "x", 11, 15), ev("kernel", "y", 18, 20), ev("kernel", MARKER, 30, 31)]
    r = aggregate(events, 1, 60)
    top = r["gap_pairs"][0]
    assert (top["before"], top["kernel"], top["count_per_unit"]) == ("x", "y", 2)
    assert abs(top["ms_per_unit"] - 0.006) < 1e-12
    assert (r["gap_pairs"][1]["before"], r["gap_pairs"][1]["kernel"]) == ("y", "x")
