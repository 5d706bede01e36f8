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


def test_run_cli_peak_reports_each_runs_own_peak_rss(tmp_path):
    """bench.py memory once reported the largest peak of every earlier child (a throughput
    run's compile), not the training run's own; and a child's ru_maxrss also counts the
    memory of the process that started it, this one's included."""
    big, small = tmp_path / "big.py", tmp_path / "small.py"
    big.write_text("import numpy as np\nx = np.ones(50_000_000)\nprint(x.sum())\n")  # 400 MB
    small.write_text("print('ok')\n")
    ballast = bytearray(b"\x01") * (300 * 2**20)  # this process: 300 MB more, resident
    _, out_big, peak_big = bench.run_cli_peak([], str(tmp_path), str(big))
    _, out_small, peak_small = bench.run_cli_peak([], str(tmp_path), str(small))
    assert out_big.strip() == "50000000.0" and out_small.strip() == "ok"
    assert peak_big > 400 and peak_small < 100
    del ballast
