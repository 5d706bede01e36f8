"""The command line: a tiny run end to end, and one clear line for every bad input."""

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import ppo_jax as P

ROOT = Path(__file__).parents[1]
TINY = ["--total-timesteps", "1024", "--num-envs", "4", "--num-steps", "32",
        "--hidden-sizes", "16", "16", "--no-compile-cache"]


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "ppo_jax.py"), *args], capture_output=True,
                          text=True, timeout=600, cwd=cwd)


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
    "nan learning rate": (["--learning-rate", "nan"], "learning_rate must be a positive"),
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


# Run main(), then count XLA's pool threads.
COUNT_POOL_THREADS = """
import os, sys
import ppo_jax as P
code = P.main(sys.argv[1:])
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print("exit", code, "pool threads", names.count("tf_XLAEigen"))
"""
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
SMALL = TINY  # 4 envs, minibatches of 32
LARGE = ["--total-timesteps", "1024", "--num-envs", "128", "--num-steps", "8"]


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or CORES < 2,
                    reason="needs 2+ usable cores (one thread is the default on one), on Linux")
@pytest.mark.parametrize("args, environ, threads", [
    (SMALL, {}, 1),  # --cpu-threads 0 (the default) on a small run: one thread
    (SMALL + ["--cpu-threads", "2"], {}, 2),  # the flag wins over the rule
    (SMALL, {"PJRT_NPROC": "2"}, 2),  # and so does PJRT_NPROC from the environment
    (LARGE, {}, CORES),  # 128 envs: JAX's default, one per core
    # Where a GPU plugin is installed, PJRT_NPROC is left alone: it would narrow XLA's GPU
    # compiler too. An empty jax_plugins folder looks installed, and JAX still runs on the CPU.
    (SMALL, {"PYTHONPATH": "{plugins}"}, CORES),
    (SMALL, {"PYTHONPATH": "{plugins}", "JAX_PLATFORMS": "cpu"}, 1),  # unless JAX is told CPU
], ids=["small-auto", "small-flag", "small-environment", "large-auto", "small-gpu-plugin",
        "small-gpu-plugin-cpu-asked"])
def test_cpu_threads_sizes_xla_thread_pool_before_jax_starts(args, environ, threads, tmp_path):
    """main() sets PJRT_NPROC before the first array, or JAX's CPU client would already
    have one pool thread per core. It stops at the unwritable --out, which it checks after
    building the env (JAX's first arrays), so nothing needs to train."""
    (tmp_path / "jax_plugins").mkdir()
    environ = {k: v.format(plugins=tmp_path) for k, v in environ.items()}
    env = {k: v for k, v in os.environ.items() if k not in ("PJRT_NPROC", "NPROC")}
    result = subprocess.run([sys.executable, "-c", COUNT_POOL_THREADS, "--quiet", "--out",
                             "/proc/ppo_jax_test", *args],
                            capture_output=True, text=True, timeout=600, cwd=ROOT,
                            env={**env, **environ})
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"exit 2 pool threads {threads}" in result.stdout, result.stdout
    assert "cannot write to --out" in result.stderr


def test_small_run_matches_the_measured_configs():
    """The rule behind --cpu-threads 0, on the configs whose speed with one thread and with
    two benchmarks/README.md reports (Threads): one thread where it trained faster (or as
    fast), JAX's default where two did."""
    one_thread = [P.Config(), P.preset_config("CartPole-v1"), P.preset_config("Acrobot-v1"),
                  P.Config(hidden_sizes=(256, 256)), P.Config(num_envs=64)]
    two_threads = [P.Config(num_seeds=8), P.Config(num_envs=256, num_steps=32),
                   P.preset_config("Breakout-MinAtar"), P.Config(num_envs=1024, num_steps=32),
                   P.Config(sweep=("learning_rate=1e-4,3e-4",))]
    assert all(P.small_run(c) for c in one_thread)
    assert not any(P.small_run(c) for c in two_threads)


def test_cpu_threads_refused_once_jax_has_started(tmp_path, capsys):
    """In a process that already used JAX (this one, a notebook) the flag could not take
    effect: one line says so, and names the environment variable instead."""
    P.make_key(0)  # JAX's CPU client is up
    code = P.main(["--quiet", "--out", str(tmp_path / "run"), "--cpu-threads", "1", *TINY])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "PJRT_NPROC=1" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("before, started, raised", [
    ("", False, True), ("--xla_cpu_enable_fast_math=false", False, True),
    ("--xla_backend_extra_options=xla_cpu_small_while_loop_byte_threshold=4096", False, False),
    ("", True, False)])
def test_xla_loop_threshold_is_raised_only_before_jax_starts_and_never_over_the_users(
        before, started, raised):
    """main() raises XLA's small-loop size through XLA_FLAGS, which XLA reads when JAX
    starts: a user's own xla_backend_extra_options are left alone, and so is a process
    where JAX has started (the flag could no longer take effect)."""
    script = textwrap.dedent(f"""
        import os, jax, ppo_jax as P
        if {started}:
            jax.devices()
        P.raise_xla_loop_threshold()
        print("XLA_FLAGS=" + os.environ.get("XLA_FLAGS", ""))
    """)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, cwd=ROOT, env={**env, "XLA_FLAGS": before})
    assert result.returncode == 0, result.stderr[-2000:]
    flags = result.stdout.strip().splitlines()[-1].removeprefix("XLA_FLAGS=")
    ours = ("--xla_backend_extra_options="
            f"xla_cpu_small_while_loop_byte_threshold={P.SMALL_LOOP_BYTES}")
    assert flags == (f"{before} {ours}".strip() if raised else before)
