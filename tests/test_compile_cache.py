"""The persistent compilation cache keeps programs with host calls: a second process loads
the training loop, progress callback included, instead of compiling it; and `eval` of a
run that used the cache keeps its program there too. The command line's program store lets
a second identical run skip tracing as well."""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import ppo_jax as P
from helpers import tiny_config

ROOT = Path(__file__).parents[1]

# One process: build the loop with two callbacks, progress (it asks to stop after update 3)
# and checkpoints (every 2 updates), train, save the run's folder (for eval), and say which
# programs XLA compiled and what the callbacks saw.
TRAIN_ONCE = """
import json, os, sys
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

reports, saves = [], []
def on_report(done, episode_return):
    reports.append(int(done))
    return np.int32(int(done) + 1), np.bool_(int(done) >= 3)
def on_checkpoint(loop):
    saves.append(int(np.asarray(loop.runner.update)[0]))

config, out = tiny_config(save_every=2), sys.argv[1]
runner = P.make_runner(config, on_report=on_report, on_checkpoint=on_checkpoint)
loop = runner.run(runner.init(P.seed_keys(config)))
os.makedirs(out, exist_ok=True)
P.write_atomic(os.path.join(out, "config.json"), P.config_json(config))
P.save_checkpoint(config, out, loop)
print(json.dumps({"compiled": compiled, "reports": reports, "saves": saves,
                  "done": loop.updates_done,
                  "value_loss": loop.metrics()["value_loss"].tolist()}))
"""


def run_python(args, cache_home):
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home)}
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                            timeout=600, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def train_once(cache_home, out):
    return json.loads(run_python(["-c", TRAIN_ONCE, str(out)], cache_home).splitlines()[-1])


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """A first process on an empty cache, and the cache it leaves."""
    folder = tmp_path_factory.mktemp("cache")
    run = train_once(folder / "home", folder / "run")
    return dict(run, home=folder / "home", cache=folder / "home" / "ppo_jax", out=folder / "run")


def test_a_second_process_loads_the_loop_and_calls_its_own_callback(first, tmp_path):
    assert "jit_run" in first["compiled"]
    entries = os.listdir(first["cache"])
    assert any(name.startswith("jit_run") and "host-calls" in name for name in entries), entries
    second = train_once(first["home"], tmp_path / "second")
    assert "jit_run" not in second["compiled"] and "jit_init" not in second["compiled"]
    # The loaded program calls this process's callbacks, each the right one, and obeys what
    # they return (stop).
    assert second["reports"] == first["reports"] == [1, 2, 3]
    assert second["saves"] == first["saves"] == [2]
    assert second["done"] == first["done"] == 3
    assert second["value_loss"] == first["value_loss"]
    # A damaged entry is compiled again, and written again.
    damaged = [first["cache"] / name for name in entries if "host-calls" in name]
    for path in damaged:
        path.write_bytes(b"not an executable")
    again = train_once(first["home"], tmp_path / "again")
    assert "jit_run" in again["compiled"] and again["value_loss"] == first["value_loss"]
    assert all(path.read_bytes() != b"not an executable" for path in damaged)


EVAL = """
import sys
import ppo_jax as P
P.CACHE_MIN_COMPILE_SECONDS = 0.0  # the tests' tiny programs compile fast
sys.exit(P.main(["eval", sys.argv[1], "--episodes", "3"]))
"""


def test_eval_of_a_run_that_used_the_cache_keeps_its_program_there(first):
    """(A later eval then loads it, as JAX's own cache does for any program without host
    calls.)"""
    before = set(os.listdir(first["cache"]))
    run_python(["-c", EVAL, str(first["out"])], first["home"])
    written = set(os.listdir(first["cache"])) - before
    assert any(name.startswith("jit_evaluate_all") for name in written), written


# The first program of a process calls the host, and the cache folder cannot be made.
CALLBACK_FIRST = """
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import io_callback
import ppo_jax as P
P.CACHE_MIN_COMPILE_SECONDS = 0.0
P.enable_compile_cache()
seen = []
host = lambda v: seen.append(float(v)) or np.float32(2 * v)
f = jax.jit(lambda x: io_callback(host, jax.ShapeDtypeStruct((), jnp.float32), x) + 1)
print(float(f(jnp.float32(3))), seen)
"""


def test_a_cache_folder_that_cannot_be_made_only_costs_the_compile():
    printed = run_python(["-c", CALLBACK_FIRST], "/proc/ppo_jax_no_such_cache")
    assert printed.splitlines()[-1] == "7.0 [3.0]"


TINY_CLI = ["ppo_jax.py", "--total-timesteps", "2048", "--num-envs", "4", "--num-steps", "32",
            "--update-epochs", "2", "--num-minibatches", "2", "--hidden-sizes", "16", "16",
            "--no-diagnostics", "--tensorboard"]  # its flag once shadowed the store's list


