"""make_train and make_runner: determinism, seeds in a vmap, metrics, schedules."""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ppo_jax as P
from helpers import build, jitted_train, jitted_vmapped_train, tiny_config

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


def test_runner_in_chunks_equals_vmapped_train():
    config = tiny_config(num_seeds=2)
    runner = P.make_runner(config)
    state = runner.init(P.seed_keys(config))
    sizes = []
    while P.updates_done(state) < config.num_updates:  # chunks of 3 updates, then the rest
        stop_at = min(P.updates_done(state) + 3, config.num_updates)
        state, metrics, bad = P.run_chunk(runner.chunk, state, stop_at)
        sizes.append(metrics["episode_return"].shape)
        assert bad == -1
    assert sizes == [(2, 3)] * (config.num_updates // 3) + [(2, config.num_updates % 3)]
    _, from_vmap = jitted_vmapped_train(tiny_config())(P.seed_keys(config))
    _, chunked, _ = P.train_runs(config, runner, runner.init(P.seed_keys(config)))
    assert_same(chunked, from_vmap, rtol=1e-5, atol=1e-6)


def test_a_chunk_runs_at_most_chunk_updates_and_stops_before_stop_at():
    config = tiny_config(total_timesteps=128 * 40)
    runner = P.make_runner(config)
    assert 1 <= runner.chunk_updates <= config.num_updates
    state = runner.init(P.seed_keys(config))
    state, metrics, _ = P.run_chunk(runner.chunk, state, config.num_updates)
    assert P.updates_done(state) == min(runner.chunk_updates, config.num_updates)
    state, metrics, _ = P.run_chunk(runner.chunk, state, P.updates_done(state))  # nothing due
    assert metrics["episode_return"].shape[1] == 0


def test_episode_statistics_count_only_finished_episodes():
    """Compare with a host-side tracker fed the raw rewards and done flags, across two
    rollouts so that episodes span rollout boundaries (rewards unscaled, so that the
    transitions hold the raw ones; scaled, the returns stay raw: the next test)."""
    config = tiny_config(num_steps=40, normalize_reward=False)
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


def test_episode_returns_stay_in_reward_units_when_rewards_are_scaled():
    config = tiny_config(num_steps=40)
    assert config.normalize_reward
    raw = dataclasses.replace(config, normalize_reward=False)
    for c in (config, raw):
        env, env_params, spec, agent, state = build(c)
        state, traj, finished = P.collect_rollout(env, env_params, spec, agent, c.num_steps,
                                                  0.99, state)
        done = np.asarray(traj.terminated | traj.truncated)
        lengths = float(finished.length_sum)
        assert finished.count > 0
        # CartPole pays 1 per step: an episode's return equals its length, in raw units.
        np.testing.assert_allclose(float(finished.return_sum), lengths)
        assert done.sum() == int(finished.count)


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
