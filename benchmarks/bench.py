"""Speed, memory and preset benchmarks for ppo_jax. Timings are checked here, never in tests.

    python benchmarks/bench.py cold         # `python ppo_jax.py` twice: cold, then cached
    python benchmarks/bench.py throughput   # the standard config: compile time and steps/s
    python benchmarks/bench.py presets      # the classic-control presets: final return, steps,
                                            # wall time
    python benchmarks/bench.py presets-minatar  # the MinAtar presets, one seed each (1e7 steps)
    python benchmarks/bench.py seeds8       # 8 vmapped CartPole seeds, each must reach 475
    python benchmarks/bench.py memory       # peak RSS of a 2e7-step CartPole run
    python benchmarks/bench.py gymnasium    # trained policies scored in Gymnasium's own envs
    python benchmarks/bench.py diagnostics  # the cost of --diagnostics at the standard config
    python benchmarks/bench.py reference    # ppo_jax against reference_ppo.py, interleaved
    python benchmarks/bench.py scale        # many envs and seeds in one jit (sized for a GPU
                                            # where JAX has one): steps/s, and how many of
                                            # 1024 CartPole seeds solve it
    python benchmarks/bench.py scale-minatar  # the same steps/s for Breakout-MinAtar's preset
    python benchmarks/bench.py all          # each of the above but the two -minatar ones
    python benchmarks/bench.py compare REV  # this tree against git revision REV (default
                                            # HEAD), interleaved in one process

Each prints its numbers and the machine they came from. Run one benchmark at a time on an
otherwise idle machine: two at once share the cores and both numbers lie. These machines'
speed can also drift by 10-40 % from one minute to the next, so judge a change with `compare`,
which times both versions turn about in one process, not with two separate runs.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import jax

    return f"{cpu}, {os.cpu_count()} cores, jax {jax.__version__} on {jax.default_backend()}"


# XLA_FLAGS as this process was started with, before main raises XLA's small-loop size.
USERS_XLA_FLAGS = os.environ.get("XLA_FLAGS")


def reference_env() -> dict:
    """The environment for benchmarks/reference_ppo.py: this one, with the XLA_FLAGS it was
    started with, so that the reference runs as it would on its own."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return env if USERS_XLA_FLAGS is None else {**env, "XLA_FLAGS": USERS_XLA_FLAGS}


def run_cli(args: list[str], cache_home: str, script: str = "ppo_jax.py") -> tuple[float, str]:
    """Run a script of this repository in a fresh process: (wall seconds, its stdout)."""
    return run_command([sys.executable, os.path.join(ROOT, script), *args],
                       cli_env(script, cache_home))


def cli_env(script: str, cache_home: str) -> dict:
    return {**(reference_env() if "reference" in script else os.environ),
            "XDG_CACHE_HOME": cache_home}


