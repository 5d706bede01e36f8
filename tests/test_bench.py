"""benchmarks/bench.py's verdicts on #2's bars (the timings themselves are never tested)."""

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "bench", Path(__file__).parents[1] / "benchmarks" / "bench.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_a_ratio_just_short_of_the_bar_is_not_met():
    # 165,006 against 124,460 steps/s is 1.3258: with two decimals it printed as the bar.
    line = bench.against_bar(165_006 / 124_460, bench.SPEED_BAR, "200k / 150k")
    assert line == "ratio 1.326, bar 1.333 (200k / 150k): not met"
    assert bench.against_bar(200_000 / 150_000, bench.SPEED_BAR, "x").endswith(": met")


def test_the_cold_bar_is_an_upper_bound():
    assert bench.against_bar(0.61, bench.COLD_BAR, "8 s / 10 s", at_most=True).endswith(": met")
    assert bench.against_bar(0.81, bench.COLD_BAR, "8 s / 10 s", at_most=True).endswith("not met")
