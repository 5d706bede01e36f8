"""The persistent compilation cache keeps programs with host calls: a second process loads
the training loop, progress callback included, instead of compiling it."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]

# One process: build the loop with a progress callback that asks to stop after update 3,
# train, and say which programs XLA compiled and what the callback saw.
TRAIN_ONCE = """
import json, sys
import numpy as np
from jax._src import compiler
import ppo_jax as P
sys.path.insert(0, "tests")
from helpers import tiny_config

P.CACHE_MIN_COMPILE_SECONDS = 0.0  # the tests' tiny programs compile fast
P.enable_compile_cache()
compiled, real = [], compiler.backend_compile_and_load
def counting(backend, module, *rest):
    compiled.append(str(module.operation.attributes["sym_name"]).strip('"'))
    return real(backend, module, *rest)
compiler.backend_compile_and_load = counting

reports = []
def on_report(done, episode_return):
    reports.append(int(done))
    return np.int32(int(done) + 1), np.bool_(int(done) >= 3)

config = tiny_config()
runner = P.make_runner(config, on_report=on_report)
loop = runner.run(runner.init(P.seed_keys(config)))
print(json.dumps({"compiled": compiled, "reports": reports, "done": loop.updates_done,
                  "value_loss": loop.metrics()["value_loss"].tolist()}))
"""


def train_once(cache_home):
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home)}
    result = subprocess.run([sys.executable, "-c", TRAIN_ONCE], capture_output=True, text=True,
                            timeout=600, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_the_loop_and_calls_its_own_callback(tmp_path):
    first = train_once(tmp_path)
    assert "jit_run" in first["compiled"]
    entries = os.listdir(tmp_path / "ppo_jax")
    assert any(name.startswith("jit_run") and "host-calls" in name for name in entries), entries
    second = train_once(tmp_path)
    assert "jit_run" not in second["compiled"] and "jit_init" not in second["compiled"]
    # The loaded program calls this process's callback, and obeys what it returns (stop).
    assert second["reports"] == first["reports"] == [1, 2, 3]
    assert second["done"] == first["done"] == 3
    assert second["value_loss"] == first["value_loss"]


def test_an_unreadable_entry_is_compiled_again(tmp_path):
    train_once(tmp_path)
    for name in os.listdir(tmp_path / "ppo_jax"):
        if "host-calls" in name:
            (tmp_path / "ppo_jax" / name).write_bytes(b"not an executable")
    again = train_once(tmp_path)
    assert "jit_run" in again["compiled"] and again["done"] == 3


def test_a_cache_folder_that_cannot_be_made_only_costs_the_compile():
    result = train_once("/proc/ppo_jax_no_such_cache")
    assert "jit_run" in result["compiled"] and result["done"] == 3


def test_eval_of_a_cached_run_compiles_once(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    cli = lambda *args: subprocess.run([sys.executable, str(ROOT / "ppo_jax.py"), *args],
                                       capture_output=True, text=True, timeout=600, cwd=ROOT,
                                       env=env)
    run = tmp_path / "run"
    trained = cli("--total-timesteps", "256", "--num-envs", "4", "--num-steps", "8",
                  "--hidden-sizes", "16", "16", "--quiet", "--out", str(run))
    assert trained.returncode == 0, trained.stderr[-3000:]
    before = set(os.listdir(tmp_path / "cache" / "ppo_jax"))
    first = cli("eval", str(run), "--episodes", "3")
    assert first.returncode == 0, first.stderr[-3000:]
    written = set(os.listdir(tmp_path / "cache" / "ppo_jax")) - before
    assert any(name.startswith("jit_evaluate_all") for name in written), written
    second = cli("eval", str(run), "--episodes", "3")
    assert second.stdout == first.stdout
    assert set(os.listdir(tmp_path / "cache" / "ppo_jax")) == before | written
