"""ppo_loss against a NumPy reference, and the first-minibatch identities."""

import jax
import numpy as np
import pytest

import ppo_jax as P
from helpers import build, numpy_log_softmax, tiny_config


def random_batch(spec, agent, params, seed=0, B=64):
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(B, *spec.obs_shape)).astype(np.float32)
    action = rng.integers(0, spec.num_actions, size=B).astype(np.int32)
    logp_now = numpy_log_softmax(agent.policy(params, obs).logits)[np.arange(B), action]
    old_log_prob = (logp_now + rng.normal(scale=0.3, size=B)).astype(np.float32)  # some ratios clip
    value = rng.normal(size=B).astype(np.float32)
    return P.Batch(obs, action, old_log_prob, value, rng.normal(size=B).astype(np.float32),
                   rng.normal(size=B).astype(np.float32), None)


def numpy_ppo_loss(logits, value_now, batch, clip_eps, vf_coef, ent_coef, clip_value_loss):
    log_p = numpy_log_softmax(logits)
    B = len(batch.action)
    log_ratio = log_p[np.arange(B), batch.action] - batch.log_prob
    ratio = np.exp(log_ratio)
    adv = (batch.advantage - batch.advantage.mean()) / (batch.advantage.std() + 1e-8)
    policy = np.mean(np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - clip_eps, 1 + clip_eps)))
    sq = (value_now - batch.target) ** 2
    if clip_value_loss:
        clipped = batch.value + np.clip(value_now - batch.value, -clip_eps, clip_eps)
        sq = np.maximum(sq, (clipped - batch.target) ** 2)
    value = 0.5 * sq.mean()
    entropy = -(np.exp(log_p) * log_p).sum(-1).mean()
    total = policy + vf_coef * value - ent_coef * entropy
    kl = np.mean(ratio - 1 - log_ratio)
    clip_fraction = np.mean(np.abs(ratio - 1) > clip_eps)
    return total, policy, value, entropy, kl, clip_fraction


@pytest.mark.parametrize("clip_value_loss", [False, True])
def test_ppo_loss_matches_numpy(clip_value_loss):
    config = tiny_config(env="Acrobot-v1")
    _, _, spec, agent, state = build(config)
    batch = random_batch(spec, agent, state.params)
    loss, info = P.ppo_loss(state.params, agent, batch, 0.2, 0.5, 0.01, clip_value_loss)
    logits = agent.policy(state.params, batch.obs).logits
    value_now = np.asarray(agent.value(state.params, batch.obs))
    want = numpy_ppo_loss(logits, value_now, batch, 0.2, 0.5, 0.01, clip_value_loss)
    got = (loss, info.policy_loss, info.value_loss, info.entropy, info.approx_kl, info.clip_fraction)
    np.testing.assert_allclose(np.array(got, np.float64), np.array(want), rtol=2e-5, atol=1e-6)
    assert 0 < float(info.clip_fraction) < 1, "the batch should exercise both sides of the clip"


def test_entropy_bonus_lowers_the_loss_and_its_gradient_raises_entropy():
    config = tiny_config()
    _, _, spec, agent, state = build(config)
    batch = random_batch(spec, agent, state.params)
    loss_without, _ = P.ppo_loss(state.params, agent, batch, 0.2, 0.5, 0.0)
    loss_with, info = P.ppo_loss(state.params, agent, batch, 0.2, 0.5, 0.1)
    np.testing.assert_allclose(loss_with, loss_without - 0.1 * info.entropy, rtol=1e-6)

    def entropy_only(params):
        return P.ppo_loss(params, agent, batch, 0.2, 0.0, 1.0)[0] - P.ppo_loss(
            params, agent, batch, 0.2, 0.0, 0.0)[0]

    grads = jax.grad(entropy_only)(state.params)
    stepped = jax.tree.map(lambda p, g: p - 1.0 * g, state.params, grads)  # gradient descent
    before = agent.policy(state.params, batch.obs).entropy().mean()
    after = agent.policy(stepped, batch.obs).entropy().mean()
    assert after > before


def test_first_minibatch_has_ratio_one_no_clipping_and_zero_kl():
    """The rollout's log-probs are recomputed exactly by the loss at unchanged parameters."""
    config = tiny_config(env="Acrobot-v1")
    env, env_params, spec, agent, state = build(config)
    state, traj, _ = P.collect_rollout(env, env_params, spec, agent, config.num_steps, 0.99, state)
    batch = P.rollout_to_batch(agent, state.params, traj, 0.99, 0.95)
    first = jax.tree.map(lambda x: x[: config.minibatch_size], batch)
    pi = agent.policy(state.params, first.obs)
    np.testing.assert_allclose(np.exp(pi.log_prob(first.action) - first.log_prob), 1.0, atol=1e-5)
    _, info = P.ppo_loss(state.params, agent, first, 0.2, 0.5, 0.01)
    assert float(info.clip_fraction) == 0.0
    assert abs(float(info.approx_kl)) < 1e-7


def test_one_epoch_one_minibatch_update_reports_no_clipping():
    """End to end: with a single minibatch the only loss evaluation is at the old policy."""
    config = tiny_config(env="CartPole-v1", update_epochs=1, num_minibatches=1)
    _, metrics = jax.jit(P.make_train(config))(P.make_key(3))
    assert np.all(np.asarray(metrics["clip_fraction"]) == 0.0)
    assert np.all(np.abs(np.asarray(metrics["approx_kl"])) < 1e-6)
