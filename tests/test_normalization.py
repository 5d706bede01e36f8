"""Running observation and reward normalization against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np

import ppo_jax as P
from helpers import build, tiny_config


def test_running_stats_equal_the_stats_of_everything_seen():
    rng = np.random.default_rng(0)
    batches = [rng.normal(loc=3.0, scale=2.0, size=(n, 3)).astype(np.float32) for n in (4, 7, 1, 16)]
    stats = None
    for batch in batches:
        stats = P.update_running_stats(stats, jnp.asarray(batch))
    everything = np.concatenate(batches).astype(np.float64)
    np.testing.assert_allclose(stats.mean, everything.mean(0), rtol=1e-5)
    np.testing.assert_allclose(stats.var, everything.var(0), rtol=1e-4)
    assert float(stats.count) == len(everything)


def test_normalize_centers_scales_and_clips():
    stats = P.RunningStats(jnp.array([1.0, -2.0]), jnp.array([4.0, 0.25]), jnp.float32(10))
    x = jnp.array([[3.0, -2.5], [1.0, 100.0]])
    want = np.clip((np.asarray(x) - [1.0, -2.0]) / np.sqrt(np.array([4.0, 0.25]) + 1e-8), -10, 10)
    np.testing.assert_allclose(P.normalize(stats, x), want, rtol=1e-6)
    np.testing.assert_array_equal(P.normalize(None, x), x)


def test_reward_scaling_matches_a_naive_loop():
    rng = np.random.default_rng(1)
    T, N, gamma = 50, 3, 0.9
    rewards = rng.normal(loc=-1.0, size=(T, N)).astype(np.float32)
    done = rng.random((T, N)) < 0.1
    obs = jnp.zeros((N, 1))
    norm = P.init_normalizers(tiny_config(normalize_reward=True), obs)
    returns_seen, running, scaled_naive, scaled = [], np.zeros(N), [], []
    for t in range(T):
        running = running * gamma + rewards[t]
        returns_seen.extend(running)
        var = np.var(np.array(returns_seen, np.float64)) if len(returns_seen) > 1 else 1.0
        # the jitted stats start from a prior of (mean 0, var 1, count 1e-4); negligible here
        scaled_naive.append(np.clip(rewards[t] / np.sqrt(var + 1e-8), -10, 10))
        running = np.where(done[t], 0.0, running)
        norm = P.update_normalizers(norm, obs, jnp.asarray(rewards[t]), jnp.asarray(done[t]), gamma)
        scaled.append(np.asarray(P.scale_reward(norm, jnp.asarray(rewards[t]))))
    np.testing.assert_allclose(np.array(scaled[1:]), np.array(scaled_naive[1:]), rtol=1e-3)


def test_rollout_stores_normalized_observations_consistently():
    """next_obs[t] and obs[t + 1] are normalized with the same statistics."""
    config = tiny_config(normalize_obs=True, normalize_reward=True)
    env, env_params, spec, agent, state = build(config)
    state, traj, _ = P.collect_rollout(env, env_params, spec, agent, config.num_steps, 0.99, state)
    done = np.asarray(traj.terminated | traj.truncated)[:-1]
    np.testing.assert_allclose(np.asarray(traj.next_obs)[:-1][~done], np.asarray(traj.obs)[1:][~done],
                               rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(traj.obs)).max() <= 10.0
    assert float(state.norm.obs.count) == config.num_envs * (config.num_steps + 1)


def test_training_with_normalization_runs_and_episode_returns_stay_raw():
    config = tiny_config(normalize_obs=True, normalize_reward=True)
    _, metrics = jax.jit(P.make_train(config))(P.make_key(0))
    returns = np.asarray(metrics["episode_return"])
    lengths = np.asarray(metrics["episode_length"])
    finite = np.isfinite(returns)
    np.testing.assert_allclose(returns[finite], lengths[finite])  # CartPole: +1 per step
