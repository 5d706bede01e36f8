"""A yardstick for the speed bars: PPO written the common single-function way (one jitted
train, a scan over updates, one ActorCritic module with two towers, flax's QR orthogonal
init, metrics kept for every step, no host callbacks), at ppo_jax's standard config
(Config's defaults).

ppo_jax's speed bars were set beside what such a loop does on a 2-core CPU machine (about
10 s cold, about 150k steps/s). Machines differ, so `bench.py reference` runs this file and
ppo_jax side by side and reports the ratios. It is a benchmark, not part of ppo_jax:
done = terminated | truncated here (no bootstrap through truncation), as such loops do.

    python benchmarks/reference_ppo.py      # train, print final return, steps/s and times
"""

from __future__ import annotations

import time
from typing import NamedTuple

START = time.perf_counter()  # the wall time printed counts the imports too

import flax.linen as nn  # noqa: E402
import gymnax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

CONFIG = dict(env="CartPole-v1", total_timesteps=500_000, num_envs=4, num_steps=128,
              update_epochs=4, num_minibatches=4, lr=2.5e-4, gamma=0.99, gae_lambda=0.95,
              clip_eps=0.2, ent_coef=0.01, vf_coef=0.5, max_grad_norm=0.5)


class ActorCritic(nn.Module):
    num_actions: int

    @nn.compact
    def __call__(self, x):
        init = lambda scale: dict(kernel_init=nn.initializers.orthogonal(scale),
                                  bias_init=nn.initializers.zeros)
        pi = nn.tanh(nn.Dense(64, **init(np.sqrt(2)))(x))
        pi = nn.tanh(nn.Dense(64, **init(np.sqrt(2)))(pi))
        logits = nn.Dense(self.num_actions, **init(0.01))(pi)
        v = nn.tanh(nn.Dense(64, **init(np.sqrt(2)))(x))
        v = nn.tanh(nn.Dense(64, **init(np.sqrt(2)))(v))
        return logits, nn.Dense(1, **init(1.0))(v).squeeze(-1)


class Step(NamedTuple):
    obs: jax.Array
    action: jax.Array
    log_prob: jax.Array
    value: jax.Array
    reward: jax.Array
    done: jax.Array
    episode_return: jax.Array  # the return of the episode that ended here, else 0