def run_command(command: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    return elapsed, result.stdout


# Starts the command after the file name, waits for it and writes its peak RSS (kB) there.
PEAK_LAUNCHER = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_cli_peak(args: list[str], cache_home: str,
                 script: str = "ppo_jax.py") -> tuple[float, str, float]:
    """run_cli, plus the process's peak RSS in MB. A process's ru_maxrss also counts the
    memory of the process that started it, as it was then: this one's, large once it has
    compiled anything (and RUSAGE_CHILDREN is the largest over every child so far). So a
    small launcher starts it and reads its peak."""
    with tempfile.TemporaryDirectory() as folder:
        peak_file = os.path.join(folder, "peak_kb")
        elapsed, stdout = run_command(
            [sys.executable, "-c", PEAK_LAUNCHER, peak_file, sys.executable,
             os.path.join(ROOT, script), *args], cli_env(script, cache_home))
        with open(peak_file) as f:
            return elapsed, stdout, int(f.read()) / 1024


def cold() -> None:
    """The default run, as a newcomer types it: first with an empty compilation cache, then
    again. Also with --quiet, whose program has no host callback."""
    for extra in ([], ["--quiet"]):
        with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as out:
            for attempt in ("cold", "second"):
                elapsed, stdout = run_cli(["--out", os.path.join(out, attempt), *extra], cache)
                returns = re.search(r"final return per seed: ([\d. -]+)", stdout).group(1).strip()
                inner = re.search(r"compile ([\d.]+) s \| train ([\d.]+) s", stdout)
                print(f"python ppo_jax.py {' '.join(extra):8s} {attempt:6s}: {elapsed:5.1f} s wall "
                      f"(compile {inner.group(1)} s, train {inner.group(2)} s), final return {returns}")


def throughput(rounds: int = 2) -> None:
    """The standard config (Config's defaults): CartPole, 4 envs x 128 steps, 5e5 steps,
    4 epochs x 4 minibatches, 64x64 tanh, lr 2.5e-4. Once on one XLA:CPU thread, what the
    command line picks for it (ppo_jax.small_run), once on JAX's default of one per core, in
    fresh processes turn about: the pool is sized when JAX starts."""
    import ppo_jax as P

    chosen = " (the command line's choice)" if P.small_run(P.Config()) else ""
    threads = {f"1 thread{chosen}": "1", "JAX's default threads": None}
    results = {name: [] for name in threads}
    for _ in range(rounds):
        for name, count in threads.items():
            env = {k: v for k, v in os.environ.items() if k != "PJRT_NPROC"}
            env.update({"PJRT_NPROC": count} if count else {})
            result = subprocess.run([sys.executable, os.path.abspath(__file__), "throughput-once"],
                                    capture_output=True, text=True, env=env, cwd=ROOT)
            if result.returncode != 0:
                raise RuntimeError(result.stderr[-2000:])
            results[name].append(result.stdout.strip().splitlines()[-1])
    for name, lines in results.items():
        for line in lines:
            print(f"{name}: {line}")


def throughput_once(repeats: int = 5) -> None:
    """throughput's measurement, in this process and on its thread pool."""
    import jax

    import ppo_jax as P

    config = P.Config()
    runner = P.make_runner(config)
    loop = runner.init(P.seed_keys(config))
    start = time.perf_counter()
    compiled = runner.run.lower(loop).compile()
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(loop))
        times.append(time.perf_counter() - start)
    steps = config.num_updates * config.batch_size
    print(f"standard config: compile {compile_s:.1f} s; {steps / statistics.median(times):,.0f} "
          f"steps/s median, {steps / min(times):,.0f} best of {repeats}")


def turn_about(programs: dict, rounds: int) -> dict:
    """Time each of {name: fn} once per round, in turn, so the machine's drift hits all of
    them alike. Returns {name: [seconds per round]}."""
    import jax

    times = {name: [] for name in programs}
    for _ in range(rounds):
        for name, fn in programs.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return times


def diagnostics_cost(repeats: int = 5) -> None:
    """The standard config with --diagnostics on and off, timed alternately in one process
    (this machine's speed drifts), compile excluded."""
    import functools

    import ppo_jax as P

    programs = {}
    for on in (True, False):
        runner = P.make_runner(P.Config(diagnostics=on))
        loop = runner.init(P.seed_keys(P.Config()))
        programs[on] = functools.partial(runner.run.lower(loop).compile(), loop)
    times = turn_about(programs, repeats)
    steps = P.Config().num_updates * P.Config().batch_size
    on, off = (statistics.median(times[k]) for k in (True, False))
    print(f"standard config: diagnostics on {steps / on:,.0f} steps/s, off {steps / off:,.0f} "
          f"steps/s (medians of {repeats}): the diagnostics cost {100 * (on / off - 1):.1f} %")


def timed_run(config) -> tuple[float, dict]:
    """Compile the command line's training program for `config`, then time one run of it
    (compilation excluded). Returns (seconds, metrics {name: [S, U]})."""
    import jax

    import ppo_jax as P

    runner = P.make_runner(config)
    loop = runner.init(P.seed_keys(config))
    compiled = runner.run.lower(loop).compile()
    start = time.perf_counter()
    loop = jax.block_until_ready(compiled(loop))
    return time.perf_counter() - start, loop.metrics()