# The command line with the program store turned off: it compiles through JAX's cache only.
WITHOUT_STORE = """
import sys
import ppo_jax as P
P.programs_key = lambda config: None
P.CACHE_MIN_COMPILE_SECONDS = 0.0  # else a fast machine compiles init too quickly to cache it
sys.exit(P.main(sys.argv[1:]))
"""


def train_cli(cache_home, out, store: bool = True) -> set:
    """Train the tiny config through the command line; the programs it traced, by name."""
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home), "JAX_LOG_COMPILES": "1"}
    command = TINY_CLI if store else ["-c", WITHOUT_STORE, *TINY_CLI[1:]]
    result = subprocess.run([sys.executable, *command, "--out", str(out)], capture_output=True,
                            text=True, timeout=600, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2.05k/2.05k" in result.stderr  # the progress bar, fed by run's host call
    return set(re.findall(r"Finished tracing (\w+) for jit", result.stderr)), result.stderr


def test_a_second_identical_run_loads_both_programs_without_tracing_them(tmp_path, monkeypatch):
    home = tmp_path / "home"
    runs = [tmp_path / name for name in ("first", "second", "third")]
    # First, JAX's cache alone gets both programs, as when the store lost its entry (evicted)
    # or its key changed while the programs did not (another JAX setting, another numpy).
    traced, _ = train_cli(home, runs[0], store=False)
    assert {"init", "run"} <= traced
    assert list((home / "ppo_jax").glob("jit_init-*-cache"))
    assert not (home / "ppo_jax" / "programs").exists()
    # The store misses: the run compiles both afresh (stored as JAX's cache had loaded them,
    # they lacked their kernels, and the next run failed: "Function iota.5_kernel not
    # found") and stores them.
    traced, _ = train_cli(home, runs[1])
    assert {"init", "run"} <= traced
    stored = list((home / "ppo_jax" / "programs").iterdir())
    assert len(stored) == 1
    os.utime(stored[0], (1e9, 1e9))  # long unused
    traced, _ = train_cli(home, runs[2])
    assert not {"init", "run", "split_seed"} & traced  # the keys are stored too
    assert stored[0].stat().st_mtime > 1e9  # loading marks it used: evicted last
    assert all((run / "tensorboard").is_dir() for run in runs)
    for run in runs[1:]:
        for name in ("metrics.jsonl", "checkpoint.msgpack", "params.msgpack"):
            assert runs[0].joinpath(name).read_bytes() == run.joinpath(name).read_bytes(), name
    # A damaged entry is removed with a warning, and the run then traces as usual.
    stored[0].write_bytes(b"not a pickle")
    monkeypatch.setattr(P, "programs_path", lambda key: str(stored[0]))
    with pytest.warns(UserWarning, match="could not be loaded"):
        assert P.load_programs("damaged", {"init": [], "run": []}) is None
    assert not stored[0].exists()


def test_the_store_evicts_its_least_recently_used_entries_beyond_its_size(tmp_path):
    for age, name in enumerate(["newest", "middle", "oldest"]):
        path = tmp_path / f"{name}.pickle"
        path.write_bytes(b"x" * 100)
        os.utime(path, (1e9 - age, 1e9 - age))
    (tmp_path / "other.tmp").write_bytes(b"x" * 1000)  # not an entry: left alone
    P.evict_programs(str(tmp_path), max_bytes=300)
    assert len(list(tmp_path.iterdir())) == 4
    P.evict_programs(str(tmp_path), max_bytes=250)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["middle.pickle", "newest.pickle",
                                                           "other.tmp"]
    P.evict_programs(str(tmp_path), max_bytes=0)
    assert [p.name for p in tmp_path.iterdir()] == ["other.tmp"]


def test_the_compilation_cache_is_bounded(tmp_path, monkeypatch):
    # What main() sets; JAX then evicts beyond it (it needs filelock). Set back afterwards,
    # so that the rest of the suite compiles without a cache, as before.
    import filelock  # noqa: F401  (in requirements.txt)
    import jax

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_compilation_cache_max_size")
    before = {name: getattr(jax.config, name) for name in names}
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    try:
        P.enable_compile_cache()
        assert jax.config.jax_compilation_cache_max_size == P.CACHE_MAX_BYTES > 0
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "ppo_jax")
    finally:
        for name, value in before.items():
            jax.config.update(name, value)


def test_the_store_key_is_what_makes_the_programs():
    config = tiny_config()
    key = P.programs_key(config)
    assert key == P.programs_key(dataclasses.replace(config, out="elsewhere"))
    assert key != P.programs_key(dataclasses.replace(config, seed=1))
    assert key != P.programs_key(dataclasses.replace(config, quiet=True))  # no host call then
    for uncovered in (dict(env="test_learning:AlwaysTruncated"), dict(save_every=2),
                      dict(resume="runs/x")):
        assert P.programs_key(dataclasses.replace(config, **uncovered)) is None, uncovered
