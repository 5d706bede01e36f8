"""make_train and make_runner: determinism, seeds in a vmap, metrics, schedules."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ppo_jax as P
from helpers import build, compiled_as_users, jitted_train, jitted_vmapped_train, tiny_config

METRICS = ["episode_return", "episode_length", "episodes_finished", "policy_loss", "value_loss",
           "entropy", "approx_kl", "clip_fraction", "explained_variance", "grad_norm",
           "learning_rate", "ent_coef"]


def assert_same(a: dict, b: dict, **tolerance):
    for name in a:
        np.testing.assert_allclose(np.asarray(a[name]), np.asarray(b[name]), err_msg=name,
                                   **(tolerance or dict(rtol=0, atol=0)))


def test_metrics_have_one_value_per_update():
    config = tiny_config()
    _, metrics = jitted_train(config)(P.make_key(0))
    assert set(METRICS) <= set(metrics)
    for name, values in metrics.items():
        assert values.shape == (config.num_updates,), name


def test_same_seed_gives_identical_metrics():
    train = jitted_train(tiny_config())
    assert_same(train(P.make_key(7))[1], train(P.make_key(7))[1])
    assert not np.array_equal(train(P.make_key(7))[1]["value_loss"],
                              train(P.make_key(8))[1]["value_loss"])


def test_vmapped_seeds_equal_separate_runs():
    config = tiny_config()
    keys = P.seed_keys(tiny_config(num_seeds=2))  # the runner test below vmaps these too
    _, batched = jitted_vmapped_train(config)(keys)
    single = jitted_train(config)
    for i, key in enumerate(keys):
        _, alone = single(key)
        assert_same({k: v[i] for k, v in batched.items()}, alone, rtol=1e-4, atol=1e-5)


def test_runner_equals_vmapped_train_and_reports_progress():
    config = tiny_config(num_seeds=2)
    calls = []

    def on_report(update, returns):
        calls.append((int(update), np.asarray(returns).shape))
        return np.int32(int(update) + 1), np.bool_(False)

    runner = P.make_runner(config, on_report)
    loop = runner.run(runner.init(P.seed_keys(config)))
    _, from_vmap = jitted_vmapped_train(tiny_config())(P.seed_keys(config))
    assert_same(loop.metrics(), from_vmap, rtol=1e-5, atol=1e-6)
    assert [c[0] for c in calls] == list(range(1, config.num_updates + 1))
    assert all(shape == (2,) for _, shape in calls)


def test_episode_statistics_count_only_finished_episodes():
    """Compare with a host-side tracker fed the raw rewards and done flags, across two
    rollouts so that episodes span rollout boundaries."""
    config = tiny_config(num_steps=40)
    env, env_params, spec, agent, state = build(config)
    running = np.zeros(config.num_envs)
    for _ in range(2):
        state, traj, finished = P.collect_rollout(env, env_params, spec, agent,
                                                  config.num_steps, 0.99, state)
        done = np.asarray(traj.terminated | traj.truncated)
        ended = []
        for t in range(config.num_steps):
            running += np.asarray(traj.reward[t])
            for n in np.flatnonzero(done[t]):
                ended.append(running[n])
                running[n] = 0.0
        assert int(finished.count) == len(ended) > 0
        np.testing.assert_allclose(float(finished.return_sum), sum(ended), rtol=1e-6)


def test_update_without_finished_episodes_reports_nan_not_zero():
    config = tiny_config(env="MountainCar-v0", num_steps=16, total_timesteps=4 * 16 * 4)
    _, metrics = jax.jit(P.make_train(config))(P.make_key(0))  # episodes last 200 steps
    assert np.isnan(np.asarray(metrics["episode_return"])).all()
    assert (np.asarray(metrics["episodes_finished"]) == 0).all()


def test_schedules_match_a_naive_loop():
    config = tiny_config(learning_rate=3e-3, ent_coef=0.05, ent_coef_final=0.01)
    hp = config.hparams()
    U = config.num_updates
    for u in range(U):
        lr, ent = P.schedules(config, hp, jnp.int32(u))
        np.testing.assert_allclose(lr, 3e-3 * (1 - u / U), rtol=1e-6)
        np.testing.assert_allclose(ent, 0.05 + (0.01 - 0.05) * u / (U - 1), rtol=1e-5)
    constant = tiny_config(anneal_lr=False)
    np.testing.assert_allclose(P.schedules(constant, constant.hparams(), jnp.int32(U - 1))[0],
                               constant.learning_rate, rtol=1e-6)


def test_logged_schedules_are_the_applied_ones():
    config = tiny_config(learning_rate=1e-3, ent_coef=0.02, ent_coef_final=0.0)
    _, metrics = jax.jit(P.make_train(config))(P.make_key(0))
    U = config.num_updates
    np.testing.assert_allclose(metrics["learning_rate"], 1e-3 * (1 - np.arange(U) / U), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(metrics["ent_coef"])[[0, -1]], [0.02, 0.0], atol=1e-8)


@pytest.mark.parametrize("n", [1, 2, 7, 512, 1000, 65536, 65537])
def test_stable_argsort_is_numpys_stable_argsort(n):
    """Radix passes whose digits fill 32 - ceil(log2 n) bits: two passes up to n = 2^16,
    three above. Keys with many ties, and keys alike in their high bits."""
    rng = np.random.default_rng(n)
    for keys in (rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32),
                 rng.integers(0, 5, n).astype(np.uint32),
                 rng.integers(0, 2**16, n).astype(np.uint32) | np.uint32(0xFFFF0000)):
        got = jax.jit(P.stable_argsort)(jnp.asarray(keys))
        np.testing.assert_array_equal(got, np.argsort(keys, kind="stable"))


@pytest.mark.parametrize("n", [1, 512, 1625, 1626, 8192])  # jax sorts twice from 1626 on
def test_random_permutation_is_jax_random_permutation(n):
    for key in (P.make_key(3), jax.random.key(3)):  # Philox, and JAX's default threefry
        np.testing.assert_array_equal(jax.jit(P.random_permutation, static_argnums=1)(key, n),
                                      jax.random.permutation(key, n))


def test_target_kl_stops_the_remaining_epochs_under_jit_and_vmap():
    config = tiny_config(update_epochs=4, target_kl=1.0, learning_rate=1e-2)
    train = P.make_train(config)
    strict, loose = config.hparams()._replace(target_kl=1e-9), config.hparams()._replace(target_kl=1e9)
    both = jax.tree.map(lambda a, b: jnp.stack([a, b]), strict, loose)
    _, metrics = jax.jit(jax.vmap(train))(jax.random.split(P.make_key(0), 2), both)
    epochs = np.asarray(metrics["epochs_run"])
    assert (epochs[0] == 1).all()  # the first epoch always runs, then KL > 1e-9 stops it
    assert (epochs[1] == 4).all()
    assert not np.allclose(metrics["policy_loss"][0], metrics["policy_loss"][1])


@pytest.mark.parametrize("max_grad_norm", [1e-3, 1e3])  # clipping active, then not
def test_sgd_step_is_the_clipped_gradient_times_the_learning_rate(max_grad_norm):
    config = tiny_config(optimizer="sgd", max_grad_norm=max_grad_norm)
    env, env_params, spec, agent, state = build(config)

    @jax.jit  # one program, not hundreds of eager ones (13.8 s for this test)
    def step_and_gradient(state):
        state, traj, _ = P.collect_rollout(env, env_params, spec, agent, config.num_steps, 0.99,
                                           state)
        batch = P.rollout_to_batch(agent, state.params, traj, 0.99, 0.95, True)
        (params, _), _ = P.update_minibatch(agent, config.hparams(), config, 0.01, 0.1,
                                            (state.params, state.opt_state), batch)
        grads = jax.grad(lambda p: P.ppo_loss(p, agent, batch, 0.2, 0.5, 0.01)[0])(state.params)
        return state, params, grads

    state, params, grads = step_and_gradient(state)
    flat = [np.asarray(g, np.float64) for g in jax.tree.leaves(grads)]
    norm = np.sqrt(sum(np.sum(g**2) for g in flat))
    scale = min(1.0, max_grad_norm / norm)
    for before, after, g in zip(jax.tree.leaves(state.params), jax.tree.leaves(params), flat):
        np.testing.assert_allclose(np.asarray(after), np.asarray(before) - 0.1 * scale * g,
                                   rtol=1e-5, atol=1e-7)


def test_init_compiled_without_fusion_emitters_gives_the_same_state_bitwise():
    """make_runner compiles init with XLA:CPU's fusion emitters off (it runs once, and
    compiles faster so); the state must be the one the emitters' program makes."""
    config = tiny_config(num_seeds=2, hidden_sizes=(64, 64))
    env, env_params, spec, agent = P.make_setup(config)
    keys = P.seed_keys(config)
    init_one = lambda key: P.init_runner_state(config, env, env_params, spec, agent,
                                               config.hparams(), key)
    options = {"xla_cpu_use_fusion_emitters": True} if jax.default_backend() == "cpu" else None
    reference = jax.jit(jax.vmap(init_one)).lower(keys).compile(options)(keys)
    state = P.make_runner(config).init(keys).runner
    # runner.init also makes every dtype strong: compare the values, leaf by leaf
    for want, got in zip(jax.tree.leaves(P.keys_to_data(reference)),
                         jax.tree.leaves(P.keys_to_data(state)), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU option")
def test_run_compiled_for_one_thread_gives_the_same_loop_bitwise(monkeypatch):
    """On one XLA thread, run is compiled with copy insertion's region analysis (fewer
    copies of the loop state, so faster); it must train exactly as XLA's default does."""
    monkeypatch.setenv("PJRT_NPROC", "1")
    assert P.cpu_compile_options()["xla_cpu_copy_insertion_use_region_analysis"]
    monkeypatch.setenv("PJRT_NPROC", "2")
    assert "xla_cpu_copy_insertion_use_region_analysis" not in P.cpu_compile_options()
    assert "xla_cpu_copy_insertion_use_region_analysis" not in P.cpu_compile_options(True)

    config = tiny_config()
    runner = P.make_runner(config)  # built for two threads: XLA's default copy insertion
    loop = runner.init(P.seed_keys(config))
    default, one_thread = (compiled_as_users(runner.run, loop), compiled_as_users(
        runner.run, loop, xla_cpu_copy_insertion_use_region_analysis=True))
    assert default.as_text().count(" copy(") > one_thread.as_text().count(" copy(")
    default, one_thread = default(loop), one_thread(loop)
    assert int(default.updates_done) == config.num_updates
    for want, got in zip(jax.tree.leaves(P.keys_to_data(default)),
                         jax.tree.leaves(P.keys_to_data(one_thread)), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))



