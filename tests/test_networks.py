"""Networks: orthogonal init without LAPACK, head scales, the Gaussian policy."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ppo_jax as P
from helpers import build, tiny_config


@pytest.mark.parametrize("shape", [(4, 64), (64, 64), (64, 2), (7, 3, 5)])
def test_orthogonal_init_has_orthonormal_rows_or_columns(shape):
    w = np.asarray(P.orthogonal(2.0)(P.make_key(0), shape), np.float64).reshape(-1, shape[-1])
    gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
    np.testing.assert_allclose(gram, 4.0 * np.eye(len(gram)), atol=1e-5)


def test_orthogonal_init_differs_by_key_and_is_unbiased():
    init = P.orthogonal(1.0)
    w = np.asarray(jax.jit(jax.vmap(lambda k: init(k, (8, 8))))(jax.random.split(P.make_key(1), 400)))
    assert not np.allclose(w[0], w[1])
    np.testing.assert_allclose(w.mean(0), 0.0, atol=0.06)  # Haar: every entry has mean 0
    np.testing.assert_allclose((w**2).mean(0), 1 / 8, atol=0.03)  # and variance 1/n


def test_heads_start_near_uniform_policy_and_small_values():
    config = tiny_config(env="Acrobot-v1", hidden_sizes=(64, 64))
    _, _, spec, agent, state = build(config)
    kernel = np.asarray(state.params["actor"]["params"]["Dense_0"]["kernel"])
    np.testing.assert_allclose(np.linalg.svd(kernel, compute_uv=False), 0.01, rtol=1e-4)
    value_kernel = np.asarray(state.params["critic"]["params"]["Dense_0"]["kernel"])
    np.testing.assert_allclose(np.linalg.norm(value_kernel), 1.0, rtol=1e-5)
    hidden = np.asarray(state.params["actor"]["params"]["Torso_0"]["Dense_1"]["kernel"])
    np.testing.assert_allclose(hidden.T @ hidden, 2.0 * np.eye(64), atol=1e-4)


def test_gaussian_log_prob_and_entropy_match_numpy():
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(32, 3)).astype(np.float32)
    log_std = rng.normal(scale=0.5, size=3).astype(np.float32)
    action = rng.normal(size=(32, 3)).astype(np.float32) * 2
    pi = P.Gaussian(jnp.asarray(mean), jnp.asarray(log_std))
    std = np.exp(log_std.astype(np.float64))
    want = np.sum(-0.5 * ((action - mean) / std) ** 2 - np.log(std * np.sqrt(2 * np.pi)), -1)
    np.testing.assert_allclose(pi.log_prob(jnp.asarray(action)), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pi.entropy(), np.full(32, np.sum(0.5 * np.log(2 * np.pi * np.e * std**2))),
                               rtol=1e-6)
    samples = np.asarray(jax.vmap(pi.sample)(jax.random.split(P.make_key(0), 4000)))
    np.testing.assert_allclose((samples - mean).std(axis=(0, 1)), std, rtol=0.05)


def test_continuous_actions_are_stored_unclipped_and_clipped_only_for_the_env():
    config = tiny_config(env="Pendulum-v1", log_std_init=1.5)  # wide: many samples exceed +-2
    env, env_params, spec, agent, state = build(config)
    _, traj, _ = P.collect_rollout(env, env_params, spec, agent, config.num_steps, 0.99, state)
    action = np.asarray(traj.action)
    assert np.abs(action).max() > 2.0
    pi = agent.policy(state.params, traj.obs[0])
    np.testing.assert_allclose(pi.log_prob(traj.action[0]), traj.log_prob[0], rtol=1e-5)


@pytest.mark.parametrize("diagnostics", [False, True])
def test_vmapped_train_has_no_lapack_call(diagnostics):
    """Batched LAPACK calls (QR in init, an eigendecomposition in a diagnostic) can deadlock
    XLA's CPU thread pool: the vmapped program must have none."""
    train = jax.vmap(P.make_train(tiny_config(diagnostics=diagnostics)))
    text = jax.jit(train).lower(jax.random.split(P.make_key(0), 4)).as_text()
    assert "lapack" not in text.lower()


def test_four_vmapped_seeds_finish_without_deadlock():
    script = textwrap.dedent("""
        import jax, numpy as np, ppo_jax as P
        config = P.Config(total_timesteps=4096, num_envs=4, num_steps=64, hidden_sizes=(64, 64))
        for seed in range(2):  # a deadlock is a matter of chance: try more than one program
            train = jax.jit(jax.vmap(P.make_train(config)))
            _, metrics = train(jax.random.split(P.make_key(seed), 4 + seed))
            assert np.isfinite(np.asarray(metrics["value_loss"])).all()
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ok" in result.stdout