SCALE_HEADER = (f"{'seeds':>6s} {'envs/seed':>9s} {'steps/update':>12s} {'compile':>8s} "
                f"{'env steps/s':>14s}")


def scale_row(config, updates: int, repeats: int) -> None:
    """One row of scale's tables: compile `config`'s training program, then time it."""
    import ppo_jax as P

    runner = P.make_runner(config)
    loop = runner.init(P.seed_keys(config))
    start = time.perf_counter()
    compiled = runner.run.lower(loop).compile()
    compile_s = time.perf_counter() - start
    times = turn_about({"run": lambda: compiled(loop)}, repeats)["run"]
    steps = config.num_runs * config.num_updates * config.batch_size
    print(f"{config.num_runs:>6,d} {config.num_envs:>9,d} {steps // updates:>12,d} "
          f"{compile_s:>7.1f}s {steps / min(times):>14,.0f}", flush=True)


# (num_seeds, num_envs per seed) that scale times: a GPU takes thousands of envs, a 2-core
# CPU is full at a few hundred.
SCALE_GRID = {"gpu": [(1, 256), (1, 1024), (1, 4096), (1, 16384), (1, 65536),
                      (16, 1024), (64, 1024), (256, 1024), (1024, 256)],
              "cpu": [(1, 16), (1, 64), (1, 256), (1, 1024), (8, 64), (32, 64)]}
SCALE_SOLVE_SEEDS = {"gpu": 1024, "cpu": 8}


def scale(updates: int = 10, repeats: int = 2) -> None:
    """Many envs and many seeds in one jit, on whatever JAX runs on (SCALE_GRID): env steps
    per second of CartPole with the standard config's network and learning phase (128 steps
    per env, 4 epochs x 4 minibatches, 64x64 tanh), `updates` updates, compile excluded,
    the best of `repeats` runs. Then the CartPole preset trained on SCALE_SOLVE_SEEDS seeds
    at once: how many solve it (final return >= 475) and how long that takes."""
    import jax
    import numpy as np

    import ppo_jax as P

    backend = "gpu" if jax.default_backend() == "gpu" else "cpu"
    print(SCALE_HEADER)
    for seeds, envs in SCALE_GRID[backend]:
        scale_row(P.Config(num_seeds=seeds, num_envs=envs, total_timesteps=envs * 128 * updates),
                  updates, repeats)
    seeds = SCALE_SOLVE_SEEDS[backend]
    elapsed, metrics = timed_run(P.preset_config("CartPole-v1", num_seeds=seeds))
    returns = P.final_returns(metrics)
    print(f"CartPole preset, {seeds} seeds in one jit: {int((returns >= 475).sum())} of them "
          f"reach 475 (final return min {returns.min():.1f}, median {np.median(returns):.1f}), "
          f"{elapsed:.1f} s of training")


# The same for Breakout-MinAtar's preset (10x10x4 images, a 256 x 256 ReLU MLP).
SCALE_MINATAR_GRID = {"gpu": [(1, 1024), (1, 4096), (1, 16384), (16, 1024)], "cpu": [(1, 64)]}


def scale_minatar(updates: int = 10, repeats: int = 2) -> None:
    """scale's steps/s for the Breakout-MinAtar preset (128 steps per env, 4 epochs x 8
    minibatches), over SCALE_MINATAR_GRID."""
    import jax

    import ppo_jax as P

    backend = "gpu" if jax.default_backend() == "gpu" else "cpu"
    print(f"Breakout-MinAtar preset\n{SCALE_HEADER}")
    for seeds, envs in SCALE_MINATAR_GRID[backend]:
        config = P.preset_config("Breakout-MinAtar", num_seeds=seeds, num_envs=envs,
                                 total_timesteps=envs * 128 * updates)
        scale_row(config, updates, repeats)