def make_train(c: dict):
    env, env_params = gymnax.make(c["env"])
    num_updates = c["total_timesteps"] // (c["num_envs"] * c["num_steps"])
    minibatch = c["num_envs"] * c["num_steps"] // c["num_minibatches"]
    net = ActorCritic(env.action_space(env_params).n)

    def lr(count):  # linear annealing over every minibatch step
        done = count // (c["num_minibatches"] * c["update_epochs"])
        return c["lr"] * (1.0 - done / num_updates)

    tx = optax.chain(optax.clip_by_global_norm(c["max_grad_norm"]),
                     optax.adam(lr, eps=1e-5))

    def train(key):
        key, k_init, k_reset = jax.random.split(key, 3)
        params = net.init(k_init, jnp.zeros(env.observation_space(env_params).shape))
        opt_state = tx.init(params)
        obs, env_state = jax.vmap(env.reset, (0, None))(
            jax.random.split(k_reset, c["num_envs"]), env_params)
        ep_return = jnp.zeros(c["num_envs"])

        def update(carry, _):
            params, opt_state, env_state, obs, ep_return, key = carry

            def env_step(carry, _):
                env_state, obs, ep_return, key = carry
                key, k_act, k_step = jax.random.split(key, 3)
                logits, value = net.apply(params, obs)
                action = jax.random.categorical(k_act, logits)
                log_prob = jax.nn.log_softmax(logits)[jnp.arange(c["num_envs"]), action]
                next_obs, env_state, reward, term, trunc, _ = jax.vmap(
                    env.step, (0, 0, 0, None))(jax.random.split(k_step, c["num_envs"]),
                                               env_state, action, env_params)
                done = term | trunc
                ep_return = ep_return + reward
                step = Step(obs, action, log_prob, value, reward, done,
                            jnp.where(done, ep_return, 0.0))
                return (env_state, next_obs, jnp.where(done, 0.0, ep_return), key), step

            (env_state, obs, ep_return, key), traj = jax.lax.scan(
                env_step, (env_state, obs, ep_return, key), None, c["num_steps"])
            _, last_value = net.apply(params, obs)

            def gae_step(carry, step):
                advantage, next_value = carry
                delta = step.reward + c["gamma"] * next_value * (1 - step.done) - step.value
                advantage = delta + c["gamma"] * c["gae_lambda"] * (1 - step.done) * advantage
                return (advantage, step.value), advantage

            _, advantages = jax.lax.scan(gae_step, (jnp.zeros_like(last_value), last_value),
                                         traj, reverse=True)
            targets = advantages + traj.value

            def loss_fn(params, batch):
                traj, advantages, targets = batch
                logits, value = net.apply(params, traj.obs)
                log_prob = jax.nn.log_softmax(logits)[jnp.arange(minibatch), traj.action]
                ratio = jnp.exp(log_prob - traj.log_prob)
                adv = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
                pg = -jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - c["clip_eps"],
                                                        1 + c["clip_eps"]) * adv).mean()
                clipped = traj.value + jnp.clip(value - traj.value, -c["clip_eps"], c["clip_eps"])
                vf = 0.5 * jnp.maximum((value - targets) ** 2, (clipped - targets) ** 2).mean()
                p = jax.nn.softmax(logits)
                entropy = -(p * jax.nn.log_softmax(logits)).sum(-1).mean()
                return pg + c["vf_coef"] * vf - c["ent_coef"] * entropy

            def epoch(carry, _):
                params, opt_state, key = carry
                key, k_perm = jax.random.split(key)
                batch = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]),
                                     (traj, advantages, targets))
                perm = jax.random.permutation(k_perm, c["num_envs"] * c["num_steps"])
                batch = jax.tree.map(lambda x: x[perm].reshape(c["num_minibatches"], minibatch,
                                                               *x.shape[1:]), batch)

                def minibatch_step(carry, mb):
                    params, opt_state = carry
                    loss, grads = jax.value_and_grad(loss_fn)(params, mb)
                    updates, opt_state = tx.update(grads, opt_state)
                    return (optax.apply_updates(params, updates), opt_state), loss

                (params, opt_state), loss = jax.lax.scan(minibatch_step, (params, opt_state),
                                                         batch)
                return (params, opt_state, key), loss

            (params, opt_state, key), loss = jax.lax.scan(epoch, (params, opt_state, key), None,
                                                          c["update_epochs"])
            metrics = (traj.episode_return, traj.done)  # every step's, as such loops keep
            return (params, opt_state, env_state, obs, ep_return, key), metrics

        carry = (params, opt_state, env_state, obs, ep_return, key)
        return jax.lax.scan(update, carry, None, num_updates)

    return train, num_updates * c["num_envs"] * c["num_steps"]


def final_return(metrics, updates: int = 10) -> float:
    """Mean return of the episodes that ended in the last `updates` updates."""
    returns, done = (np.asarray(m[-updates:]) for m in metrics)
    return float(returns.sum() / max(done.sum(), 1))


if __name__ == "__main__":
    train, steps = make_train(CONFIG)
    t0 = time.perf_counter()
    compiled = jax.jit(train).lower(jax.random.key(0)).compile()
    t1 = time.perf_counter()
    _, metrics = jax.block_until_ready(compiled(jax.random.key(0)))
    t2 = time.perf_counter()
    print(f"final return {final_return(metrics):.1f} | {steps / (t2 - t1):,.0f} steps/s | "
          f"compile {t1 - t0:.1f} s | train {t2 - t1:.1f} s | wall {t2 - START:.1f} s")
