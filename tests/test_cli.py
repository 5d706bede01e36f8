"""The command line: a tiny run end to end, and one clear line for every bad input."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ppo_jax as P

ROOT = Path(__file__).parents[1]
TINY = ["--total-timesteps", "1024", "--num-envs", "4", "--num-steps", "32",
        "--hidden-sizes", "16", "16", "--no-compile-cache"]


def run_cli(*args, cwd=ROOT, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / "ppo_jax.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)


def test_cli_trains_and_writes_every_output(tmp_path):
    out = tmp_path / "run"
    start = time.perf_counter()
    result = run_cli("--env", "CartPole-v1", "--num-seeds", "2", "--out", str(out), *TINY)
    process_seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    assert {"config.json", "metrics.jsonl", "learning_curve.png", "params.msgpack",
            "checkpoint.msgpack"} <= set(os.listdir(out))
    assert "diagnostics.png" not in os.listdir(out)  # drawn with --diagnostics only
    config = json.loads((out / "config.json").read_text())
    assert config["num_envs"] == 4 and config["num_updates"] == 8 and config["num_seeds"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 8 * 2
    assert {(r["update"], r["seed"]) for r in rows} == {(u, s) for u in range(8) for s in range(2)}
    assert rows[-1]["env_steps"] == 1024
    assert {"episode_return", "approx_kl", "explained_variance", "grad_norm"} <= set(rows[0])
    assert "final return per seed" in result.stdout and "steps/s" in result.stdout
    # The summary's wall time holds compiling and training, and no more than the process.
    times = re.search(r"compile ([\d.]+) s \| train ([\d.]+) s \| wall ([\d.]+) s", result.stdout)
    compile_s, train_s, wall_s = map(float, times.groups())
    assert compile_s + train_s <= wall_s + 0.1 and wall_s <= process_seconds
    assert (out / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Traceback" not in result.stderr


def test_explicit_flags_override_the_env_preset():
    config = P.parse_config(["--env", "Pendulum-v1", "--gamma", "0.5"])
    assert config.gamma == 0.5
    assert config.num_envs == P.PRESETS["Pendulum-v1"]["num_envs"]
    assert P.parse_config(["--env=Pendulum-v1"]).gamma == P.PRESETS["Pendulum-v1"]["gamma"]


BAD_INPUTS = {
    "unknown env": (["--env", "CartPol-v1"], "did you mean CartPole-v1"),
    "indivisible minibatches": (["--num-envs", "3", "--num-steps", "5", "--num-minibatches", "4"],
                                "divisible"),
    "zero envs": (["--num-envs", "0"], "num_envs must be positive"),
    "negative steps": (["--num-steps", "-8"], "num_steps must be positive"),
    "zero epochs": (["--update-epochs", "0"], "update_epochs must be positive"),
    "zero seeds": (["--num-seeds", "0"], "num_seeds must be positive"),
    "budget below one batch": (["--total-timesteps", "100"], "less than one batch"),
    "zero learning rate": (["--learning-rate", "0"], "learning_rate must be a positive"),
    "nan learning rate": (["--learning-rate", "nan"], "learning_rate must be a finite number"),
    "gamma above one": (["--gamma", "1.5"], "gamma must lie in [0, 1]"),
    "negative lambda": (["--gae-lambda", "-0.1"], "gae_lambda must lie in [0, 1]"),
    "negative clip": (["--clip-eps", "-0.2"], "clip_eps must be >= 0"),
    "mask on continuous env": (["--env", "Pendulum-v1", "--action-mask", "on"], "discrete"),
    "unwritable out": (["--out", "/proc/ppo_jax_test"], "cannot write to --out"),
    "out is a file": (["--out", __file__], "not an empty folder"),
    "not a number": (["--gamma", "abc"], "--gamma"),
    "unknown flag": (["--gama", "0.9"], "gama"),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_gets_one_line_and_exit_code_2(name, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default --out would land here, and must not
    args, expected = BAD_INPUTS[name]
    assert P.main(args + ["--quiet"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert expected in lines[0]
    assert not os.path.exists(tmp_path / "runs")


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    result = run_cli("--env", "CartPol-v1", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_help_lists_every_config_field():
    result = run_cli("--help")
    assert result.returncode == 0
    for field in P.Config.__dataclass_fields__:
        assert "--" + field.replace("_", "-") in result.stdout