def presets(seeds: int = 4) -> None:
    """The classic-control presets: 4 seeds in one jit, then one seed alone for its wall
    time. The MinAtar presets (1e7 steps each) are presets-minatar."""
    import numpy as np

    import ppo_jax as P

    print(f"{'env':26s} {'steps':>10s} {'final return (mean, min over seeds)':>36s} "
          f"{'wall per seed alone':>20s}")
    for env in (e for e in P.PRESETS if not e.endswith("-MinAtar")):
        config = P.preset_config(env, num_seeds=seeds)
        elapsed, metrics = timed_run(config)
        returns = P.final_returns(metrics)
        alone, _ = timed_run(P.preset_config(env, num_seeds=1))
        steps = config.num_updates * config.batch_size
        print(f"{env:26s} {steps:>10,d} {np.mean(returns):>22.1f}, {np.min(returns):>8.1f} "
              f"{alone:>17.1f} s   ({seeds} seeds together: {elapsed:.1f} s)", flush=True)


def presets_minatar() -> None:
    """The MinAtar presets, one seed each (1e7 steps: 6.7 to 9.2 minutes each, 32 in all,
    on a 2-core Xeon): the final return and the mean over the last 50 updates."""
    import numpy as np

    import ppo_jax as P

    for env in (e for e in P.PRESETS if e.endswith("-MinAtar")):
        config = P.preset_config(env)
        elapsed, metrics = timed_run(config)
        steps = config.num_updates * config.batch_size
        last = np.nanmean(metrics["episode_return"][0, -50:])
        print(f"{env:24s} {steps:>11,d} steps: final return {P.final_returns(metrics)[0]:.1f}, "
              f"mean of the last 50 updates {last:.1f}, {elapsed / 60:.1f} min "
              f"({steps / elapsed:,.0f} steps/s)", flush=True)


def seeds8() -> None:
    import numpy as np

    import ppo_jax as P

    elapsed, metrics = timed_run(P.preset_config("CartPole-v1", num_seeds=8))
    returns = P.final_returns(metrics)
    verdict = "all >= 475" if (returns >= 475).all() else "NOT all >= 475"
    print(f"8 vmapped CartPole seeds in {elapsed:.1f} s: "
          f"{np.round(returns, 1).tolist()} ({verdict})")


def memory(steps: int = 20_000_000) -> None:
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as out:
        elapsed, stdout, peak_mb = run_cli_peak(["--total-timesteps", str(steps), "--quiet",
                                                 "--out", os.path.join(out, "run")], cache)
    print(f"CartPole preset, {steps:,} steps: peak RSS {peak_mb:.0f} MB, {elapsed:.0f} s wall; "
          + stdout.strip().splitlines()[-1])


def gymnasium_scores(episodes: int = 20) -> None:
    """Train the CartPole-v1 and Acrobot-v1 presets, then score each policy with
    load_policy in Gymnasium's own environments (not gymnax's)."""
    import gymnasium
    import numpy as np

    import ppo_jax as P

    for env_id in ("CartPole-v1", "Acrobot-v1"):
        with tempfile.TemporaryDirectory() as out:
            run_dir = os.path.join(out, "run")
            P.main(["--env", env_id, "--out", run_dir, "--quiet"])
            for deterministic in (True, False):
                act = P.load_policy(run_dir, deterministic=deterministic)
                env = gymnasium.make(env_id)
                returns = []
                for episode in range(episodes):
                    obs, _ = env.reset(seed=episode)
                    total, done = 0.0, False
                    while not done:
                        obs, reward, terminated, truncated, _ = env.step(act(obs))
                        total, done = total + reward, terminated or truncated
                    returns.append(total)
                kind = "deterministic" if deterministic else "stochastic"
                print(f"gymnasium {env_id} ({kind}): {np.mean(returns):.1f} +- "
                      f"{np.std(returns):.1f} over {episodes} episodes")


# #2's bars as ratios to the reference loop: cold wall time 8 s against its 10 s, throughput
# 200k against its 150k steps/s.
COLD_BAR, SPEED_BAR = 8 / 10, 200_000 / 150_000


def against_bar(ratio: float, bar: float, what: str, at_most: bool = False) -> str:
    """'ratio 1.326, bar 1.333 (200k / 150k): not met': three decimals, so that a ratio
    just short of its bar does not print as equal to it."""
    met = ratio <= bar if at_most else ratio >= bar
    return f"ratio {ratio:.3f}, bar {bar:.3f} ({what}): {'met' if met else 'not met'}"


