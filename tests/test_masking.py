"""Action masking: masked actions are never sampled and drop out of log-prob and entropy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct
from gymnax.environments import environment, spaces

import ppo_jax as P
from helpers import build, numpy_log_softmax, tiny_config


@struct.dataclass
class MaskState(environment.EnvState):
    legal: jax.Array  # bool [A]
    time: int


class RandomLegalActions(environment.Environment):
    """Each step a random non-empty subset of 5 actions is legal. An illegal action costs
    -10; a legal one pays its index. The observation shows which actions are legal."""

    num = 5

    @property
    def default_params(self):
        return environment.EnvParams(max_steps_in_episode=20)

    def _draw(self, key):
        legal = jax.random.bernoulli(key, 0.4, (self.num,))
        return legal.at[jax.random.randint(key, (), 0, self.num)].set(True)

    def step_env(self, key, state, action, params):
        reward = jnp.where(state.legal[action], action.astype(jnp.float32), -10.0)
        state = MaskState(legal=self._draw(key), time=state.time + 1)
        return self.get_obs(state), state, reward, jnp.array(False), {}

    def reset_env(self, key, params):
        state = MaskState(legal=self._draw(key), time=0)
        return self.get_obs(state), state

    def get_obs(self, state, params=None, key=None):
        return state.legal.astype(jnp.float32)

    def action_mask(self, state, params):
        return state.legal

    def action_space(self, params=None):
        return spaces.Discrete(self.num)

    def observation_space(self, params):
        return spaces.Box(0.0, 1.0, (self.num,))


ENV_ID = f"{__name__}:RandomLegalActions"


def masked_categorical(seed=0, B=256, A=6):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(B, A)).astype(np.float32)
    mask = rng.random((B, A)) < 0.5
    mask[np.arange(B), rng.integers(0, A, B)] = True
    mask[0] = False
    mask[0, 2] = True  # row 0: a single legal action
    return logits, mask, P.Categorical(jnp.where(mask, logits, P.MASKED_LOGIT), jnp.asarray(mask))


def test_masked_actions_are_never_sampled():
    logits, mask, pi = masked_categorical()
    keys = jax.random.split(P.make_key(0), 200)
    samples = np.asarray(jax.vmap(pi.sample)(keys))  # [200, B]
    assert mask[np.arange(mask.shape[0]), samples].all()
    assert (samples[:, 0] == 2).all()


def test_masked_log_prob_and_entropy_match_numpy():
    logits, mask, pi = masked_categorical()
    masked = np.where(mask, logits, -np.inf)
    log_p = numpy_log_softmax(np.where(mask, logits, -1e30))
    p = np.where(mask, np.exp(log_p), 0.0)
    want_entropy = -np.sum(np.where(mask, p * log_p, 0.0), axis=-1)
    np.testing.assert_allclose(pi.entropy(), want_entropy, rtol=1e-5, atol=1e-6)
    legal_action = np.argmax(masked, axis=-1)
    np.testing.assert_allclose(pi.log_prob(jnp.asarray(legal_action)),
                               log_p[np.arange(len(log_p)), legal_action], rtol=1e-5, atol=1e-6)


def test_single_legal_action_has_zero_entropy_and_finite_gradients():
    logits, mask, _ = masked_categorical()

    def objective(raw):
        pi = P.Categorical(jnp.where(mask, raw, P.MASKED_LOGIT), jnp.asarray(mask))
        return pi.entropy()[0] + pi.log_prob(jnp.full(raw.shape[0], 2))[0]

    pi = P.Categorical(jnp.where(mask, logits, P.MASKED_LOGIT), jnp.asarray(mask))
    assert float(pi.entropy()[0]) == 0.0
    assert float(pi.log_prob(jnp.full(logits.shape[0], 2))[0]) == 0.0
    grads = jax.grad(objective)(jnp.asarray(logits))
    assert np.isfinite(np.asarray(grads)).all()


def test_training_with_a_mask_never_takes_an_illegal_action():
    config = tiny_config(env=ENV_ID, total_timesteps=4096)
    env, env_params, spec, agent, state = build(config)
    assert spec.masked
    state, traj, _ = P.collect_rollout(env, env_params, spec, agent, config.num_steps, 0.99, state)
    legal = np.take_along_axis(np.asarray(traj.mask), np.asarray(traj.action)[..., None], -1)
    assert legal.all()
    _, metrics = jax.jit(P.make_train(config))(P.make_key(0))
    assert np.nanmin(np.asarray(metrics["episode_return"])) >= 0.0  # no -10 was ever paid
    assert np.isfinite(np.asarray(metrics["entropy"])).all()


def test_masking_can_be_turned_off():
    config = tiny_config(env=ENV_ID, action_mask="off")
    _, _, spec, _, state = build(config)
    assert not spec.masked and state.mask is None


def test_masking_errors_name_the_fix():
    env, params = P.make_env("Pendulum-v1")
    with pytest.raises(P.ConfigError, match="discrete"):
        P.env_spec(env, params, "on")
    env, params = P.make_env("CartPole-v1")
    with pytest.raises(P.ConfigError, match="action_mask"):
        P.env_spec(env, params, "on")
