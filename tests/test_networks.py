"""Networks: orthogonal init without LAPACK, head scales, the Gaussian policy."""

import math
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


def test_conv3x3_equals_a_naive_same_convolution_and_has_nn_convs_parameters():
    import flax.linen as nn

    x = jax.random.normal(P.make_key(0), (2, 5, 6, 3))
    params = P.Conv3x3(4).init(P.make_key(1), x)
    reference = nn.Conv(4, (3, 3))
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, reference.init(P.make_key(1), x))
    kernel, bias = (np.asarray(params["params"][k], np.float64) for k in ("kernel", "bias"))
    padded = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    want = np.zeros((2, 5, 6, 4)) + bias
    for b, i, j, di, dj, c, f in np.ndindex(2, 5, 6, 3, 3, 3, 4):  # plain loops
        want[b, i, j, f] += padded[b, i + di, j + dj, c] * kernel[di, dj, c, f]
    np.testing.assert_allclose(P.Conv3x3(4).apply(params, x), want, rtol=1e-5, atol=1e-5)
    # and the same gradient as flax's convolution with these parameters
    loss = lambda module: lambda p: jnp.sum(jnp.sin(module.apply(p, x)))
    for ours, theirs in zip(jax.tree.leaves(jax.grad(loss(P.Conv3x3(4)))(params)),
                            jax.tree.leaves(jax.grad(loss(reference))(params))):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


def test_matvec_rows_is_the_matmul_row_by_row():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 7)).astype(np.float32)
    w = rng.normal(size=(7, 3)).astype(np.float32)
    want = np.array([[sum(float(x[b, k]) * float(w[k, f]) for k in range(7)) for f in range(3)]
                     for b in range(5)])  # a plain loop
    got = P.matvec_rows(jnp.asarray(x), jnp.asarray(w), (((1,), (0,)), ((), ())))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_dense_dot_general_has_the_matmuls_value_and_gradients():
    """The forward x @ W and both gradients of sum(g * (x @ W)) against plain loops in float64:
    dL/dx = g W^T, dL/dW = x^T g. Alone and vmapped over a leading axis (seeds)."""
    rng = np.random.default_rng(0)
    x, w, g = (rng.normal(size=shape).astype(np.float32) for shape in [(6, 4), (4, 3), (6, 3)])
    xd, wd, gd = (a.astype(np.float64) for a in (x, w, g))
    want_y = np.array([[sum(xd[b, k] * wd[k, f] for k in range(4)) for f in range(3)]
                       for b in range(6)])
    want_dx = np.array([[sum(gd[b, f] * wd[k, f] for f in range(3)) for k in range(4)]
                        for b in range(6)])
    want_dw = np.array([[sum(xd[b, k] * gd[b, f] for b in range(6)) for f in range(3)]
                        for k in range(4)])
    dot = lambda x, w: P.dense_dot_general(x, w, (((1,), (0,)), ((), ())))
    loss = lambda x, w, g: jnp.sum(g * dot(x, w))
    np.testing.assert_allclose(np.asarray(dot(x, w)), want_y, rtol=1e-5, atol=1e-5)
    dx, dw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w, g)
    np.testing.assert_allclose(np.asarray(dx), want_dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw), want_dw, rtol=1e-5, atol=1e-5)
    stacked = lambda a: np.stack([a, 2 * a])
    dx2, dw2 = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1))))(stacked(x), stacked(w), stacked(g))
    np.testing.assert_allclose(np.asarray(dx2[1]), 4 * want_dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw2[1]), 4 * want_dw, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's choice of matmul library")
def test_the_weight_gradient_stays_a_plain_matmul():
    """XLA must not fold the transposed copy of x back into the weight gradient's dot: a dot
    contracting over the batch axis of both operands goes to Eigen, not YNNPACK."""
    _, _, _, agent, state = build(tiny_config(hidden_sizes=(64, 64)))
    obs = jnp.zeros((128, 4))
    loss = lambda params: (agent.value(params, obs).sum()
                           + agent.policy(params, obs).log_probs().sum())
    hlo = jax.jit(jax.grad(loss)).lower(state.params).compile().as_text()
    assert "lhs_contracting_dims={0}" not in hlo
    plain = jax.grad(lambda w: jnp.sum(jnp.tanh(obs @ w)))  # the same gradient, as JAX gives it
    assert "lhs_contracting_dims={0}" in jax.jit(plain).lower(jnp.zeros((4, 64))).compile().as_text()


@pytest.mark.parametrize("env", ["CartPole-v1", "Pendulum-v1"])
def test_the_rollouts_one_env_at_a_time_actor_is_the_same_policy(env):
    config = tiny_config(env=env, hidden_sizes=(64, 64))
    _, _, spec, agent, state = build(config)
    assert agent.matvec_rollout  # one run of 4 envs: the rollout computes it row by row
    obs = jax.random.normal(P.make_key(3), (4, *spec.obs_shape))
    batched = agent.policy(state.params, obs)
    rowwise = agent.policy(state.params, obs, rollout=True)
    for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(rowwise)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_make_agent_computes_row_by_row_only_for_one_run_of_a_few_vector_envs():
    spec_of = lambda config: P.env_spec(*P.make_env(config.env))
    agent = lambda config: P.make_agent(config, spec_of(config))
    assert agent(P.Config()).matvec_rollout  # the standard config: 4 envs
    assert agent(P.Config(num_envs=P.MATVEC_MAX_ENVS)).matvec_rollout
    assert not agent(P.Config(num_envs=P.MATVEC_MAX_ENVS * 2)).matvec_rollout
    assert not agent(P.Config(num_seeds=2)).matvec_rollout  # vmapped: batched matmuls
    assert not agent(P.Config(env="Breakout-MinAtar", num_envs=4,
                              hidden_sizes=(16,))).matvec_rollout  # image observations
