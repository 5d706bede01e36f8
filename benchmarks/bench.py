"""Speed, memory and learning benchmarks for ppo_jax. Timings are checked here, never in tests.

    python benchmarks/bench.py throughput  # steps/s through the Python API, beside reference_ppo.py
    python benchmarks/bench.py cold        # `python ppo_jax.py` cold and cached, beside the reference
    python benchmarks/bench.py chunks      # the command line's chunked loop against one whole jit
    python benchmarks/bench.py memory      # peak RSS of 1e6- and 2e7-step CartPole runs
    python benchmarks/bench.py checkpoints # training time with --save-every 5 against none
    python benchmarks/bench.py presets     # every classic-control preset on 4 seeds
    python benchmarks/bench.py presets-minatar  # the MinAtar presets (1e7 steps each)
    python benchmarks/bench.py diagnose    # when diagnose flags notebook 03's collapse
    python benchmarks/bench.py classic     # learning and steps/s beside a PureJaxRL-style loop

Each prints its numbers and the machine they came from. Run one benchmark at a time on an
otherwise idle machine: two at once share the cores and both numbers lie. Comparisons run
both sides turn about in the same invocation, because these machines drift from minute to
minute. reference_ppo.py is PPO written the common single-jit way (PureJaxRL's shape).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
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
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import jax

    device = jax.devices()[0].device_kind if jax.default_backend() != "cpu" else "CPU"
    return (f"{cpu}, {len(os.sched_getaffinity(0))} cores, {device}, jax {jax.__version__} "
            f"on {jax.default_backend()}")


def turn_about(programs: dict, rounds: int) -> dict:
    """Time each of {name: fn} once per round, in turn: {name: [seconds per round]}."""
    times = {name: [] for name in programs}
    for _ in range(rounds):
        for name, fn in programs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def throughput(rounds: int = 7) -> None:
    """PureJaxRL's CartPole settings (Config's defaults: 4 envs x 128 steps, 5e5 steps), each
    compiled once, then timed turn about: ppo_jax's make_train and reference_ppo.py's."""
    import jax

    import ppo_jax as P
    import reference_ppo as R

    config = P.Config()
    key = P.make_key(0)
    ours = jax.jit(P.make_train(config)).lower(key).compile()
    train, steps = R.make_train(R.CONFIG)
    ref_key = jax.random.key(0)
    theirs = jax.jit(train).lower(ref_key).compile()
    times = turn_about({"ppo_jax": lambda: jax.block_until_ready(ours(key)),
                        "reference": lambda: jax.block_until_ready(theirs(ref_key))}, rounds)
    ours_rate = config.num_updates * config.batch_size / statistics.median(times["ppo_jax"])
    theirs_rate = steps / statistics.median(times["reference"])
    print(f"{machine()}\nsteps/s at PureJaxRL's CartPole settings, median of {rounds}: "
          f"ppo_jax {ours_rate:,.0f}, reference {theirs_rate:,.0f}, "
          f"ratio {ours_rate / theirs_rate:.3f} (bar >= 1.0)")


def classic(seeds: int = 16) -> None:
    """Learning and speed side by side at PureJaxRL's CartPole settings (Config's defaults):
    ppo_jax's make_train and reference_ppo.py's loop, each vmapped over `seeds` seeds in one
    jit. A seed's score: its mean episode return over the last 5 % of updates."""
    import jax
    import numpy as np

    import ppo_jax as P
    import reference_ppo as R
    from ablation import bootstrap_ci, iqm

    unscaled = P.Config(num_seeds=seeds, normalize_reward=False)
    configs = {"ppo_jax": P.Config(num_seeds=seeds),
               "ppo_jax --no-normalize-reward": unscaled,
               "ppo_jax --no-normalize-reward --clip-value-loss": dataclasses.replace(
                   unscaled, clip_value_loss=True)}
    train, steps = R.make_train(R.CONFIG)
    tail = max(1, int(configs["ppo_jax"].num_updates * 0.05))
    print(f"{machine()}\n| loop | IQM | 95 % CI | mean | worst seed | seeds >= 475 | steps/s |\n"
          "|---|---:|---:|---:|---:|---:|---:|")
    for name in (*configs, "reference"):
        if name in configs:
            run = jax.jit(jax.vmap(P.make_train(configs[name])))
            keys = P.seed_keys(configs[name])
        else:
            run = jax.jit(jax.vmap(train))
            keys = jax.random.split(jax.random.key(0), seeds)
        compiled = run.lower(keys).compile()
        start = time.perf_counter()
        _, metrics = jax.block_until_ready(compiled(keys))
        rate = seeds * steps / (time.perf_counter() - start)
        if name in configs:
            scores = np.nanmean(np.asarray(metrics["episode_return"])[:, -tail:], axis=1)
        else:  # every step's (return of the episode that ended there, done): [S, U, T, N]
            returns, done = (np.asarray(m)[:, -tail:] for m in metrics)
            scores = returns.sum(axis=(1, 2, 3)) / np.maximum(done.sum(axis=(1, 2, 3)), 1)
        low, high = bootstrap_ci(scores)
        print(f"| {name} | {iqm(scores):.1f} | [{low:.1f}, {high:.1f}] | {scores.mean():.1f} | "
              f"{scores.min():.1f} | {(scores >= 475).sum()} / {seeds} | {rate:,.0f} |",
              flush=True)