@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU option")
def test_run_is_vectorized_512_bits_wide_only_where_the_cpu_has_avx512(monkeypatch):
    monkeypatch.setattr(P, "cpu_has_avx512", lambda: True)
    assert P.cpu_compile_options()["xla_cpu_prefer_vector_width"] == 512
    assert "xla_cpu_prefer_vector_width" not in P.cpu_compile_options(runs_once=True)
    monkeypatch.setattr(P, "cpu_has_avx512", lambda: False)
    assert "xla_cpu_prefer_vector_width" not in P.cpu_compile_options()
    monkeypatch.undo()
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    assert P.cpu_has_avx512() == bool(re.search(r"^flags\s*:.*\bavx512f\b", flags, re.M))


def hlo_computations(hlo_text: str) -> dict:
    """{name: its instructions' lines} of a compiled module's text."""
    bodies, name = {}, None
    for line in hlo_text.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            name = (line.split()[1] if line.startswith("ENTRY") else line.split()[0]).lstrip("%")
            bodies[name] = []
        elif name and line.startswith(" "):
            bodies[name].append(line)
    return bodies


def in_one_kernel(bodies: dict) -> set:
    """The computations that run inside a call XLA:CPU compiled into one kernel
    (xla_cpu_small_call), and every computation those call in turn."""
    called = lambda lines: {c.lstrip("%") for line in lines for c in re.findall(
        r"(?:to_apply|body|condition|calls)=(%?[\w.\-]+)", line)}
    inside = called([line for lines in bodies.values() for line in lines
                     if "xla_cpu_small_call" in line])
    frontier = inside
    while frontier:
        frontier = called([line for name in frontier for line in bodies.get(name, [])]) - inside
        inside = inside | frontier
    return inside


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's small-loop pass")
@pytest.mark.parametrize("num_envs, one_kernel", [(4, True), (16, False)])
def test_a_rollout_of_a_few_envs_compiles_to_one_kernel(num_envs, one_kernel):
    """With its actor as matrix-vector products (matvec_rows) and XLA's small-loop size
    raised (raise_xla_loop_threshold; conftest.py does it for the suite), the rollout's
    loop, env step included, runs as one kernel. How much faster that is, is benchmarked
    (benchmarks/README.md, Throughput); here, that it happens, and only where chosen."""
    assert f"small_while_loop_byte_threshold={P.SMALL_LOOP_BYTES}" in os.environ["XLA_FLAGS"]
    config = tiny_config(num_envs=num_envs)
    runner = P.make_runner(config)
    bodies = hlo_computations(runner.run.lower(runner.init(P.seed_keys(config))).compile()
                              .as_text())
    env_step = {name for name, lines in bodies.items()
                if any("vmap(jit(step))" in line for line in lines)}
    assert env_step  # the env's step ops are there, found by their metadata
    assert bool(env_step & in_one_kernel(bodies)) == one_kernel


