"""Learning: return thresholds on real tasks, and bootstrapping through time limits."""

import jax
import jax.numpy as jnp
import pytest
from gymnax.environments import environment, spaces

import ppo_jax as P


class AlwaysTruncated(environment.Environment):
    """Reward 1 every step, never terminates, truncates after 20 steps; one constant
    observation, so the critic cannot tell how much time is left."""

    @property
    def default_params(self):
        return environment.EnvParams(max_steps_in_episode=20)

    def step_env(self, key, state, action, params):
        state = environment.EnvState(time=state.time + 1)
        return self.get_obs(state), state, jnp.float32(1.0), jnp.array(False), {}

    def reset_env(self, key, params):
        state = environment.EnvState(time=0)
        return self.get_obs(state), state

    def get_obs(self, state, params=None, key=None):
        return jnp.ones(1)

    def action_space(self, params=None):
        return spaces.Discrete(1)

    def observation_space(self, params):
        return spaces.Box(0.0, 1.0, (1,))


@pytest.mark.parametrize("bootstrap", [True, False])
def test_value_of_an_endless_task_approaches_one_over_one_minus_gamma(bootstrap):
    gamma = 0.9  # true value 1 / (1 - gamma) = 10; cut at the time limit it averages ~6
    config = P.Config(env=f"{__name__}:AlwaysTruncated", total_timesteps=8 * 32 * 150, num_envs=8,
                      num_steps=32, gamma=gamma, gae_lambda=0.95, learning_rate=3e-3,
                      hidden_sizes=(16,), bootstrap_truncation=bootstrap,
                      normalize_reward=False)  # the value in reward units
    state, _ = jax.jit(P.make_train(config))(P.make_key(0))
    env, env_params = P.make_env(config.env)
    agent = P.make_agent(config, P.env_spec(env, env_params))
    value = float(agent.value(state.params, jnp.ones((1, 1)))[0])
    if bootstrap:
        assert value == pytest.approx(1 / (1 - gamma), rel=0.05)
    else:
        assert value < 0.8 / (1 - gamma)


def final_return(config):
    _, metrics = jax.jit(jax.vmap(P.make_train(config)))(P.seed_keys(config))
    return P.final_returns(metrics)


def test_cartpole_preset_is_solved(cartpole_preset_run):
    # Trained by the command line (conftest.py); make_train computes the same loop
    # (test_train.py::test_runner_in_chunks_equals_vmapped_train).
    config, state = P.load_run(str(cartpole_preset_run))
    assert config.num_seeds == 2 and P.updates_done(state) == config.num_updates
    metrics = P.read_metrics(config, str(cartpole_preset_run / "metrics.jsonl"),
                             config.num_updates)
    returns = P.final_returns(metrics)
    assert (returns >= 475).all(), returns


@pytest.mark.slow
def test_acrobot_learns_well_above_random():
    returns = final_return(P.preset_config("Acrobot-v1", total_timesteps=200_000, num_seeds=2))
    assert (returns > -150).all(), returns  # a random policy scores about -500


@pytest.mark.slow
def test_pendulum_learns_well_above_random():
    returns = final_return(P.preset_config("Pendulum-v1", num_seeds=2))
    assert (returns > -600).all(), returns  # a random policy scores about -1200
