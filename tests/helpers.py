"""Small shared pieces for the tests: tiny configs and a built agent."""

import functools

import jax

import ppo_jax as P

# Tiny sizes compile fast. The costlier diagnostics are off here (a bigger program to
# compile); test_diagnostics.py and the resume test turn them on.
TINY = dict(total_timesteps=2048, num_envs=4, num_steps=32, update_epochs=2, num_minibatches=2,
            hidden_sizes=(16, 16), diagnostics=False)


def tiny_config(**overrides) -> P.Config:
    return P.Config(**{**TINY, **overrides})


@functools.cache
def jitted_train(config: P.Config):
    """jax.jit(make_train(config)), one per config for the whole session: tests that train the
    same config share its compile (about 5 s each)."""
    return jax.jit(P.make_train(config))


@functools.cache
def jitted_vmapped_train(config: P.Config):
    """jax.jit(jax.vmap(make_train(config))), shared in the same way (make_train ignores
    num_seeds, so configs that differ only there can share it too)."""
    return jax.jit(jax.vmap(P.make_train(config)))


# Compile options that undo the suite's XLA_FLAGS (conftest.py) for one program, so that it
# is compiled as users' programs are. Bitwise comparisons of two different programs use
# them: with the fusion emitters and LLVM's optimisation off, such programs have come to
# differ in the last bits (copy insertion's region analysis; --diagnostics on and off).
AS_USERS_COMPILE = ({"xla_cpu_use_fusion_emitters": True, "xla_backend_optimization_level": 3}
                    if jax.default_backend() == "cpu" else None)


def compiled_as_users(jitted, *args, **options):
    """jitted, lowered for args and compiled as users' programs are (plus options)."""
    return jitted.lower(*args).compile({**(AS_USERS_COMPILE or {}), **options} or None)


def build(config: P.Config, seed: int = 0):
    """env, env_params, spec, agent and an initial RunnerState for `config`."""
    env, env_params = P.make_env(config.env)
    spec = P.env_spec(env, env_params, config.action_mask)
    agent = P.make_agent(config, spec)
    state = P.init_runner_state(config, env, env_params, spec, agent, config.hparams(),
                                P.make_key(seed))
    return env, env_params, spec, agent, state


def numpy_log_softmax(logits):
    import numpy as np

    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