def reference(rounds: int = 4) -> None:
    """ppo_jax against benchmarks/reference_ppo.py (PPO written the common single-function
    way) on this machine, interleaved, so the bars can be checked on any machine as ratios:
    they are 8 s cold against that loop's ~10 s (0.8x) and 200k steps/s against its ~150k
    (1.33x), both on the 2-core CPU machine they were set on.

    Cold, each runs its own default, as the bar compares them: ppo_jax its CartPole preset
    (150k steps, 16 envs x 32), the reference the standard config (500k steps, 4 x 128)."""
    import jax

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import ppo_jax as P
    import reference_ppo as R

    def cold_run(name: str) -> tuple[float, float]:
        """(wall seconds, final return) of one fresh process with an empty compile cache."""
        with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as out:
            if name == "reference_ppo.py":
                elapsed, stdout = run_cli([], cache, os.path.join("benchmarks", name))
                found = re.search(r"final return ([\d.-]+)", stdout)
            else:
                elapsed, stdout = run_cli(["--out", os.path.join(out, "run")], cache)
                found = re.search(r"final return per seed: ([\d.-]+)", stdout)
        return elapsed, float(found.group(1))

    walls = {"reference_ppo.py": [], "ppo_jax.py": []}
    returns = {name: [] for name in walls}
    for _ in range(rounds):
        for name in walls:
            elapsed, final_return = cold_run(name)
            walls[name].append(elapsed)
            returns[name].append(final_return)
    ref, ours = (statistics.median(walls[k]) for k in walls)
    print(f"cold, whole process (median of {rounds}, interleaved): reference_ppo.py {ref:.1f} s "
          f"(final return {min(returns['reference_ppo.py']):.1f} or more), python ppo_jax.py "
          f"{ours:.1f} s (final return {min(returns['ppo_jax.py']):.1f} or more): "
          + against_bar(ours / ref, COLD_BAR, "8 s / 10 s", at_most=True))

    train, ref_steps = R.make_train(R.CONFIG)
    ref_program = jax.jit(train).lower(jax.random.key(0)).compile()
    config = P.Config()
    runner = P.make_runner(config)
    loop = runner.init(P.seed_keys(config))
    ours_program = runner.run.lower(loop).compile()
    times = turn_about({"reference": lambda: ref_program(jax.random.key(0)),
                        "ppo_jax": lambda: ours_program(loop)}, rounds)
    ref = ref_steps / statistics.median(times["reference"])
    ours = config.num_updates * config.batch_size / statistics.median(times["ppo_jax"])
    print(f"standard config, training only, both on JAX's default threads, in this process "
          f"(median of {rounds}, interleaved): reference {ref:,.0f} steps/s, ppo_jax "
          f"{ours:,.0f} steps/s: " + against_bar(ours / ref, SPEED_BAR, "200k / 150k"))

    # Each as it runs by default: the reference on JAX's threads, ppo_jax on the thread
    # count its command line picks for this config (one: small_run), in fresh processes.
    ours_env = {k: v for k, v in os.environ.items() if k != "PJRT_NPROC"}
    ours_env.update({"PJRT_NPROC": "1"} if P.small_run(config) else {})
    speeds = {"reference": [], "ppo_jax": []}
    for _ in range(rounds):
        for name in speeds:
            script, env = (
                (os.path.join(ROOT, "benchmarks", "reference_ppo.py"), reference_env())
                if name == "reference" else (os.path.abspath(__file__), ours_env))
            result = subprocess.run(
                [sys.executable, script, *([] if name == "reference" else ["throughput-once"])],
                capture_output=True, text=True, env=env, cwd=ROOT)
            if result.returncode != 0:
                raise RuntimeError(result.stderr[-2000:])
            speed = re.search(r"([\d,]+) steps/s", result.stdout).group(1)
            speeds[name].append(float(speed.replace(",", "")))
    ref, ours = (statistics.median(speeds[k]) for k in speeds)
    print(f"standard config, training only, each as it runs by default (ppo_jax on "
          f"{'one thread' if P.small_run(config) else 'JAX threads'}; fresh processes, median of "
          f"{rounds}, interleaved): reference {ref:,.0f} steps/s, ppo_jax {ours:,.0f} steps/s: "
          + against_bar(ours / ref, SPEED_BAR, "200k / 150k"))


