"""Every registered gymnax env trains: one update each, on Config's defaults (tiny sizes)."""

import gymnax
import jax
import numpy as np
import pytest

import ppo_jax as P
from helpers import tiny_config

# MNISTBandit-bsuite downloads MNIST when it is created; the others need nothing outside.
NEEDS_NETWORK = {"MNISTBandit-bsuite"}


# The default suite runs the five presets and one env of each other kind of observation and
# action: images through the CNN (Breakout), 2-D observations (Catch), a scalar observation
# (FrozenLake), 2-D continuous actions with float32 bounds (Reacher). The other 17, each of
# one of those kinds, run with --slow: an update compiles in 4 to 18 s.
DEFAULT_SUITE = {"CartPole-v1", "Acrobot-v1", "MountainCar-v0", "Pendulum-v1",
                 "MountainCarContinuous-v0", "Breakout-MinAtar", "Catch-bsuite",
                 "FrozenLake-misc", "Reacher-misc"}
ENVS = [env if env in DEFAULT_SUITE else pytest.param(env, marks=pytest.mark.slow)
        for env in sorted(set(gymnax.registered_envs) - NEEDS_NETWORK)]


@pytest.mark.parametrize("env", ENVS)
def test_every_registered_env_completes_one_update(env):
    config = tiny_config(env=env, total_timesteps=64, num_envs=2, num_steps=32,
                         update_epochs=1, num_minibatches=1, hidden_sizes=(8,), cnn_channels=(2,))
    assert config.num_updates == 1
    _, metrics = jax.jit(P.make_train(config))(P.make_key(0))
    for name in P.GUARDED + ("explained_variance",):
        assert np.isfinite(np.asarray(metrics[name])).all(), (env, name)


def test_an_env_that_cannot_fetch_its_data_gets_a_clear_error(monkeypatch):
    def offline(env_id, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(gymnax, "make", offline)
    with pytest.raises(P.ConfigError, match="fetches data when created"):
        P.make_env("MNISTBandit-bsuite")


def test_image_observations_pass_a_cnn_and_flat_ones_do_not():
    image = P.make_setup(tiny_config(env="Breakout-MinAtar", cnn_channels=(3,)))
    flat = P.make_setup(tiny_config(env="CartPole-v1", cnn_channels=(3,)))
    image_params = P.init_params(image.agent, image.spec, P.make_key(0))
    flat_params = P.init_params(flat.agent, flat.spec, P.make_key(0))
    conv = image_params["actor"]["params"]["Torso_0"]["Conv_0"]["kernel"]
    assert conv.shape == (3, 3, image.spec.obs_shape[-1], 3)
    assert "Conv_0" not in flat_params["actor"]["params"]["Torso_0"]