# Seeds spread over several devices with jax.shard_map (the README's recipe), on four host
# devices that XLA:CPU makes when asked.
SHARD_SEEDS = """
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec
import ppo_jax as P
from helpers import tiny_config
train = jax.vmap(P.make_train(tiny_config()))
keys = jax.random.split(jax.random.key(0, impl="threefry2x32"), 8)
mesh = jax.make_mesh((4,), ("seeds",))
sharded = jax.jit(jax.shard_map(train, mesh=mesh, in_specs=PartitionSpec("seeds"),
                                out_specs=PartitionSpec("seeds"), check_vma=False))
state, metrics = sharded(jax.device_put(keys, NamedSharding(mesh, PartitionSpec("seeds"))))
one_state, one_metrics = jax.jit(train)(keys)
assert len(jax.devices()) == 4 and len(metrics["episode_return"].sharding.device_set) == 4
for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(one_state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
for name in one_metrics:
    np.testing.assert_allclose(metrics[name], one_metrics[name], rtol=1e-4, atol=1e-5,
                               err_msg=name)
print("same")
"""


def test_seeds_sharded_over_devices_train_as_on_one():
    """8 seeds over 4 devices, 2 on each, train as the 8 do on one device, to rounding (as
    seeds alone and vmapped do: each device runs a program for 2 seeds, with other kernels).
    Threefry keys: under jax 0.10.2, Philox's keys failed to compile sharded."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"
    tests = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run([sys.executable, "-c", SHARD_SEEDS], capture_output=True, text=True,
                            timeout=600, cwd=os.path.dirname(tests),
                            env={**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu",
                                 "PYTHONPATH": os.pathsep.join([tests, os.path.dirname(tests)])})
    assert result.returncode == 0 and "same" in result.stdout, result.stderr[-3000:]