def run_command(command: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    return elapsed, result.stdout


def cold(rounds: int = 3) -> None:
    """Whole processes, as a newcomer runs them: `python ppo_jax.py` with an empty cache,
    then again with the cache it filled; and reference_ppo.py's whole run."""
    ppo, ref, second = [], [], []
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as out:
            env = {**os.environ, "XDG_CACHE_HOME": cache}
            command = [sys.executable, os.path.join(ROOT, "ppo_jax.py"), "--quiet", "--out"]
            ppo.append(run_command(command + [os.path.join(out, "a")], env)[0])
            second.append(run_command(command + [os.path.join(out, "b")], env)[0])
        ref.append(run_command([sys.executable, os.path.join(ROOT, "benchmarks",
                                                             "reference_ppo.py")], os.environ)[0])
    cold_s, second_s, ref_s = (statistics.median(x) for x in (ppo, second, ref))
    print(f"{machine()}\nwhole process, median of {rounds}: python ppo_jax.py cold {cold_s:.1f} s, "
          f"second {second_s:.1f} s ({second_s / cold_s:.2f} of cold, bar <= 0.6); "
          f"reference_ppo.py {ref_s:.1f} s (cold / reference {cold_s / ref_s:.2f}, bar <= 0.8)")


def chunks(rounds: int = 7) -> None:
    """The standard config trained as the command line does, in chunks of K updates called
    from the host loop (metrics to NumPy after each), against the same runner built with one
    chunk that holds every update: what the calls and the host's work between them cost."""

    import ppo_jax as P

    config = P.Config()
    runners = {"chunks": P.make_runner(config)}
    P.CHUNK_STEPS = config.total_timesteps  # one chunk: every update in one call
    runners["one call"] = P.make_runner(config)
    start = runners["chunks"].init(P.seed_keys(config))
    compiled = {name: r.chunk.lower(start, 0).compile() for name, r in runners.items()}

    def train(chunk):
        state = start
        while P.updates_done(state) < config.num_updates:
            state, metrics, _ = P.run_chunk(chunk, state, config.num_updates)

    times = turn_about({name: functools.partial(train, c) for name, c in compiled.items()},
                       rounds)
    many, one = statistics.median(times["chunks"]), statistics.median(times["one call"])
    # A call that runs no update: the dispatch, the skipped steps and the host's work alone.
    empty = min(turn_about({"empty": lambda: P.run_chunk(compiled["chunks"], start, 0)},
                           50)["empty"])
    calls = -(-config.num_updates // runners["chunks"].chunk_updates)
    print(f"{machine()}\nstandard config, {config.num_updates} updates: chunks of "
          f"{runners['chunks'].chunk_updates} {many:.3f} s, one call {one:.3f} s "
          f"({100 * (many / one - 1):+.1f} %), median of {rounds}; an empty call "
          f"{1e3 * empty:.2f} ms, x {calls} calls = {100 * calls * empty / many:.2f} % of training")


PEAK_LAUNCHER = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def peak_rss_mb(args: list[str]) -> tuple[float, float]:
    """(wall s, peak RSS MB) of `python ppo_jax.py ARGS` run a second time, its programs
    loaded from the compilation cache that the first run filled: the peak is then training's,
    not the compiler's (which varies by tens of MB from run to run). Each run is started by a
    small launcher, since a child's ru_maxrss would count this process's memory at the fork."""
    with tempfile.TemporaryDirectory() as folder:
        peak = os.path.join(folder, "peak_kb")
        for attempt in ("first", "second"):
            elapsed, _ = run_command([sys.executable, "-c", PEAK_LAUNCHER, peak, sys.executable,
                                      os.path.join(ROOT, "ppo_jax.py"), *args, "--quiet",
                                      "--out", os.path.join(folder, attempt)],
                                     {**os.environ, "XDG_CACHE_HOME": folder})
        return elapsed, int(open(peak).read()) / 1024


def memory() -> None:
    short, long = (peak_rss_mb(["--total-timesteps", str(steps)])
                   for steps in (1_000_000, 20_000_000))
    print(f"{machine()}\nCartPole preset, peak RSS of a cached run: 1e6 steps {short[1]:.0f} MB "
          f"({short[0]:.0f} s), 2e7 steps {long[1]:.0f} MB ({long[0]:.0f} s): "
          f"{long[1] - short[1]:+.0f} MB (bar <= +60)")


def checkpoints(rounds: int = 3) -> None:
    """The CartPole preset for 1e6 steps, with a checkpoint every 5 updates and without,
    turn about: the training time each summary reports (compiling excluded)."""
    times = {"none": [], "--save-every 5": []}
    with tempfile.TemporaryDirectory() as folder:
        for attempt in range(rounds):
            for name in times:
                out = os.path.join(folder, f"{attempt}{len(name)}")
                _, stdout = run_command([sys.executable, os.path.join(ROOT, "ppo_jax.py"),
                                         "--total-timesteps", "1000000", "--quiet", "--out", out,
                                         *name.split()[:2 if name != "none" else 0]],
                                        {**os.environ, "XDG_CACHE_HOME": folder})
                times[name].append(float(re.search(r"train ([\d.]+) s", stdout).group(1)))
    plain, saving = (statistics.median(times[k]) for k in times)
    print(f"{machine()}\nCartPole preset, 1e6 steps, training time (median of {rounds}): "
          f"no checkpoints {plain:.2f} s, --save-every 5 {saving:.2f} s "
          f"({100 * (saving / plain - 1):+.1f} %, bar <= +10 %)")


def last_returns(out: str, fraction: float = 0.05):
    """Each run's mean episode return over the last `fraction` of its updates."""
    import numpy as np

    import ppo_jax as P

    config = P.read_config(out)
    metrics = P.read_metrics(config, os.path.join(out, "metrics.jsonl"), config.num_updates)
    tail = max(1, int(config.num_updates * fraction))
    return np.nanmean(metrics["episode_return"][:, -tail:], axis=1)


def presets(envs=None, seeds: int = 4) -> None:
    """Each preset trained by the command line on `seeds` seeds (one process, one jit):
    mean +- std and worst seed of the return over the last 5 % of updates, and wall time."""
    import ppo_jax as P

    envs = envs or [e for e in P.PRESETS if not e.endswith("-MinAtar")]
    print(f"{machine()}\n| env | seeds | steps | return (mean ± std) | worst seed | wall |\n"
          "|---|---:|---:|---:|---:|---:|")
    for env in envs:
        with tempfile.TemporaryDirectory() as folder:
            out = os.path.join(folder, "run")
            elapsed, _ = run_command([sys.executable, os.path.join(ROOT, "ppo_jax.py"), "--env",
                                      env, "--num-seeds", str(seeds), "--quiet", "--out", out],
                                     {**os.environ, "XDG_CACHE_HOME": folder})
            returns = last_returns(out)
            steps = P.read_config(out).num_updates * P.read_config(out).batch_size
        print(f"| {env} | {seeds} | {steps:,} | {returns.mean():.1f} ± {returns.std():.1f} | "
              f"{returns.min():.1f} | {elapsed:.0f} s |", flush=True)


def diagnose(seeds: int = 3) -> None:
    """Notebook 03's collapsing setting (masked maze, lr 5e-3, no entropy bonus), `seeds`
    seeds: the update where `diagnose` first flags each run against the update where its
    return (10-update trailing mean) peaks; and the CartPole preset on 4 seeds: no findings."""
    import jax
    import numpy as np

    import ppo_jax as P

    sys.path.insert(0, os.path.join(ROOT, "notebooks"))
    collapse = P.Config(env="masked_maze:MaskedMaze", num_seeds=seeds, num_envs=4,
                        num_steps=1024, num_minibatches=32, update_epochs=2,
                        learning_rate=5e-3, anneal_lr=False, gamma=0.975,
                        hidden_sizes=(352, 352), ent_coef=0.0, total_timesteps=100 * 4 * 1024)
    solved = P.preset_config("CartPole-v1", num_seeds=4)
    print(machine())
    for name, config in (("notebook 03's setting", collapse), ("CartPole preset", solved)):
        _, metrics = jax.jit(jax.vmap(P.make_train(config)))(P.seed_keys(config))
        metrics = {k: np.asarray(v) for k, v in metrics.items()}
        peaks = np.nanargmax(P.smoothed(metrics["episode_return"]), axis=1) + 1
        for run in range(config.num_runs):
            alone = {k: v[run:run + 1] for k, v in metrics.items()}
            found = P.diagnose_metrics(config, alone)
            first = ", ".join(f"{f.check} at update {f.update}" for f in found)
            print(f"{name}, seed {run}: return peaks at update {peaks[run]}; "
                  f"diagnose: {first or 'nothing'}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("benchmark", choices=["throughput", "cold", "chunks", "memory",
                                              "checkpoints", "presets", "presets-minatar",
                                              "diagnose", "classic"])
    parser.add_argument("--seeds", type=int, default=4, help="seeds per preset")
    args = parser.parse_args()
    if args.benchmark == "presets":
        presets(seeds=args.seeds)
    elif args.benchmark == "presets-minatar":
        import ppo_jax as P

        presets([e for e in P.PRESETS if e.endswith("-MinAtar")], seeds=args.seeds)
    else:
        globals()[args.benchmark]()


if __name__ == "__main__":
    main()
