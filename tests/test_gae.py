"""compute_gae against a plain-Python loop."""

import numpy as np
import pytest

import ppo_jax as P


def naive_gae(rewards, values, next_values, terminated, truncated, gamma, lam):
    """Textbook GAE, one env and one step at a time."""
    T, N = rewards.shape
    advantages = np.zeros((T, N))
    for n in range(N):
        running = 0.0
        for t in reversed(range(T)):
            bootstrap = 0.0 if terminated[t, n] else gamma * next_values[t, n]
            delta = rewards[t, n] + bootstrap - values[t, n]
            if terminated[t, n] or truncated[t, n]:
                running = 0.0  # the next row starts a new episode
            running = delta + gamma * lam * running
            advantages[t, n] = running
    return advantages, advantages + values


def random_trajectory(seed, T=64, N=5):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=(T, N)).astype(np.float32)
    values = rng.normal(size=(T, N)).astype(np.float32)
    next_values = np.roll(values, -1, axis=0)
    next_values[-1] = rng.normal(size=N)
    terminated = rng.random((T, N)) < 0.08
    truncated = (rng.random((T, N)) < 0.08) & ~terminated
    ended = terminated | truncated
    # where an episode ended, the next value is V(final observation), not V(next row)
    next_values[ended] = rng.normal(size=ended.sum())
    return rewards, values, next_values, terminated, truncated


@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (0.9, 0.0), (0.97, 1.0), (1.0, 0.5)])
def test_gae_matches_naive_loop(gamma, lam):
    data = random_trajectory(0)
    assert data[3].any() and data[4].any(), "the data must mix terminations and truncations"
    adv, ret = P.compute_gae(*data, gamma, lam)
    want_adv, want_ret = naive_gae(*data, gamma, lam)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)


def test_gae_bootstraps_through_truncation_only():
    """One step, reward 1, next value 10: truncation keeps gamma*10, termination drops it."""
    one = np.ones((1, 1), np.float32)
    zero = np.zeros((1, 1), np.float32)
    truncated, _ = P.compute_gae(one, zero, 10 * one, zero > 0, one > 0, 0.9, 0.95)
    terminated, _ = P.compute_gae(one, zero, 10 * one, one > 0, zero > 0, 0.9, 0.95)
    np.testing.assert_allclose(truncated, [[1 + 0.9 * 10]])
    np.testing.assert_allclose(terminated, [[1.0]])


def test_gae_lambda_zero_is_td_error_and_one_is_monte_carlo():
    rewards, values, next_values, terminated, truncated = random_trajectory(1)
    no_end = np.zeros_like(terminated)
    td, _ = P.compute_gae(rewards, values, next_values, terminated, truncated, 0.99, 0.0)
    delta = rewards + 0.99 * np.where(terminated, 0, next_values) - values
    np.testing.assert_allclose(td, delta, rtol=1e-5, atol=1e-5)
    # lambda = 1 and no episode end: the return is the discounted reward sum plus the bootstrap
    nv = np.roll(values, -1, axis=0)
    nv[-1] = next_values[-1]
    _, ret = P.compute_gae(rewards, values, nv, no_end, no_end, 0.99, 1.0)
    T = len(rewards)
    mc = [sum(0.99**k * rewards[t + k] for k in range(T - t)) + 0.99 ** (T - t) * nv[-1]
          for t in range(T)]
    np.testing.assert_allclose(ret, np.array(mc), rtol=1e-4, atol=1e-4)