def compare(revision: str = "HEAD", rounds: int = 8) -> None:
    """This working tree's ppo_jax.py against the one at a git revision, in one process and
    interleaved, so that the machine's drift hits both alike: the standard config's `run`
    program, compiled afresh each round (wall and CPU seconds), then trained once."""
    import importlib.util

    import jax

    source = subprocess.run(["git", "show", f"{revision}:ppo_jax.py"], cwd=ROOT,
                            capture_output=True, text=True)
    if source.returncode != 0:
        sys.exit(f"error: cannot read ppo_jax.py at {revision!r} ({source.stderr.strip()}); "
                 "give a commit, tag or branch of this repository")
    def load(module_name: str, path: str):
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = sys.modules[module_name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    with tempfile.TemporaryDirectory() as folder:
        then = os.path.join(folder, "ppo_jax_then.py")
        with open(then, "w") as f:
            f.write(source.stdout)
        modules = {revision: load("ppo_jax_then", then),
                   "working tree": load("ppo_jax_now", os.path.join(ROOT, "ppo_jax.py"))}
    programs = {}
    for name, P in modules.items():
        config = P.Config()
        runner = P.make_runner(config, on_report=P.Progress(config, show=False))
        steps = config.num_updates * config.batch_size
        programs[name] = (runner, runner.init(P.seed_keys(config)), steps)
    results = {name: {"compile wall": [], "compile CPU": [], "steps/s": []} for name in modules}
    for _ in range(rounds):
        for name, (runner, loop, steps) in programs.items():
            jax.clear_caches()  # compile afresh, not from the in-memory cache
            lowered = runner.run.lower(loop)
            wall, cpu = time.perf_counter(), time.process_time()
            compiled = lowered.compile()
            results[name]["compile wall"].append(time.perf_counter() - wall)
            results[name]["compile CPU"].append(time.process_time() - cpu)
            start = time.perf_counter()
            jax.block_until_ready(compiled(loop))
            results[name]["steps/s"].append(steps / (time.perf_counter() - start))
    for name, measured in results.items():
        print(f"{name:>14s}: " + " | ".join(
            f"{what} median {statistics.median(v):,.{0 if what == 'steps/s' else 2}f} "
            f"(best {(max if what == 'steps/s' else min)(v):,.{0 if what == 'steps/s' else 2}f})"
            for what, v in measured.items()) + f"  [{rounds} rounds, standard config]")


BENCHMARKS = {"cold": cold, "throughput": throughput, "presets": presets,
              "presets-minatar": presets_minatar, "seeds8": seeds8,
              "memory": memory, "gymnasium": gymnasium_scores, "diagnostics": diagnostics_cost,
              "reference": reference, "scale": scale, "scale-minatar": scale_minatar}

if __name__ == "__main__":
    # Compile as the command line does: XLA's small-loop size raised before JAX starts. The
    # subprocesses inherit it, but for the reference loop's (reference_env).
    import ppo_jax

    ppo_jax.raise_xla_loop_threshold()
    names = sys.argv[1:] or ["all"]
    if names == ["throughput-once"]:  # run by throughput, in a process of its own
        throughput_once()
        sys.exit(0)
    if names[0] == "compare":
        if len(names) > 2:
            sys.exit("error: compare takes one git revision: bench.py compare [REV]")
        print(machine())
        compare(*names[1:])
        sys.exit(0)
    if names == ["all"]:
        names = [name for name in BENCHMARKS if not name.endswith("minatar")]
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        sys.exit(f"error: unknown benchmark {', '.join(sorted(unknown))}; "
                 f"choose from {', '.join(BENCHMARKS)} or all")
    print(machine())
    for name in names:
        BENCHMARKS[name]()
