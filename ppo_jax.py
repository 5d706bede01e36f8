"""ppo_jax: Proximal Policy Optimization in one readable JAX file.

Run it:
    python ppo_jax.py --env CartPole-v1            # train, with live progress
    python ppo_jax.py --env Acrobot-v1 --num-seeds 8 --learning-rate 1e-3
    python ppo_jax.py --help                       # every flag, with its meaning

Import it:
    from ppo_jax import Config, make_key, make_train
    train = jax.jit(jax.vmap(make_train(Config(env="CartPole-v1"))))
    runner_state, metrics = train(jax.random.split(make_key(0), 8))  # 8 seeds, one jit

The file reads in the algorithm's order: config, environment, networks, the rollout phase
(collect_rollout), advantages (compute_gae), the loss (ppo_loss), the learning phase
(update_minibatch -> update_epoch -> update), and make_train, which composes them.

Shape letters used in comments: T steps per rollout, N parallel envs, B minibatch,
A actions, D action dimensions, S seeds, U updates.

Conventions, where PPO codebases disagree:
- A Transition is one step: the observation the action was chosen from, the action, and the
  reward and flags that the step produced. `terminated` and `truncated` belong to the step
  that ends the episode.
- A time limit is not a termination. A truncated step bootstraps from the critic's value of
  the true next observation (gymnax's info["final_observation"]); only termination zeroes it.
- The value loss is 0.5 (V - R)^2, or its clipped variant behind `clip_value_loss`.
- Gradients are clipped by their global norm over actor and critic together, not per element.
- Advantages are normalized per minibatch. The learning rate and the entropy coefficient
  follow per-update linear schedules.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import difflib
import functools
import gc
import hashlib
import importlib
import importlib.util
import importlib.metadata
import io
import itertools
import json
import logging
import math
import os
import pickle
import platform
import signal
import sys
import threading
import time
import types
import warnings
from typing import Any, Literal, NamedTuple

# The summary's wall time counts from here: importing jax and flax is 1.5 s of a run.
IMPORTED_AT = time.perf_counter()

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.flatten_util  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import serialization, struct  # noqa: E402
from jax.experimental import io_callback  # noqa: E402

# ── Config ────────────────────────────────────────────────────────────────────────────────


class ConfigError(ValueError):
    """A configuration that cannot train. The message names the problem and the fix."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Every hyperparameter of a run. Each field is also a command-line flag."""

    env: str = "CartPole-v1"
    """gymnax environment id, or 'package.module:Class' for a custom gymnax Environment."""
    seed: int = 0
    """Random seed; seed i of --num-seeds is derived from it."""
    num_seeds: int = 1
    """Independent seeds trained together in one jit (vmap over keys)."""
    total_timesteps: int = 500_000
    """Environment steps per seed."""
    num_envs: int = 4
    """Parallel environments per seed (N)."""
    num_steps: int = 128
    """Steps per environment in each rollout (T)."""
    update_epochs: int = 4
    """Passes over each rollout in the learning phase."""
    num_minibatches: int = 4
    """Minibatches per epoch; must divide num_envs * num_steps."""
    learning_rate: float = 2.5e-4
    """Step size at the first update."""
    anneal_lr: bool = True
    """Decay the learning rate linearly to zero over the updates."""
    gamma: float = 0.99
    """Discount factor."""
    gae_lambda: float = 0.95
    """GAE lambda: 0 is one-step TD, 1 is the Monte-Carlo return."""
    clip_eps: float = 0.2
    """PPO ratio clip: the policy loss ignores ratios beyond 1 +- clip_eps."""
    clip_value_loss: bool = False
    """Clip the value loss around the rollout's values, like the policy ratio."""
    ent_coef: float = 0.01
    """Entropy bonus coefficient at the first update."""
    ent_coef_final: float | None = None
    """Entropy coefficient at the last update, reached linearly (None: constant ent_coef)."""
    vf_coef: float = 0.5
    """Value loss coefficient."""
    max_grad_norm: float = 0.5
    """Global gradient-norm clip, over actor and critic together."""
    optimizer: Literal["adam", "sgd"] = "adam"
    """Adam, or plain SGD (the clipped gradient times the learning rate; it needs a larger
    one). notebooks/02 compares them."""
    target_kl: float | None = None
    """Stop an update's remaining epochs once an epoch's mean approx KL exceeds this."""
    hidden_sizes: tuple[int, ...] = (64, 64)
    """Hidden layer widths of the actor and of the critic (separate networks)."""
    activation: Literal["tanh", "relu"] = "tanh"
    """Hidden layer activation."""
    cnn_channels: tuple[int, ...] = (16,)
    """Channels of the 3x3 convolutions that image observations (MinAtar) pass first."""
    diagnostics: bool = False
    """Also log per-term gradient norms, the exploration split and dormant units / feature
    rank on a probe batch (about 15 % of run time and 2 s of compiling; off: none at all)."""
    log_std_init: float = 0.0
    """Initial log standard deviation of the Gaussian policy (continuous actions)."""
    action_mask: Literal["auto", "on", "off"] = "auto"
    """Use the env's action_mask(state, params) method: auto = when it has one."""
    bootstrap_truncation: bool = True
    """Bootstrap from V(final observation) at time limits; off treats them as terminal."""
    normalize_obs: bool = False
    """Normalize observations by running mean and variance (kept in the jitted state)."""
    normalize_reward: bool = False
    """Scale rewards by the running std of the discounted return (as gymnasium does)."""
    sweep: tuple[str, ...] = ()
    """Train a grid in the same jit: NAME=V1,V2,... for any of learning_rate, ent_coef,
    clip_eps, gamma, gae_lambda, vf_coef, max_grad_norm; each setting gets num_seeds seeds."""
    out: str | None = None
    """Output folder (default runs/<env>-<timestamp>)."""
    eval_every: int = 0
    """Every N updates, evaluate each seed on fresh episodes (0: never), into the metrics."""
    eval_episodes: int = 16
    """Episodes per evaluation during training (--eval-every)."""
    save_every: int = 0
    """Also checkpoint every N updates (0: only at the end, on Ctrl-C, or on a NaN)."""
    tensorboard: bool = False
    """Also write every metric to <out>/tensorboard/seed_<i>, at each checkpoint and the end."""
    resume: str | None = None
    """Continue the run in this folder from its checkpoint, with its own config."""
    quiet: bool = False
    """No live progress bar."""
    compile_cache: bool = True
    """Keep compiled programs in ~/.cache/ppo_jax so a second identical run skips compiling."""
    cpu_threads: int = 0
    """Threads XLA:CPU trains on. 0: one for a small single run (see small_run) where no
    GPU or TPU plugin is installed, else JAX's default of one per core; PJRT_NPROC in the
    environment wins over 0. On 2 cores, 1 trained the standard config 19 % faster,
    Breakout-MinAtar 39 % slower. Another count changed a Breakout-MinAtar run's outputs:
    keep it to resume bitwise."""

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.num_minibatches

    @property
    def num_updates(self) -> int:
        return self.total_timesteps // self.batch_size

    @property
    def settings(self) -> list[dict[str, float]]:
        """The grid that --sweep asks for, one dict of overrides per setting ([{}] without)."""
        axes = [parse_sweep(item) for item in self.sweep]
        return [dict(zip([name for name, _ in axes], values))
                for values in itertools.product(*(values for _, values in axes))]

    @property
    def num_runs(self) -> int:
        """Trained (setting, seed) pairs: the S axis of every array. Run r is seed
        r % num_seeds of setting r // num_seeds."""
        return len(self.settings) * self.num_seeds

    def hparams(self) -> HParams:
        """The rates and coefficients as arrays, so a grid of them can be vmapped: scalars,
        or [num_runs] arrays when sweeping."""
        if self.sweep:
            runs = [dataclasses.replace(self, sweep=(), **setting).hparams()
                    for setting in self.settings for _ in range(self.num_seeds)]
            return HParams(*(jnp.stack(values) for values in zip(*runs)))
        final = self.ent_coef if self.ent_coef_final is None else self.ent_coef_final
        target_kl = math.inf if self.target_kl is None else self.target_kl
        return HParams(*(jnp.float32(v) for v in (
            self.learning_rate, self.ent_coef, final, self.clip_eps, self.gamma,
            self.gae_lambda, self.vf_coef, self.max_grad_norm, target_kl)))


class HParams(NamedTuple):
    """The traced hyperparameters. Everything else in Config fixes shapes and is static."""

    learning_rate: jax.Array
    ent_coef: jax.Array
    ent_coef_final: jax.Array
    clip_eps: jax.Array
    gamma: jax.Array
    gae_lambda: jax.Array
    vf_coef: jax.Array
    max_grad_norm: jax.Array
    target_kl: jax.Array


# Per-env starting points: `--env X` starts from PRESETS[X]; explicit flags override it.
# The measured results of each are in the README.
PRESETS: dict[str, dict[str, Any]] = {
    "CartPole-v1": dict(total_timesteps=150_000, num_envs=16, num_steps=32, learning_rate=2.5e-3),
    "Acrobot-v1": dict(total_timesteps=500_000, num_envs=16, num_steps=128, learning_rate=1e-3,
                       ent_coef=0.0),
    # Sparse reward: unnormalized, the policy never finds the flag and stays at -200.
    "MountainCar-v0": dict(total_timesteps=1_000_000, num_envs=16, num_steps=16, gae_lambda=0.98,
                           ent_coef=0.0, learning_rate=3e-4, anneal_lr=False,
                           normalize_obs=True, normalize_reward=True),
    "Pendulum-v1": dict(total_timesteps=1_000_000, num_envs=16, num_steps=128,
                        gamma=0.9, ent_coef=0.0, learning_rate=1e-3, normalize_obs=True,
                        normalize_reward=True),
    # Reaching the flag takes ~100 steps of pushing the right way: 64 envs find it by chance,
    # and gamma 0.9999 keeps its reward visible from the start of a 999-step episode.
    "MountainCarContinuous-v0": dict(total_timesteps=2_000_000, num_envs=64, num_steps=128,
                                     gamma=0.9999, ent_coef=0.0, normalize_obs=True,
                                     normalize_reward=True),
    # gamma 0.999 and constant lr as in the gymnax baselines; on the CPU a flat 2 x 256 MLP
    # trains 7x faster than the CNN torso (23k against 3.3k steps/s on Breakout).
    **{f"{game}-MinAtar": dict(total_timesteps=10_000_000, num_envs=64, num_steps=128,
                               num_minibatches=8, learning_rate=5e-4, anneal_lr=False,
                               gamma=0.999, activation="relu", hidden_sizes=(256, 256),
                               cnn_channels=(),
                               # measured: 0.01 left Breakout at 22 after 1e7 steps, 0.03 at 54
                               ent_coef=0.03 if game == "Breakout" else 0.01)
       for game in ("Breakout", "SpaceInvaders", "Asterix", "Freeway")},
}


SWEEPABLE = ("learning_rate", "ent_coef", "clip_eps", "gamma", "gae_lambda", "vf_coef",
             "max_grad_norm")


def parse_sweep(item: str) -> tuple[str, list[float]]:
    """'learning_rate=1e-4,3e-4' -> ('learning_rate', [1e-4, 3e-4])."""
    name, _, values = item.partition("=")
    if name not in SWEEPABLE:
        raise ConfigError(f"--sweep {item!r}: sweep one of {', '.join(SWEEPABLE)} as NAME=V1,V2")
    try:
        return name, [float(v) for v in values.split(",")]
    except ValueError:
        raise ConfigError(f"--sweep {item!r}: values must be numbers separated by commas, "
                          "like learning_rate=1e-4,3e-4") from None


def preset_config(env: str, **overrides: Any) -> Config:
    """The Config that `--env env` starts from, with `overrides` applied on top."""
    return Config(**{"env": env, **PRESETS.get(env, {}), **overrides})


def validate_config(config: Config) -> None:
    """Raise ConfigError, naming the fix, for any setting that cannot train."""
    sizes = ("num_seeds", "total_timesteps", "num_envs", "num_steps", "update_epochs",
             "num_minibatches", "eval_episodes")
    for name in sizes:
        if getattr(config, name) <= 0:
            raise ConfigError(f"{name} must be positive, got {getattr(config, name)}")
    if not config.hidden_sizes or min(config.hidden_sizes) <= 0:
        raise ConfigError(f"hidden_sizes must be positive widths, got {config.hidden_sizes}")
    if config.cnn_channels and min(config.cnn_channels) <= 0:
        raise ConfigError(f"cnn_channels must be positive, got {config.cnn_channels}")
    if config.batch_size % config.num_minibatches:
        raise ConfigError(
            f"num_envs * num_steps = {config.batch_size} is not divisible by num_minibatches "
            f"= {config.num_minibatches}; pick a num_minibatches that divides it")
    if config.total_timesteps < config.batch_size:
        raise ConfigError(
            f"total_timesteps = {config.total_timesteps} is less than one batch (num_envs * "
            f"num_steps = {config.batch_size}); raise it or shrink the batch")
    if not config.learning_rate > 0 or not math.isfinite(config.learning_rate):
        raise ConfigError(f"learning_rate must be a positive number, got {config.learning_rate}")
    for name in ("gamma", "gae_lambda"):
        if not 0.0 <= getattr(config, name) <= 1.0:
            raise ConfigError(f"{name} must lie in [0, 1], got {getattr(config, name)}")
    for name in ("clip_eps", "ent_coef", "vf_coef", "max_grad_norm"):
        if not getattr(config, name) >= 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(config, name)}")
    if config.ent_coef_final is not None and not config.ent_coef_final >= 0:
        raise ConfigError(f"ent_coef_final must be >= 0, got {config.ent_coef_final}")
    if config.sweep:
        names = [parse_sweep(item)[0] for item in config.sweep]
        if len(set(names)) < len(names):
            raise ConfigError(f"--sweep names {', '.join(names)}: give each name once")
        for setting in config.settings:
            validate_config(dataclasses.replace(config, sweep=(), **setting))
    if config.eval_every < 0:
        raise ConfigError(f"eval_every must be >= 0 (0 never evaluates), got {config.eval_every}")
    if config.save_every < 0:
        raise ConfigError(f"save_every must be >= 0 (0 saves only at the end), got {config.save_every}")
    if config.cpu_threads < 0:
        raise ConfigError(f"cpu_threads must be >= 0 (0 chooses by the run's size), got {config.cpu_threads}")
    if config.target_kl is not None and not config.target_kl > 0:
        raise ConfigError(f"target_kl must be positive (or None to disable), got {config.target_kl}")


# ── Environment ───────────────────────────────────────────────────────────────────────────
# Any gymnax Environment works. To forbid actions, a discrete env defines
#     def action_mask(self, state, params) -> jax.Array  # bool [A], True where legal
# It is called on the state each observation comes from (after auto-reset), so the mask
# always describes the observation the policy sees.


def make_env(env_id: str) -> tuple[Any, Any]:
    """The gymnax environment and its default params, from an id or 'module:Class'."""
    gymnax = import_gymnax()
    if ":" in env_id:
        module_name, _, class_name = env_id.partition(":")
        try:
            env = getattr(importlib.import_module(module_name), class_name)()
        except (ImportError, AttributeError) as error:
            raise ConfigError(f"cannot load env {env_id!r} ({error}); give 'module:Class' of an "
                              "importable gymnax Environment") from None
        return env, env.default_params
    if env_id not in gymnax.registered_envs:
        close = difflib.get_close_matches(env_id, gymnax.registered_envs, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "see gymnax.registered_envs"
        raise ConfigError(f"unknown env {env_id!r}; {hint}")
    try:
        return gymnax.make(env_id)
    except OSError as error:  # MNISTBandit-bsuite downloads MNIST when it is created
        raise ConfigError(f"{env_id} fetches data when created, and that failed ({error}); "
                          "connect to the internet or pick another env") from None


class EnvSpec(NamedTuple):
    """What the networks and the rollout need to know about an environment."""

    obs_shape: tuple[int, ...]
    discrete: bool
    num_actions: int  # A for discrete envs, D (action dimensions) for continuous ones
    action_low: Any  # Box bounds that continuous actions are clipped to when stepping
    action_high: Any
    masked: bool  # whether the env's action_mask is used


def env_spec(env: Any, env_params: Any, action_mask: str = "auto") -> EnvSpec:
    """Read shapes and action bounds from the env; decide whether masks are used."""
    space = env.action_space(env_params)
    discrete = isinstance(space, import_gymnax().environments.spaces.Discrete)
    has_mask = callable(getattr(env, "action_mask", None))
    if action_mask == "on" and not discrete:
        raise ConfigError("action masking needs discrete actions; drop --action-mask on")
    if action_mask == "on" and not has_mask:
        raise ConfigError(f"{env.name} has no action_mask(state, params) method; "
                          "define one or pass --action-mask off")
    masked = discrete and has_mask and action_mask != "off"
    # The shape of what reset returns, by tracing it: nothing is compiled. Reading it from
    # observation_space compiled two programs at every start (CartPole builds its bounds
    # as arrays, op by op).
    obs_shape = tuple(jax.eval_shape(lambda: env.reset(make_key(0), env_params)[0]).shape)
    if discrete:
        return EnvSpec(obs_shape, True, int(space.n), None, None, masked)
    low, high = np.broadcast_to(space.low, space.shape), np.broadcast_to(space.high, space.shape)
    return EnvSpec(obs_shape, False, int(np.prod(space.shape)), low, high, False)


def reset_envs(env, env_params, spec: EnvSpec, key, num_envs: int):
    """Reset N envs. Returns obs [N, *obs], env_state, mask [N, A] or None."""
    obs, env_state = jax.vmap(env.reset, in_axes=(0, None))(
        jax.random.split(key, num_envs), env_params)
    return obs, env_state, action_masks(env, env_params, spec, env_state)


def action_masks(env, env_params, spec: EnvSpec, env_state):
    """The legal-action mask [N, A] of each env's current state, or None if unmasked."""
    if not spec.masked:
        return None
    return jax.vmap(env.action_mask, in_axes=(0, None))(env_state, env_params).astype(bool)


class RunningStats(NamedTuple):
    """Mean and variance of every sample seen so far."""

    mean: jax.Array
    var: jax.Array
    count: jax.Array


def update_running_stats(stats: RunningStats | None, batch) -> RunningStats:
    """Fold a batch [N, ...] into the statistics (Chan et al.'s parallel variance update)."""
    batch_mean, batch_var, n = batch.mean(0), batch.var(0), batch.shape[0]
    if stats is None:
        return RunningStats(batch_mean, batch_var, jnp.float32(n))
    delta = batch_mean - stats.mean
    total = stats.count + n
    m2 = stats.var * stats.count + batch_var * n + delta**2 * stats.count * n / total
    return RunningStats(stats.mean + delta * n / total, m2 / total, total)


def normalize(stats: RunningStats | None, x, clip: float = 10.0):
    """(x - mean) / std, clipped to +-clip; the identity when stats is None."""
    if stats is None:
        return x.astype(jnp.float32)
    return jnp.clip((x - stats.mean) / jnp.sqrt(stats.var + 1e-8), -clip, clip)


class Normalizers(NamedTuple):
    """Running statistics for --normalize-obs and --normalize-reward (None when off)."""

    obs: RunningStats | None  # over observations, per feature
    reward: RunningStats | None  # over the discounted return, a scalar
    discounted_return: jax.Array | None  # [N] running discounted return of each env


def init_normalizers(config: Config, obs) -> Normalizers:
    if not config.normalize_reward:
        return Normalizers(update_running_stats(None, obs) if config.normalize_obs else None,
                           None, None)
    zero = jnp.zeros(obs.shape[0])
    return Normalizers(update_running_stats(None, obs) if config.normalize_obs else None,
                       RunningStats(jnp.float32(0.0), jnp.float32(1.0), jnp.float32(1e-4)), zero)


def update_normalizers(norm: Normalizers, obs, reward, done, gamma) -> Normalizers:
    """Fold one step of N envs (new observations, rewards, episode ends) into the stats."""
    obs_stats = None if norm.obs is None else update_running_stats(norm.obs, obs)
    if norm.reward is None:
        return Normalizers(obs_stats, None, None)
    discounted = norm.discounted_return * gamma + reward
    reward_stats = update_running_stats(norm.reward, discounted)
    return Normalizers(obs_stats, reward_stats, jnp.where(done, 0.0, discounted))


def scale_reward(norm: Normalizers, reward):
    """Divide by the std of the discounted return (no centering: the sign of a reward is
    information), clipped to +-10."""
    if norm.reward is None:
        return reward
    return jnp.clip(reward / jnp.sqrt(norm.reward.var + 1e-8), -10.0, 10.0)


# ── Networks ──────────────────────────────────────────────────────────────────────────────

# A masked action's logit. Finite, so softmax gives it exactly zero probability without the
# inf - inf = NaN that -inf would produce in log-softmax and in its gradient.
MASKED_LOGIT = -1e9


def orthogonal(scale: float = 1.0):
    """Orthogonal initializer built by Gram-Schmidt instead of a QR decomposition.

    Same distribution as QR with a sign fix (Haar), but only matmuls: under vmap over seeds,
    QR becomes batched LAPACK calls that can deadlock XLA's CPU thread pool.
    """

    def init(key, shape, dtype=jnp.float32):
        rows, cols = math.prod(shape[:-1]), shape[-1]
        tall = jax.random.normal(key, (max(rows, cols), min(rows, cols)), jnp.float32)

        def gram_schmidt_step(q, j):
            v = tall[:, j]
            for _ in range(2):  # orthogonalize twice: float32 round-off stays at machine eps
                v = v - q @ (q.T @ v)
            return q.at[:, j].set(v / jnp.linalg.norm(v)), None

        q, _ = jax.lax.scan(gram_schmidt_step, jnp.zeros_like(tall), jnp.arange(tall.shape[1]))
        q = q if rows >= cols else q.T
        return (scale * q).reshape(shape).astype(dtype)

    return init


ACTIVATIONS = {"tanh": nn.tanh, "relu": nn.relu}


def matvec_rows(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """lhs @ rhs ([B, K] @ [K, F]) as B matrix-vector products, one per step of a lax.map:
    nn.Dense's dot_general where the rollout steps a few envs (make_agent decides).

    Why: XLA:CPU hands a matmul to a library (YNNPACK), and a loop whose body calls one runs
    op by op, each a dispatched kernel: 53 per rollout step at the standard config. A
    matrix-vector product XLA compiles itself, and then the whole rollout step, env
    included, compiles to one kernel (up to the size set in raise_xla_loop_threshold).
    The standard config's rollout took 0.38 to 0.57 ms per update instead of 0.83 to 1.57
    (three alternating pairs of runs on the EPYC Zen 3)."""
    assert dimension_numbers == (((1,), (0,)), ((), ())), dimension_numbers  # a 2-D x @ W
    row_times_rhs = (((0,), (0,)), ((), ()))
    return jax.lax.map(lambda row: jax.lax.dot_general(
        row, rhs, row_times_rhs, precision, preferred_element_type=preferred_element_type), lhs)


@jax.custom_vjp
def matmul_transposed_wgrad(x, kernel):
    """x @ kernel ([B, K] @ [K, F]) whose weight gradient x^T @ g is a plain matmul of a
    transposed copy of x. See dense_dot_general."""
    return jax.lax.dot_general(x, kernel, (((1,), (0,)), ((), ())))


def _matmul_transposed_wgrad_fwd(x, kernel):
    return matmul_transposed_wgrad(x, kernel), (x, kernel)


def _matmul_transposed_wgrad_bwd(residuals, g):
    x, kernel = residuals
    x_grad = jax.lax.dot_general(g, kernel, (((1,), (1,)), ((), ())))  # g @ kernel^T
    # The barrier keeps XLA from folding the transpose back into the dot's dimensions.
    kernel_grad = jax.lax.optimization_barrier(x.T) @ g
    return x_grad, kernel_grad


matmul_transposed_wgrad.defvjp(_matmul_transposed_wgrad_fwd, _matmul_transposed_wgrad_bwd)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """nn.Dense's dot_general for the learning phase on XLA:CPU: the same x @ W forward,
    with the weight gradient computed by matmul_transposed_wgrad.

    Why: XLA:CPU hands a matmul to YNNPACK, but the weight gradient x^T @ g contracts over
    the batch axis of both, and such a dot goes to Eigen instead: a quarter of the learning
    phase's time on the EPYC Zen 4, for a third of its arithmetic. Given x^T as an array of
    its own, the gradient is a plain matmul, and YNNPACK computes it: the standard config
    trained at 214,144 instead of 208,797 steps/s there, the CartPole preset at 220,683
    instead of 210,437 (old and new turn about in one process)."""
    if (lhs.ndim != 2 or precision is not None or preferred_element_type is not None
            or jax.default_backend() != "cpu"):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision,
                                   preferred_element_type=preferred_element_type)
    assert dimension_numbers == (((1,), (0,)), ((), ())), dimension_numbers  # a 2-D x @ W
    return matmul_transposed_wgrad(lhs, rhs)


class Conv3x3(nn.Module):
    """nn.Conv(features, (3, 3)) with 'SAME' padding (same parameters, same numbers),
    computed as image patches times a matrix. XLA:CPU runs a convolution's gradient inside a
    loop (and all of training is one) about 5x slower than outside one; as patches and a
    matmul, Breakout-MinAtar's learning phase (one conv layer of 16) took 2.0 s per update
    instead of 8.5 s."""

    features: int

    @nn.compact
    def __call__(self, x):  # [B, H, W, C] -> [B, H, W, features]
        shape = (3, 3, x.shape[-1], self.features)
        kernel = self.param("kernel", orthogonal(math.sqrt(2)), shape)
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        patches = jax.lax.conv_general_dilated_patches(  # [B, H, W, C * 9], channel-major
            x, (3, 3), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return patches @ kernel.transpose(2, 0, 1, 3).reshape(-1, self.features) + bias


class Torso(nn.Module):
    """The shared shape of actor and critic before their heads: for image observations
    [H, W, C] (MinAtar) a small CNN first (3x3 convolutions, ReLU), then hidden layers.
    Orthogonal(sqrt 2) init throughout."""

    hidden_sizes: tuple[int, ...]
    activation: str
    cnn_channels: tuple[int, ...] = ()
    matvec: bool = False  # dense layers one row at a time (matvec_rows)

    @nn.compact
    def __call__(self, obs):  # obs [B, *obs_shape] -> [B, hidden_sizes[-1]]
        x = obs.astype(jnp.float32)
        if x.ndim == 4:  # [B, H, W, C]
            for i, channels in enumerate(self.cnn_channels):
                x = nn.relu(Conv3x3(channels, name=f"Conv_{i}")(x))  # nn.Conv's parameter names
        x = x.reshape(x.shape[0], -1)
        for width in self.hidden_sizes:
            x = nn.Dense(width, kernel_init=orthogonal(math.sqrt(2)),
                         dot_general=matvec_rows if self.matvec else dense_dot_general)(x)
            x = ACTIVATIONS[self.activation](x)
            self.sow("intermediates", "hidden", x)  # for representation_diagnostics; free otherwise
        return x


class Categorical(struct.PyTreeNode):
    """A categorical policy over A actions, restricted to the legal ones when masked."""

    logits: jax.Array  # [B, A]; masked entries hold MASKED_LOGIT
    mask: jax.Array | None = None  # [B, A], True where legal

    def log_probs(self):
        return jax.nn.log_softmax(self.logits)

    def sample(self, key):
        return jax.random.categorical(key, self.logits)

    def mode(self):
        return jnp.argmax(self.logits, axis=-1)

    def log_prob(self, action):
        return jnp.sum(self.log_probs() * jax.nn.one_hot(action, self.logits.shape[-1]), axis=-1)

    def max_prob(self):
        """The probability of the most likely action: 1 is a deterministic policy."""
        return jnp.exp(self.log_probs().max(axis=-1))

    def normalized_entropy(self):
        """H / log(number of legal actions): 1 is uniform over the legal actions, 0 certain.
        Raw entropy cannot be compared across states with different numbers of legal
        actions; this can. Zero when only one action is legal."""
        legal = self.logits.shape[-1] if self.mask is None else self.mask.sum(axis=-1)
        return jnp.where(legal > 1, self.entropy() / jnp.log(jnp.maximum(legal, 2)), 0.0)

    def entropy(self):
        """H = -sum_a p(a) log p(a) over legal actions only (zero when one is legal)."""
        log_p = self.log_probs()
        p_log_p = jnp.exp(log_p) * log_p
        if self.mask is not None:
            p_log_p = jnp.where(self.mask, p_log_p, 0.0)
        return -p_log_p.sum(axis=-1)


class Gaussian(struct.PyTreeNode):
    """A diagonal Gaussian policy whose log-std does not depend on the state."""

    mean: jax.Array  # [B, D]
    log_std: jax.Array  # [D]

    def sample(self, key):
        return self.mean + jnp.exp(self.log_std) * jax.random.normal(key, self.mean.shape)

    def mode(self):
        return self.mean

    def log_prob(self, action):
        """log N(a; mu, sigma) = sum_d -((a - mu) / sigma)^2 / 2 - log sigma - log(2 pi) / 2."""
        z = (action - self.mean) / jnp.exp(self.log_std)
        return jnp.sum(-0.5 * z**2 - self.log_std - 0.5 * jnp.log(2 * jnp.pi), axis=-1)

    def entropy(self):
        per_dim = 0.5 + 0.5 * jnp.log(2 * jnp.pi) + self.log_std
        return jnp.broadcast_to(per_dim.sum(), self.mean.shape[:-1])


class Actor(nn.Module):
    """pi(a | s): a torso and a policy head with small init (0.01), so early actions are
    near-uniform."""

    spec: EnvSpec
    hidden_sizes: tuple[int, ...]
    activation: str
    cnn_channels: tuple[int, ...] = ()
    log_std_init: float = 0.0
    matvec: bool = False  # dense layers one row at a time (matvec_rows)

    @nn.compact
    def __call__(self, obs, mask=None):  # obs [B, *obs_shape], mask [B, A] or None
        x = Torso(self.hidden_sizes, self.activation, self.cnn_channels, self.matvec)(obs)
        out = nn.Dense(self.spec.num_actions, kernel_init=orthogonal(0.01),
                       dot_general=matvec_rows if self.matvec else dense_dot_general)(x)
        if self.spec.discrete:
            logits = out if mask is None else jnp.where(mask, out, MASKED_LOGIT)
            return Categorical(logits, mask)
        log_std = self.param("log_std", nn.initializers.constant(self.log_std_init),
                             (self.spec.num_actions,))
        return Gaussian(out, log_std)


class Critic(nn.Module):
    """V(s): a torso and a scalar head with unit-scale init."""

    hidden_sizes: tuple[int, ...]
    activation: str
    cnn_channels: tuple[int, ...] = ()

    @nn.compact
    def __call__(self, obs):  # obs [B, *obs_shape] -> [B]
        x = Torso(self.hidden_sizes, self.activation, self.cnn_channels)(obs)
        return nn.Dense(1, kernel_init=orthogonal(1.0), dot_general=dense_dot_general)(x)[:, 0]


class Agent(NamedTuple):
    """The two networks (static modules; their parameters live in RunnerState.params)."""

    actor: Actor
    critic: Critic
    matvec_rollout: bool = False  # the rollout's actor runs one env at a time (make_agent)

    def policy(self, params, obs, mask=None, rollout: bool = False):
        """pi(. | obs). rollout=True is collect_rollout's call: the same function, computed
        one env at a time when make_agent chose so."""
        actor = self.actor.clone(matvec=True) if rollout and self.matvec_rollout else self.actor
        return actor.apply(params["actor"], obs, mask)

    def value(self, params, obs):
        return self.critic.apply(params["critic"], obs)


# The most envs whose rollout computes its actor one env at a time (matvec_rows). Steps/s
# of the standard config with N envs, against the batched actor (benchmarks/README.md,
# Throughput): N = 4, 1.21x; 8, 1.05 and 1.01x; 16, 0.97 to 1.08x; 32, 1.03x; 64, 0.97x.
MATVEC_MAX_ENVS = 8


def make_agent(config: Config, spec: EnvSpec) -> Agent:
    # One run of a few envs with vector observations, on XLA:CPU (a GPU would run the rows
    # of matvec_rows one after another).
    matvec = (config.num_runs == 1 and config.num_envs <= MATVEC_MAX_ENVS
              and len(spec.obs_shape) == 1 and jax.default_backend() == "cpu")
    return Agent(
        Actor(spec, config.hidden_sizes, config.activation, config.cnn_channels,
              config.log_std_init),
        Critic(config.hidden_sizes, config.activation, config.cnn_channels), matvec)


class Setup(NamedTuple):
    """What a config builds before any array exists: the env, its spec and the agent."""

    env: Any
    env_params: Any
    spec: EnvSpec
    agent: Agent


def make_setup(config: Config) -> Setup:
    env, env_params = make_env(config.env)
    spec = env_spec(env, env_params, config.action_mask)
    return Setup(env, env_params, spec, make_agent(config, spec))


def init_params(agent: Agent, spec: EnvSpec, key) -> dict:
    actor_key, critic_key = jax.random.split(key)
    dummy_obs = jnp.zeros((1, *spec.obs_shape))
    return {"actor": agent.actor.init(actor_key, dummy_obs),
            "critic": agent.critic.init(critic_key, dummy_obs)}


# ── Rollout ───────────────────────────────────────────────────────────────────────────────


class Transition(NamedTuple):
    """One environment step of N envs; the rollout stacks T of them into [T, N, ...]."""

    obs: jax.Array  # [N, *obs_shape] the observation the action was chosen from
    action: jax.Array  # [N] or [N, D]; the unclipped sample, as scored by log_prob
    log_prob: jax.Array  # [N] log pi_old(action | obs)
    reward: jax.Array  # [N]
    terminated: jax.Array  # [N] the episode ended for real: no future value
    truncated: jax.Array  # [N] the clock ran out: the future still has value
    next_obs: jax.Array  # [N, *obs_shape] the true next observation, before auto-reset
    mask: jax.Array | None  # [N, A] legal actions at obs, or None


class EpisodeStats(NamedTuple):
    """Returns and lengths of episodes in progress, per env (undiscounted, raw reward)."""

    returns: jax.Array  # [N]
    lengths: jax.Array  # [N]


class FinishedEpisodes(NamedTuple):
    """Sums over the episodes that ended during a rollout."""

    count: jax.Array
    return_sum: jax.Array
    length_sum: jax.Array


class RunnerState(struct.PyTreeNode):
    """Everything that carries from one update to the next."""

    params: dict
    opt_state: Any
    env_state: Any  # [N] batched gymnax state
    obs: jax.Array  # [N, *obs_shape]
    mask: jax.Array | None  # [N, A] or None
    episodes: EpisodeStats
    norm: Normalizers
    key: jax.Array
    update: jax.Array  # int32 count of updates done: drives the schedules
    probe: jax.Array | None = None  # [P, *obs_shape] fixed observations for --diagnostics


def collect_rollout(env, env_params, spec: EnvSpec, agent: Agent, num_steps: int, gamma,
                    state: RunnerState):
    """The rollout phase: run the current policy for T steps in N envs (one lax.scan).

    Returns the advanced state, the stacked Transitions [T, N, ...], and FinishedEpisodes
    summed over the rollout (only episodes that ended count; none are padded with zeros).
    Transitions hold what the learner sees: normalized observations and scaled rewards when
    normalization is on. Episode returns are always in the env's own reward.
    """

    def env_step(state: RunnerState, _):
        key, action_key, step_key = jax.random.split(state.key, 3)
        obs = normalize(state.norm.obs, state.obs)
        pi = agent.policy(state.params, obs, state.mask, rollout=True)
        action = pi.sample(action_key)
        env_action = action if spec.discrete else jnp.clip(action, spec.action_low,
                                                           spec.action_high)
        step_keys = jax.random.split(step_key, env_action.shape[0])
        next_obs, env_state, reward, terminated, truncated, info = jax.vmap(
            env.step, in_axes=(0, 0, 0, None))(step_keys, state.env_state, env_action,
                                               env_params)
        reward = reward.astype(jnp.float32)
        done = terminated | truncated
        norm = update_normalizers(state.norm, next_obs, reward, done, gamma)
        transition = Transition(obs, action, pi.log_prob(action), scale_reward(norm, reward),
                                terminated, truncated,
                                normalize(norm.obs, info["final_observation"]), state.mask)
        returns = state.episodes.returns + reward
        lengths = state.episodes.lengths + 1
        finished = FinishedEpisodes(jnp.sum(done), jnp.sum(jnp.where(done, returns, 0.0)),
                                    jnp.sum(jnp.where(done, lengths, 0)))
        episodes = EpisodeStats(jnp.where(done, 0.0, returns), jnp.where(done, 0, lengths))
        state = state.replace(env_state=env_state, obs=next_obs, key=key, episodes=episodes,
                              norm=norm, mask=action_masks(env, env_params, spec, env_state))
        return state, (transition, finished)

    state, (transitions, finished) = jax.lax.scan(env_step, state, length=num_steps)
    return state, transitions, jax.tree.map(jnp.sum, finished)


# ── Advantages ────────────────────────────────────────────────────────────────────────────


def compute_gae(rewards, values, next_values, terminated, truncated, gamma, gae_lambda):
    """Generalized Advantage Estimation (Schulman et al. 2016), one reverse lax.scan.

    All inputs are [T, N]; `next_values[t]` is V of the true next observation of step t
    (the final observation when the episode ended there).

        delta_t = r_t + gamma (1 - terminated_t) V(s'_t) - V(s_t)
        A_t     = delta_t + gamma lambda (1 - done_t) A_{t+1},   done_t = terminated_t or truncated_t

    Truncation keeps the bootstrap term (the clock stopped, not the episode), but it still
    cuts the lambda-trace, because row t+1 belongs to a new episode.
    Returns (advantages [T, N], returns [T, N] = advantages + values).
    """
    not_terminated = 1.0 - terminated.astype(jnp.float32)
    not_done = 1.0 - (terminated | truncated).astype(jnp.float32)
    deltas = rewards + gamma * not_terminated * next_values - values

    def gae_step(next_advantage, step):
        delta, not_done_t = step
        advantage = delta + gamma * gae_lambda * not_done_t * next_advantage
        return advantage, advantage

    _, advantages = jax.lax.scan(gae_step, jnp.zeros_like(values[0]), (deltas, not_done),
                                 reverse=True)
    return advantages, advantages + values


class Batch(NamedTuple):
    """Flattened rollout samples for the learning phase ([T * N, ...], or [B, ...])."""

    obs: jax.Array
    action: jax.Array
    log_prob: jax.Array  # log pi_old(a | s)
    value: jax.Array  # V_old(s)
    advantage: jax.Array
    target: jax.Array  # the return the critic regresses to: advantage + V_old(s)
    mask: jax.Array | None


def rollout_to_batch(agent: Agent, params, traj: Transition, gamma, gae_lambda,
                     bootstrap_truncation: bool = True) -> Batch:
    """Score the rollout with the critic, compute advantages, flatten [T, N] to [T * N].

    The critic sees every observation and every true next observation in one batched call
    after the rollout; for steps that did not end an episode, next_obs[t] == obs[t + 1].
    """
    T, N = traj.reward.shape
    obs_shape = traj.obs.shape[2:]
    both = jnp.concatenate([traj.obs, traj.next_obs]).reshape(2 * T * N, *obs_shape)
    values, next_values = agent.value(params, both).reshape(2, T, N)
    terminated = traj.terminated if bootstrap_truncation else traj.terminated | traj.truncated
    advantages, targets = compute_gae(traj.reward, values, next_values, terminated,
                                      traj.truncated, gamma, gae_lambda)
    flat = lambda x: None if x is None else x.reshape(T * N, *x.shape[2:])
    return Batch(flat(traj.obs), flat(traj.action), flat(traj.log_prob), flat(values),
                 flat(advantages), flat(targets), flat(traj.mask))


# ── Loss ──────────────────────────────────────────────────────────────────────────────────


class LossInfo(NamedTuple):
    """Per-minibatch statistics of the loss."""

    total_loss: jax.Array
    policy_loss: jax.Array
    value_loss: jax.Array
    entropy: jax.Array
    approx_kl: jax.Array
    approx_kl_max: jax.Array  # the largest per-sample k3 KL of the minibatch
    clip_fraction: jax.Array
    max_prob: jax.Array  # mean probability of the most likely action (NaN if continuous)
    entropy_normalized: jax.Array  # mean H / log(legal actions) (NaN if continuous)


def ppo_loss(params, agent: Agent, batch: Batch, clip_eps, vf_coef, ent_coef,
             clip_value_loss: bool = False):
    """The PPO objective on one minibatch, as a loss to minimise. Returns (loss, LossInfo).

        ratio  = pi(a|s) / pi_old(a|s)
        L_clip = -E[min(ratio A, clip(ratio, 1 - eps, 1 + eps) A)]     (A normalized per minibatch)
        L_V    = E[(V(s) - R)^2] / 2          (clipped: max of the plain and clipped squares)
        loss   = L_clip + vf_coef L_V - ent_coef H[pi]       (the entropy is a bonus: minus sign)
    """
    pi = agent.policy(params, batch.obs, batch.mask)
    log_ratio = pi.log_prob(batch.action) - batch.log_prob
    ratio = jnp.exp(log_ratio)
    adv = batch.advantage
    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    policy_loss = jnp.maximum(-adv * ratio,
                              -adv * jnp.clip(ratio, 1 - clip_eps, 1 + clip_eps)).mean()

    value = agent.value(params, batch.obs)
    value_loss = jnp.square(value - batch.target)
    if clip_value_loss:
        clipped = batch.value + jnp.clip(value - batch.value, -clip_eps, clip_eps)
        value_loss = jnp.maximum(value_loss, jnp.square(clipped - batch.target))
    value_loss = 0.5 * value_loss.mean()

    entropy = pi.entropy().mean()
    loss = policy_loss + vf_coef * value_loss - ent_coef * entropy
    # k3 estimator of KL(pi_old || pi) (Schulman 2020): unbiased and always >= 0.
    kl = (ratio - 1.0) - log_ratio
    clip_fraction = jnp.mean(jnp.abs(ratio - 1.0) > clip_eps)
    discrete = isinstance(pi, Categorical)
    max_prob = pi.max_prob().mean() if discrete else jnp.nan
    entropy_normalized = pi.normalized_entropy().mean() if discrete else jnp.nan
    return loss, LossInfo(loss, policy_loss, value_loss, entropy, kl.mean(), kl.max(),
                          clip_fraction, max_prob, entropy_normalized)


# ── Update ────────────────────────────────────────────────────────────────────────────────


def make_optimizer(max_grad_norm, optimizer: str = "adam"):
    """Global-norm clipping, then Adam's scaling (eps 1e-5), or nothing more for plain SGD.
    The learning rate is applied in update_minibatch, so it can follow a schedule and be
    traced without rebuilding this."""
    scale = optax.scale_by_adam(eps=1e-5) if optimizer == "adam" else optax.identity()
    return optax.flatten(optax.chain(optax.clip_by_global_norm(max_grad_norm), scale))


class UpdateInfo(NamedTuple):
    """Per-minibatch statistics of one optimizer step."""

    loss: LossInfo
    grad_norm: jax.Array  # global norm before clipping
    clipped: jax.Array  # whether global-norm clipping shrank this step


def pack(stats) -> jax.Array:
    """A NamedTuple of scalars as one float32 vector [K]. A scan then stacks one array per
    step instead of K, and on XLA:CPU each stacked output is a kernel of its own."""
    return jnp.stack([jnp.asarray(x, jnp.float32) for x in jax.tree.leaves(stats)], axis=-1)


# An UpdateInfo's scalars: the LossInfo's fields and the UpdateInfo's others.
PACKED_INFO_SIZE = len(LossInfo._fields) + len(UpdateInfo._fields) - 1


def unpack_update_info(packed) -> UpdateInfo:
    """pack's inverse for an UpdateInfo packed as [..., K]: each field [...]."""
    fields = list(jnp.moveaxis(packed, -1, 0))
    losses = len(LossInfo._fields)
    return UpdateInfo(LossInfo(*fields[:losses]), *fields[losses:])


def update_minibatch(agent: Agent, hp: HParams, config: Config, ent_coef, lr, train: tuple,
                     batch: Batch):
    """One optimizer step on one minibatch. `train` is (params, opt_state)."""
    params, opt_state = train
    grads, info = jax.grad(ppo_loss, has_aux=True)(
        params, agent, batch, hp.clip_eps, hp.vf_coef, ent_coef, config.clip_value_loss)
    optimizer = make_optimizer(hp.max_grad_norm, config.optimizer)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, jax.tree.map(lambda u: -lr * u, updates))
    # Over the flat vector that optax.flatten clips, so XLA computes the norm once.
    grad_norm = jnp.linalg.norm(jax.flatten_util.ravel_pytree(grads)[0])
    return (params, opt_state), UpdateInfo(info, grad_norm, grad_norm > hp.max_grad_norm)


def random_permutation(key, n: int):
    """jax.random.permutation(key, n): the same indices [n], found faster on CPU.

    jax sorts n random 32-bit keys paired with their indices, and XLA:CPU sorts pairs by
    calling a comparator per comparison: 57 us for n = 512, and the standard config's four
    shuffles took a twelfth of its update. A lone uint32 array sorts 4x faster, and
    stable_argsort finds the same order with two such sorts: 27 us."""
    order = jnp.arange(n)
    for _ in range(int(np.ceil(3 * np.log(max(1, n)) / np.log(2**32 - 1)))):  # jax's rounds
        key, round_key = jax.random.split(key)
        order = order[stable_argsort(jax.random.bits(round_key, (n,), jnp.uint32))]
    return order


def stable_argsort(keys):
    """The indices that sort uint32 keys [n], ties in index order, by radix passes from the
    least significant bits. Each pass sorts one uint32 array: a digit of 32 - b bits of the
    keys above the b = ceil(log2 n) bits of each key's current position, which breaks ties
    by that position (so the pass is stable) and is read back from the low bits."""
    n = keys.shape[0]
    b = max(1, math.ceil(math.log2(n)))
    position = jnp.arange(n, dtype=jnp.uint32)
    order = position
    for low in range(0, 32, 32 - b):
        digit = (keys[order] >> low) & np.uint32((1 << min(32 - b, 32 - low)) - 1)
        order = order[jnp.sort((digit << b) | position) & np.uint32((1 << b) - 1)]
    return order


def update_epoch(agent: Agent, hp: HParams, config: Config, ent_coef, lr, train: tuple,
                 batch: Batch, key):
    """One pass over the rollout in shuffled minibatches (a lax.scan over minibatches).
    Returns the new (params, opt_state) and the packed UpdateInfo of each minibatch [M, K]."""
    permutation = random_permutation(key, config.batch_size)
    minibatches = jax.tree.map(
        lambda x: x[permutation].reshape(config.num_minibatches, config.minibatch_size,
                                         *x.shape[1:]), batch)

    def minibatch_step(train, minibatch):
        train, info = update_minibatch(agent, hp, config, ent_coef, lr, train, minibatch)
        return train, pack(info)

    return jax.lax.scan(minibatch_step, train, minibatches)


def update(agent: Agent, hp: HParams, config: Config, ent_coef, lr, train: tuple,
           batch: Batch, key):
    """The learning phase: update_epochs passes over the batch (a lax.scan over epochs).

    With target_kl set, once an epoch's mean approx KL exceeds it, the remaining epochs are
    skipped (lax.cond, so it works under jit). Returns the new (params, opt_state), the
    UpdateInfo [epochs, minibatches] and a [epochs] flag of the epochs that ran.
    """
    epoch = functools.partial(update_epoch, agent, hp, config, ent_coef, lr)
    if config.target_kl is None:
        train, infos = jax.lax.scan(lambda t, k: epoch(t, batch, k), train,
                                    jax.random.split(key, config.update_epochs))
        return train, unpack_update_info(infos), jnp.ones(config.update_epochs, bool)

    no_info = jnp.zeros((config.num_minibatches, PACKED_INFO_SIZE))

    def epoch_step(carry, epoch_key):
        train, stopped = carry
        train, info = jax.lax.cond(stopped, lambda t: (t, no_info),
                                   lambda t: epoch(t, batch, epoch_key), train)
        ran = ~stopped
        stopped = stopped | (unpack_update_info(info).loss.approx_kl.mean() > hp.target_kl)
        return (train, stopped), (info, ran)

    (train, _), (infos, ran) = jax.lax.scan(epoch_step, (train, jnp.array(False)),
                                            jax.random.split(key, config.update_epochs))
    return train, unpack_update_info(infos), ran


# ── Train ─────────────────────────────────────────────────────────────────────────────────


def schedules(config: Config, hp: HParams, update_index):
    """Linear schedules over updates: (learning rate, entropy coefficient) at this update."""
    frac = update_index / config.num_updates  # 0 at the first update
    lr = hp.learning_rate * (1.0 - frac) if config.anneal_lr else hp.learning_rate
    decay = update_index / max(config.num_updates - 1, 1)  # reaches 1 at the last update
    ent_coef = hp.ent_coef + (hp.ent_coef_final - hp.ent_coef) * decay
    return lr, ent_coef


def init_runner_state(config: Config, env, env_params, spec: EnvSpec, agent: Agent, hp: HParams,
                      key) -> RunnerState:
    params_key, env_key, key = jax.random.split(key, 3)
    params = init_params(agent, spec, params_key)
    obs, env_state, mask = reset_envs(env, env_params, spec, env_key, config.num_envs)
    zeros = jnp.zeros(config.num_envs)
    probe = (jnp.zeros((min(PROBE_SIZE, config.batch_size), *spec.obs_shape))
             if config.diagnostics else None)  # filled from the first rollout
    opt_state = make_optimizer(hp.max_grad_norm, config.optimizer).init(params)
    return RunnerState(params, opt_state, env_state, obs, mask,
                       EpisodeStats(zeros, zeros.astype(jnp.int32)), init_normalizers(config, obs),
                       key, jnp.array(0, jnp.int32), probe)


def update_step(config: Config, env, env_params, spec: EnvSpec, agent: Agent, hp: HParams,
                state: RunnerState):
    """One PPO iteration: a rollout, advantages, then the learning phase.

    Returns the new RunnerState and this update's metrics (scalars)."""
    state, traj, finished = collect_rollout(env, env_params, spec, agent, config.num_steps,
                                            hp.gamma, state)
    batch = rollout_to_batch(agent, state.params, traj, hp.gamma, hp.gae_lambda,
                             config.bootstrap_truncation)
    lr, ent_coef = schedules(config, hp, state.update)
    key, update_key = jax.random.split(state.key)
    params_before = state.params
    (params, opt_state), infos, ran = update(agent, hp, config, ent_coef, lr,
                                             (state.params, state.opt_state), batch, update_key)
    state = state.replace(params=params, opt_state=opt_state, key=key, update=state.update + 1)
    metrics = summarize_update(spec, finished, batch, infos, ran, params_before, state.params,
                               lr, ent_coef)
    if config.diagnostics:
        probe = jnp.where(state.update == 1, subsample(batch.obs, PROBE_SIZE), state.probe)
        state = state.replace(probe=probe)
        first = jax.tree.map(lambda x: x[:config.minibatch_size], batch)

        def occasional():  # every OCCASIONAL_EVERY updates, starting with the first
            return {**loss_term_grad_norms(agent, params_before, first, hp, ent_coef,
                                           config.clip_value_loss),
                    **representation_diagnostics(agent, state.params, probe, config.activation)}

        nan = {k: jnp.full(v.shape, jnp.nan, v.dtype)
               for k, v in jax.eval_shape(occasional).items()}
        metrics.update(jax.lax.cond(state.update % OCCASIONAL_EVERY == 1, occasional,
                                    lambda: nan))
        if spec.discrete:
            metrics.update(exploration_split(agent, params_before, batch))
    return state, metrics


def summarize_update(spec: EnvSpec, finished: FinishedEpisodes, batch: Batch,
                     infos: UpdateInfo, ran, params_before, params_after, lr, ent_coef) -> dict:
    """One update's metrics, each a scalar: losses and statistics averaged over every
    minibatch of the epochs that ran (never the last sample), plus diagnostics of the
    rollout batch and of how far the optimizer moved each network."""
    weights = jnp.broadcast_to(ran[:, None], infos.grad_norm.shape) / (
        ran.sum() * infos.grad_norm.shape[1])
    means = unpack_update_info(jnp.tensordot(weights, pack(infos), axes=2))  # one contraction
    episodes = jnp.maximum(finished.count, 1)
    metrics = {
        "episode_return": jnp.where(finished.count > 0, finished.return_sum / episodes, jnp.nan),
        "episode_length": jnp.where(finished.count > 0, finished.length_sum / episodes, jnp.nan),
        "episodes_finished": finished.count,
        "policy_loss": means.loss.policy_loss,
        "value_loss": means.loss.value_loss,
        "entropy": means.loss.entropy,
        "approx_kl": means.loss.approx_kl,
        "approx_kl_max": jnp.max(jnp.where(ran[:, None], infos.loss.approx_kl_max, 0.0)),
        "clip_fraction": means.loss.clip_fraction,
        "explained_variance": 1.0 - jnp.var(batch.target - batch.value) / jnp.var(batch.target),
        "value_rmse": jnp.sqrt(jnp.mean(jnp.square(batch.value - batch.target))),
        "advantage_mean": batch.advantage.mean(),  # before per-minibatch normalization
        "advantage_std": batch.advantage.std(),
        "grad_norm": means.grad_norm,
        "grad_clip_fraction": means.clipped,
        "learning_rate": lr,
        "ent_coef": ent_coef,
        "epochs_run": ran.sum(),
    }
    if spec.discrete:
        metrics.update(max_prob=means.loss.max_prob,
                       entropy_normalized=means.loss.entropy_normalized)
    for net in ("actor", "critic"):  # what the optimizer actually did to each network
        # As one vector per network: a norm over the leaves one by one costs a kernel each.
        before, after = (jax.flatten_util.ravel_pytree(p[net])[0]
                         for p in (params_before, params_after))
        step = jnp.linalg.norm(after - before)
        metrics.update({f"{net}_update_norm": step,
                        f"{net}_update_ratio": step / jnp.linalg.norm(before),
                        f"{net}_param_norm": jnp.linalg.norm(after)})
    return metrics


# ── Costlier diagnostics (--diagnostics) ──────────────────────────────────────────────────
# Each looks at a slice of the update (bench.py diagnostics measures their cost);
# --no-diagnostics removes them from the program.
PROBE_SIZE = 128  # observations of the fixed probe batch
# Per-term gradients and the probe batch are looked at every OCCASIONAL_EVERY updates (NaN
# in between). Measured at the standard config: with them every update the diagnostics
# cost 17 % of run time, this way 15 %.
OCCASIONAL_EVERY = 10
EXPLORE_SAMPLES = 32  # samples whose policy gradients are taken one by one
DORMANT_TAU = 0.025  # Sokar et al. 2023: a unit whose normalized activity is <= tau is dormant
SATURATED = 0.99  # a tanh output beyond +-0.99 passes almost no gradient


def subsample(x, n: int):
    """n rows of x spread evenly over it (rollout order is time-major: spread over time)."""
    return x[jnp.arange(min(n, x.shape[0])) * (x.shape[0] // min(n, x.shape[0]))]


def loss_term_grad_norms(agent: Agent, params, minibatch: Batch, hp: HParams, ent_coef,
                         clip_value_loss: bool) -> dict:
    """The gradient norm of each loss term, weighted as in the loss (policy, vf_coef x value,
    ent_coef x entropy), on the network it moves: measured on the update's first
    minibatch, at the parameters the update started from."""
    def terms(p):
        info = ppo_loss(p, agent, minibatch, hp.clip_eps, hp.vf_coef, ent_coef,
                        clip_value_loss)[1]
        return {"policy": info.policy_loss, "value": hp.vf_coef * info.value_loss,
                "entropy": ent_coef * info.entropy}

    grads = jax.jacrev(terms)(params)  # {term: grads of the term, like params}
    # Actor and critic share no parameters, so the value term reaches only the critic and
    # the other two only the actor: the three other pairs are zero by construction.
    return {"grad_norm_policy_actor": optax.tree.norm(grads["policy"]["actor"]),
            "grad_norm_entropy_actor": optax.tree.norm(grads["entropy"]["actor"]),
            "grad_norm_value_critic": optax.tree.norm(grads["value"]["critic"])}


def exploration_split(agent: Agent, params, batch: Batch, n: int = EXPLORE_SAMPLES) -> dict:
    """Do exploiting samples move the policy less? Per-sample policy-gradient norms
    |A| ||grad log pi(a|s)|| on n samples, averaged separately over those whose action was
    the greedy (most likely) one and those whose action was not; and the count of each."""
    sample = jax.tree.map(lambda x: subsample(x, n), batch)
    advantage = (sample.advantage - batch.advantage.mean()) / (batch.advantage.std() + 1e-8)

    def sample_loss(actor_params, obs, action, adv, mask):
        mask = None if mask is None else mask[None]
        pi = agent.actor.apply(actor_params, obs[None], mask)
        return -adv * pi.log_prob(action[None])[0]

    grads = jax.vmap(jax.grad(sample_loss), in_axes=(None, 0, 0, 0, 0))(
        params["actor"], sample.obs, sample.action, advantage, sample.mask)
    norms = jnp.sqrt(sum(jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1)
                         for g in jax.tree.leaves(grads)))  # [n]
    greedy = sample.action == agent.policy(params, sample.obs, sample.mask).mode()
    group_mean = lambda chosen: jnp.sum(jnp.where(chosen, norms, 0.0)) / jnp.where(
        chosen.any(), chosen.sum(), jnp.nan)
    return {"pg_norm_greedy": group_mean(greedy), "pg_norm_explore": group_mean(~greedy),
            "greedy_count": greedy.sum(), "explore_count": (~greedy).sum()}


def representation_diagnostics(agent: Agent, params, probe, activation: str) -> dict:
    """On the fixed probe batch, for each network's hidden layers: the dormant-unit fraction
    (ReLU; Sokar et al. 2023) or the saturated-activation fraction (tanh), and the feature
    effective rank of the last hidden layer as a participation ratio (tr C)^2 / tr(C^2) of
    its feature covariance C: between 1 (one direction) and the layer's width. It needs no
    eigendecomposition, so no LAPACK call (see the test that bans them)."""
    metrics = {}
    for net, module in (("actor", agent.actor), ("critic", agent.critic)):
        _, captured = module.apply(params[net], probe, mutable=["intermediates"])
        layers = jax.tree.leaves(captured)  # each [P, width], in order
        if activation == "relu":
            activity = [jnp.abs(h).mean(axis=0) for h in layers]  # [width] per layer
            dormant = [a / (a.mean() + 1e-9) <= DORMANT_TAU for a in activity]
            metrics[f"{net}_dormant_fraction"] = jnp.concatenate(dormant).mean()
        else:
            saturated = jnp.concatenate([(jnp.abs(h) > SATURATED).ravel() for h in layers])
            metrics[f"{net}_saturated_fraction"] = saturated.mean()
        features = layers[-1] - layers[-1].mean(axis=0)
        cov = features.T @ features / features.shape[0]
        metrics[f"{net}_feature_rank"] = jnp.trace(cov) ** 2 / (jnp.sum(cov**2) + 1e-12)
    return metrics


# ── Training loop ─────────────────────────────────────────────────────────────────────────


def make_train(config: Config):
    """Build train(key, hparams=None) -> (RunnerState, metrics) for one seed.

    `train` is pure: jit it, vmap it over keys (seeds) and over HParams (a grid). `metrics`
    maps each name to an array [U]: one value per update, so memory is O(U).
    """
    validate_config(config)
    env, env_params, spec, agent = make_setup(config)

    def train(key, hparams: HParams | None = None):
        hp = config.hparams() if hparams is None else hparams
        state = init_runner_state(config, env, env_params, spec, agent, hp, key)
        step = functools.partial(update_step, config, env, env_params, spec, agent, hp)
        return jax.lax.scan(lambda s, _: step(s), state, length=config.num_updates)

    return train


KEY_IMPL = "philox4x32"


def make_key(seed: int):
    """A Philox key. On CPU, threefry's hash runs as a rolled 5-iteration loop per call;
    Philox's compiles to a few fused ops, which made the rollout 1.5x faster here. Both are
    exact under vmap, so seed i trains the same alone or batched."""
    return jax.random.key(seed, impl=KEY_IMPL)


def seed_keys(config: Config):
    """The key of each run: [num_runs]. Every setting of a sweep gets the same num_seeds
    keys, so settings are compared on the same seeds."""
    return split_seed(config.seed, config.num_seeds, config.num_runs)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def split_seed(seed: int, num_seeds: int, num_runs: int):
    """seed_keys as one program: op by op, its nine small programs took 0.5 s to compile at
    every start, this one 0.18 s (the same keys)."""
    keys = jax.random.split(make_key(seed), num_seeds)
    return keys[np.arange(num_runs) % num_seeds]


def xla_cpu_threads() -> int:
    """How many threads XLA:CPU runs a program on: PJRT_NPROC if set (read when JAX starts;
    see set_cpu_threads), else one per core this process may use."""
    with contextlib.suppress(KeyError, ValueError):
        return int(os.environ["PJRT_NPROC"])
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def cpu_compile_options(runs_once: bool = False) -> dict | None:
    """XLA:CPU settings for init (runs_once) and run; measured in benchmarks/README.md.

    - The fast-compile preset: 11 % less compile time for the CartPole preset (3.6 against
      4.0 s), no slower to run; compile time is most of a short run's wall time.
    - runs_once (init): also XLA:CPU's MLIR fusion emitters off. On the CartPole preset's
      init, 4 fresh processes each: 3.25 -> 2.77 s to compile, peak RSS 405 -> 315 MB, and
      the same initial state, bitwise. `run` keeps them: without, the CartPole preset
      trained at 42-49k steps/s against 88-90k.
    - `run` on one XLA thread: copy insertion with region analysis. XLA then copies less of
      the loop state at every step of the rollout scan (63 -> 53 kernels a step at the
      standard config): 6.5 % more steps/s at the standard config, 8 % on the CartPole
      preset, the same numbers bitwise. On two threads it cost 7 % at 256 envs.
    - `run` on a CPU with AVX-512: XLA's own kernels (tanh, Adam, the env) vectorized
      512 bits wide instead of XLA's default of 256. On the Zen 4, interleaved: 2.8 % more
      steps/s at the standard config, 1.2 % on the CartPole preset, 2.5 % with 8 vmapped
      seeds. Set only where the CPU has AVX-512; measured on the Zen 4 alone."""
    if jax.default_backend() != "cpu":
        return None
    options = {"xla_cpu_opt_preset": "CPU_OPT_PRESET_FAST_COMPILE"}
    if runs_once:
        options["xla_cpu_use_fusion_emitters"] = False
        return options
    if xla_cpu_threads() == 1:
        options["xla_cpu_copy_insertion_use_region_analysis"] = True
    if cpu_has_avx512():
        options["xla_cpu_prefer_vector_width"] = 512
    return options


@functools.cache
def cpu_has_avx512() -> bool:
    """Whether this machine's CPU has AVX-512 (Linux's /proc/cpuinfo; False where unknown)."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        return any(line.startswith("flags") and " avx512f" in line for line in f)
    return False


# What stopped the training loop before its last update (Loop.stop).
RUNNING, STOPPED, NONFINITE = 0, 1, 2
# Metrics that must stay finite; a NaN or inf in any of them, or in the parameters, stops
# training and keeps the last good state.
GUARDED = ("policy_loss", "value_loss", "entropy", "approx_kl", "grad_norm")


class Loop(struct.PyTreeNode):
    """The state of a whole training run of S seeds: what a checkpoint holds."""

    runner: RunnerState  # [S] one RunnerState per seed; runner.update counts finished updates
    history: dict  # {metric: [U, S]}; rows beyond the finished updates are zeros
    stop: jax.Array  # int32: RUNNING, STOPPED (the host asked) or NONFINITE
    bad_metric: jax.Array  # int32 index into GUARDED + ("parameters",) when stop == NONFINITE

    @property
    def updates_done(self) -> int:
        return int(np.asarray(self.runner.update)[0])  # on the host: no program to compile

    def metrics(self) -> dict:
        """{metric: [S, updates done]} as NumPy arrays."""
        done = self.updates_done
        return {k: np.asarray(v)[:done].T for k, v in self.history.items()}


def report_to_host(on_report, done, episode_return):
    """make_runner's progress call: on_report(updates done, episode_return [S]) -> (the next
    update to report at, whether to stop)."""
    result = (jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((), bool))
    return io_callback(on_report, result, done, episode_return)


class Runner(NamedTuple):
    """Two jitted programs: init(keys, hparams=None) -> Loop, and run(loop, hparams=None) ->
    Loop, which trains until the last update or a stop. A resumed run calls the same `run`
    on a loaded Loop, so it computes bitwise what the uninterrupted run would have."""

    init: Any
    run: Any


def make_runner(config: Config, on_report=None, on_checkpoint=None) -> Runner:
    """Build the training loop that the command line uses: S seeds, or S hyperparameter
    settings, side by side in one jit (keys [S]; HParams fields are scalars or [S]).

    The loop over updates is a lax.while_loop outside the vmap over seeds, so host calls come
    once for all seeds. These are the file's only host calls, both through io_callback:
      on_report(updates_done, episode_return [S]) -> (next update to report at, stop?)
        lets the host show progress a few times a second and ask the loop to stop (Ctrl-C);
      on_checkpoint(loop) every config.save_every updates.
    With neither, the program has no host call, and JAX's persistent cache can keep it; with
    either, cache_programs_with_host_calls lets it.
    """
    validate_config(config)
    env, env_params, spec, agent = make_setup(config)
    axes = lambda hp: HParams(*(0 if jnp.ndim(v) else None for v in hp))

    def evaluate_seeds(runner: RunnerState, done):
        """Mean deterministic and stochastic return of each seed's current policy: 2 x [S]."""
        keys = jax.random.split(jax.random.fold_in(make_key(config.seed), done),
                                config.num_runs)
        returns = evaluate_runs(Setup(env, env_params, spec, agent), runner, keys,
                                config.eval_episodes)
        return tuple(r.mean(axis=-1) for r in returns)

    @jax.jit  # traced once per process: init's eval_shape and run's loop share the trace
    def one_update(hp, runner):
        """update_step for every seed, plus an evaluation when --eval-every says so."""
        step = functools.partial(update_step, config, env, env_params, spec, agent)
        # The update counter is the same for every seed. Passed unbatched, conditions on it
        # (the occasional diagnostics) stay branches, not selects.
        runner = runner.replace(update=runner.update[0])
        if config.num_runs == 1:
            # A vmap over one run still batches every matmul: measured at the standard
            # config, make_train trained 111k steps/s vmapped over one key, 124k without.
            first = lambda tree: jax.tree.map(lambda x: x[0], tree)
            alone = first(runner.replace(update=None)).replace(update=runner.update)
            runner, metrics = step(HParams(*(v[0] if jnp.ndim(v) else v for v in hp)), alone)
            runner, metrics = jax.tree.map(lambda x: x[None], (runner, metrics))
        else:
            runner_axes = jax.tree.map(lambda _: 0, runner).replace(update=None)
            runner, metrics = jax.vmap(step, in_axes=(axes(hp), runner_axes))(hp, runner)
        if config.eval_every:
            done = runner.update[0]
            due = (done % config.eval_every == 0) | (done == config.num_updates)
            nan = jnp.full(config.num_runs, jnp.nan)
            evals = jax.lax.cond(due, lambda: evaluate_seeds(runner, done), lambda: (nan, nan))
            metrics.update(eval_return=evals[0], eval_return_stochastic=evals[1])
        return runner, metrics

    @functools.partial(jax.jit, compiler_options=cpu_compile_options(runs_once=True))
    def init(keys, hparams: HParams | None = None) -> Loop:
        hp = config.hparams() if hparams is None else hparams
        init_one = functools.partial(init_runner_state, config, env, env_params, spec, agent)
        runner = jax.vmap(init_one, in_axes=(axes(hp), 0))(hp, keys)
        # Strong dtypes throughout (gymnax's time counters start weakly typed), as a loaded
        # checkpoint has them: a fresh and a resumed Loop then share one compiled `run`, and
        # `run` reuses the trace of one_update made here.
        runner = jax.tree.map(lambda x: jax.lax.convert_element_type(x, x.dtype), runner)
        rows = jax.eval_shape(one_update, hp, runner)[1]
        history = {k: jnp.zeros((config.num_updates, *v.shape), v.dtype) for k, v in rows.items()}
        return Loop(runner, history, jnp.int32(RUNNING), jnp.int32(-1))

    def loop_body(hp, carry):
        loop, next_report = carry
        done = loop.runner.update[0] + 1
        runner, metrics = one_update(hp, loop.runner)
        # A parameter norm is finite exactly when every parameter is (or one passed 1e19,
        # which is as broken): one check per network instead of one per leaf.
        finite = jnp.stack([jnp.isfinite(metrics[k]).all() for k in GUARDED]
                           + [jnp.isfinite(metrics["actor_param_norm"]).all()
                              & jnp.isfinite(metrics["critic_param_norm"]).all()])
        ok = finite.all()
        # A non-finite update is not kept: the loop ends on the last good state. One branch,
        # not a select per leaf: 24 fewer fusions to compile in the CartPole preset's run.
        runner = jax.lax.cond(ok, lambda: runner, lambda: loop.runner)
        loop = loop.replace(
            runner=runner,
            history={k: h.at[done - 1].set(metrics[k]) for k, h in loop.history.items()},
            stop=jnp.where(ok, loop.stop, NONFINITE),
            bad_metric=jnp.where(ok, loop.bad_metric, jnp.argmin(finite)))
        if on_checkpoint is not None and config.save_every:
            due = ok & (done % config.save_every == 0) & (done < config.num_updates)
            jax.lax.cond(due, lambda: io_callback(on_checkpoint, None, keys_to_data(loop)),
                         lambda: None)
        if on_report is not None:
            report = lambda: report_to_host(on_report, done, metrics["episode_return"])
            next_report, stop = jax.lax.cond(
                (done >= next_report) | (done == config.num_updates) | ~ok, report,
                lambda: (next_report, jnp.array(False)))
            loop = loop.replace(stop=jnp.where(stop & ok, STOPPED, loop.stop))
        return loop, next_report

    def keep_going(carry):
        loop, _ = carry
        return (loop.runner.update[0] < config.num_updates) & (loop.stop == RUNNING)

    @functools.partial(jax.jit, compiler_options=cpu_compile_options())
    def run(loop: Loop, hparams: HParams | None = None) -> Loop:
        hp = config.hparams() if hparams is None else hparams
        carry = (loop.replace(stop=jnp.int32(RUNNING)), jnp.int32(1))
        return jax.lax.while_loop(keep_going, functools.partial(loop_body, hp), carry)[0]

    return Runner(init, run)


# ── Evaluation ────────────────────────────────────────────────────────────────────────────


class EvalState(NamedTuple):
    """The carry of evaluate's loop over steps."""

    t: jax.Array
    obs: jax.Array  # [E, *obs_shape]
    env_state: Any
    mask: jax.Array | None
    returns: jax.Array  # [E] reward summed until each episode's first end
    running: jax.Array  # [E] bool: the episode has not ended yet


def evaluate(env, env_params, spec: EnvSpec, agent: Agent, params, obs_stats, key,
             num_episodes: int, deterministic: bool):
    """Return [E] of E fresh episodes, run side by side until each one's first end (or the
    env's max_steps_in_episode; 1000 for an env without one).

    Deterministic picks the most likely action (the Gaussian's mean); stochastic samples.
    Observations are normalized with the frozen training statistics `obs_stats` (or None).
    """
    max_steps = int(getattr(env_params, "max_steps_in_episode", 1000))
    reset_key, key = jax.random.split(key)
    obs, env_state, mask = reset_envs(env, env_params, spec, reset_key, num_episodes)

    def eval_step(s: EvalState) -> EvalState:
        action_key, step_key = jax.random.split(jax.random.fold_in(key, s.t))
        pi = agent.policy(params, normalize(obs_stats, s.obs), s.mask)
        action = pi.mode() if deterministic else pi.sample(action_key)
        if not spec.discrete:
            action = jnp.clip(action, spec.action_low, spec.action_high)
        obs, env_state, reward, terminated, truncated, _ = jax.vmap(
            env.step, in_axes=(0, 0, 0, None))(jax.random.split(step_key, num_episodes),
                                               s.env_state, action, env_params)
        return EvalState(s.t + 1, obs, env_state, action_masks(env, env_params, spec, env_state),
                         s.returns + jnp.where(s.running, reward, 0.0),
                         s.running & ~(terminated | truncated))

    # Stop once every episode has ended: most end long before the time limit.
    start = EvalState(jnp.int32(0), obs, env_state, mask, jnp.zeros(num_episodes),
                      jnp.ones(num_episodes, bool))
    end = jax.lax.while_loop(lambda s: (s.t < max_steps) & s.running.any(), eval_step, start)
    return end.returns


def evaluate_runs(setup: Setup, runner: RunnerState, keys, num_episodes: int):
    """Returns of every run's deterministic and stochastic policy: two [S, E] arrays."""
    run = lambda deterministic: jax.vmap(lambda params, stats, key: evaluate(
        *setup, params, stats, key, num_episodes, deterministic))(
            runner.params, runner.norm.obs, keys)
    return run(True), run(False)


def policy_of(loop: Loop, run: int):
    """Run `run`'s parameters and frozen observation statistics (None without them)."""
    return jax.tree.map(lambda x: x[run], (loop.runner.params, loop.runner.norm.obs))


def load_run(run_dir: str) -> tuple[Config, Loop]:
    """A run folder's config and its last checkpoint."""
    config = read_config(run_dir)
    template = jax.eval_shape(make_runner(config).init, seed_keys(config))
    return config, load_checkpoint(config, run_dir, template)


def load_policy(run_dir: str, seed: int = 0, deterministic: bool = False):
    """A trained policy as a plain function, NumPy observation -> action, for any loop
    (e.g. Gymnasium's): `act = load_policy("runs/x"); obs, *_ = env.step(act(obs))`.

    It applies the run's frozen observation normalization, clips continuous actions to
    the env's bounds, and accepts an optional legal-action `mask` for masked envs.
    """
    config, loop = load_run(run_dir)
    if not 0 <= seed < config.num_runs:
        raise ConfigError(f"seed {seed} is not in {run_dir}, which trained runs 0 to "
                          f"{config.num_runs - 1}")
    _, _, spec, agent = make_setup(config)
    params, obs_stats = policy_of(loop, seed)

    @jax.jit
    def act(obs, mask, key):
        pi = agent.policy(params, normalize(obs_stats, obs[None]), mask)
        action = (pi.mode() if deterministic else pi.sample(key))[0]
        return action if spec.discrete else jnp.clip(action, spec.action_low, spec.action_high)

    key, calls = make_key(seed), itertools.count()

    def policy(obs, mask=None):
        mask = None if mask is None else jnp.asarray(mask, bool)[None]
        step_key = jax.random.fold_in(key, next(calls))
        action = np.asarray(act(jnp.asarray(obs, jnp.float32), mask, step_key))
        return int(action) if spec.discrete else action

    return policy


MAX_FRAMES = 150


# The envs gymnax's Visualizer draws (it leaves the others blank).
RENDERABLE = ("CartPole-v1", "Acrobot-v1", "Pendulum-v1", "MountainCar-v0",
              "MountainCarContinuous-v0", "Asterix-MinAtar", "Breakout-MinAtar",
              "Freeway-MinAtar", "Seaquest-MinAtar", "SpaceInvaders-MinAtar", "Catch-bsuite",
              "Pong-misc", "PointRobot-misc", "MetaMaze-misc", "FourRooms-misc")


def check_renderable(env_id: str) -> None:
    if env_id not in RENDERABLE:
        raise ConfigError(f"gymnax cannot draw {env_id}; --render supports "
                          f"{', '.join(RENDERABLE)}")


def render_episode(config: Config, loop: Loop, path: str, seed: int = 0, key=None) -> float:
    """Save a GIF of one deterministic episode of trained seed `seed`'s policy through
    gymnax's Visualizer (classic control, MinAtar and a few others), on episode key `key`
    (default: make_key(0)). Returns the episode's return."""
    check_renderable(config.env)
    env, env_params, spec, agent = make_setup(config)
    params, obs_stats = policy_of(loop, seed)
    max_steps = int(getattr(env_params, "max_steps_in_episode", 1000))

    @jax.jit
    def episode(key):
        reset_key, key = jax.random.split(key)
        obs, env_state = env.reset(reset_key, env_params)

        def step(carry, step_key):
            obs, env_state = carry
            mask = None if not spec.masked else env.action_mask(env_state, env_params)[None]
            action = agent.policy(params, normalize(obs_stats, obs[None]), mask).mode()[0]
            if not spec.discrete:
                action = jnp.clip(action, spec.action_low, spec.action_high)
            next_obs, next_state, reward, terminated, truncated, _ = env.step(
                step_key, env_state, action, env_params)
            return (next_obs, next_state), (env_state, reward, terminated | truncated)

        return jax.lax.scan(step, (obs, env_state), jax.random.split(key, max_steps))[1]

    states, rewards, done = jax.device_get(episode(make_key(0) if key is None else key))
    length = int(np.argmax(done)) + 1 if done.any() else len(done)
    # Drawing a frame takes ~0.2 s: keep at most MAX_FRAMES, evenly spaced over the episode.
    shown = np.unique(np.linspace(0, length - 1, min(length, MAX_FRAMES)).astype(int))
    frames = [jax.tree.map(lambda x: x[t], states) for t in shown]
    for device in ("SDL_AUDIODRIVER", "SDL_VIDEODRIVER"):  # pygame draws off-screen, silently
        os.environ.setdefault(device, "dummy")
    import matplotlib

    matplotlib.use("Agg")
    from gymnax.visualize import Visualizer

    tmp = f"{path}.tmp{os.getpid()}.gif"
    try:
        Visualizer(env, env_params, frames, np.cumsum(rewards)[shown]).animate(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return float(rewards[:length].sum())


# ── Progress, outputs and checkpoints ─────────────────────────────────────────────────────


class Progress:
    """The host end of make_runner's on_report: the live progress bar, and the way Ctrl-C
    reaches the jitted loop (a stop request, answered at the next report).

    The bar opens at the first report, after compiling, so its rate is the training speed.
    """

    REPORTS_PER_SECOND = 4

    def __init__(self, config: Config, show: bool = True):
        self.config, self.show = config, show
        self.bar = None
        self.last_update = 0  # a resumed run starts at its checkpoint's update
        self.stop_requested = False

    def __call__(self, update, episode_return):
        from tqdm import tqdm

        update, now = int(update), time.perf_counter()
        if self.bar is None:
            runs = self.config.num_runs
            label = self.config.env + (f" x{runs}" if runs > 1 else "")
            self.bar = tqdm(total=self.config.num_updates * self.config.batch_size, unit="step",
                            initial=self.last_update * self.config.batch_size, unit_scale=True,
                            dynamic_ncols=True, file=sys.stderr, desc=label, disable=not self.show)
            self.last_time, self.step = now, 1
        returns = np.asarray(episode_return)
        if np.isfinite(returns).any():
            spread = f" (min {np.nanmin(returns):.1f})" if returns.size > 1 else ""
            self.bar.set_postfix_str(f"return {np.nanmean(returns):.1f}{spread}", refresh=False)
        self.bar.update((update - self.last_update) * self.config.batch_size)
        # Ask to be called again after about 1/REPORTS_PER_SECOND seconds of training. The
        # step at most doubles per report: the first reports come microseconds apart, and a
        # rate measured over them would overshoot to the end of training.
        rate = (update - self.last_update) / max(now - self.last_time, 1e-9)
        self.step = max(1, min(int(rate / self.REPORTS_PER_SECOND), 2 * self.step))
        self.last_update, self.last_time = update, now
        return (np.int32(min(update + self.step, self.config.num_updates)),
                np.bool_(self.stop_requested))

    def close(self):
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def ctrl_c_not_lost():
    """Ctrl-C raises KeyboardInterrupt wherever the main thread is, and inside a garbage
    collector callback (JAX registers one, and tracing collects often) Python prints it as
    "Exception ignored" with a traceback, and drops it: the run went on to train. Here each
    Ctrl-C is also noted, a dropped one is not printed, and it is raised again when the
    block ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed = []

    def handler(signum, frame):
        pressed.append(signum)
        raise KeyboardInterrupt

    def unraisable(dropped):
        if not issubclass(dropped.exc_type, KeyboardInterrupt):
            previous_hook(dropped)

    previous, previous_hook = signal.signal(signal.SIGINT, handler), sys.unraisablehook
    sys.unraisablehook = unraisable
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = previous_hook
    if pressed:  # reached only if no KeyboardInterrupt left the block
        raise KeyboardInterrupt


def run_stoppable(progress: Progress | None, fn):
    """fn(), where the first Ctrl-C asks the training loop to stop after the current update
    (it is then checkpointed) and a second one aborts at once.

    Python runs signal handlers only in the main thread, and not while that thread waits
    inside XLA: so fn runs in a worker thread while the main thread waits in short naps.
    Without a report channel (progress is None), Ctrl-C raises KeyboardInterrupt as usual.
    """
    if progress is None:
        return fn()

    def handler(signum, frame):
        if progress.stop_requested:
            # The worker is still inside XLA, which calls back into Python: unwinding the
            # interpreter under it can crash, so leave at once. Every file on disk was
            # written atomically, so the last checkpoint is whole.
            print("\naborted; the last checkpoint on disk is intact", file=sys.stderr)
            os._exit(130)
        progress.stop_requested = True
        print("\nstopping after this update to save a checkpoint (Ctrl-C again to abort)",
              file=sys.stderr)

    outcome = {}

    def work():
        try:
            outcome["value"] = fn()
        except BaseException as error:  # handed to the main thread below
            outcome["error"] = error

    previous = signal.signal(signal.SIGINT, handler)
    try:
        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(0.1)
    finally:
        signal.signal(signal.SIGINT, previous)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def write_atomic(path: str, data) -> None:
    """Write bytes, a str or an iterable of str lines to a temporary file, then rename: a
    reader never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data) if isinstance(data, (bytes, str)) else f.writelines(data)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename, so a power cut keeps one whole
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def config_json(config: Config) -> str:
    derived = {k: getattr(config, k) for k in ("batch_size", "minibatch_size", "num_updates")}
    return json.dumps({**dataclasses.asdict(config), **derived}, indent=2)


def metrics_jsonl(config: Config, metrics: dict, runs=None):
    """One JSON object per update per run (default: every run); NaN (no episode finished)
    becomes null. In a sweep, each row also gives its setting's index and swept values
    ("setting": 1, "sweep": {"learning_rate": 0.001}); "seed" counts within a setting.
    Yields the lines, so a long run's file is never held in memory whole."""
    host = {k: np.asarray(v) for k, v in metrics.items()}  # each [S, updates done]
    settings = config.settings
    for update in range(next(iter(host.values())).shape[1]):
        for run in range(config.num_runs) if runs is None else runs:
            row = {"update": update, "seed": run % config.num_seeds,
                   "env_steps": (update + 1) * config.batch_size}
            if config.sweep:
                row.update(setting=run // config.num_seeds,
                           sweep=settings[run // config.num_seeds])
            for name, values in host.items():
                value = values[run, update].item()
                row[name] = None if isinstance(value, float) and not math.isfinite(value) else value
            yield json.dumps(row) + "\n"


def plot_learning_curve(config: Config, metrics: dict, path: str) -> None:
    """Mean episode return over seeds, with the min-max band across seeds; in a sweep, one
    curve per setting, which makes it the sweep's comparison plot."""
    fig = new_figure(figsize=(6, 4))
    ax = fig.subplots()
    all_returns = np.asarray(metrics["episode_return"])  # [S, updates done]
    steps = (np.arange(all_returns.shape[1]) + 1) * config.batch_size
    for index, setting in enumerate(config.settings):
        returns = all_returns[index * config.num_seeds:(index + 1) * config.num_seeds]
        seen = np.isfinite(returns).any(axis=0)
        with warnings.catch_warnings():  # all-NaN columns (no episode ended yet) are expected
            warnings.simplefilter("ignore", RuntimeWarning)
            mean, low, high = (f(returns, axis=0) for f in (np.nanmean, np.nanmin, np.nanmax))
        label = ", ".join(f"{k}={v:g}" for k, v in setting.items()) or "mean"
        line, = ax.plot(steps[seen], mean[seen], label=f"{label} ({config.num_seeds} seeds)")
        if config.num_seeds > 1:
            ax.fill_between(steps[seen], low[seen], high[seen], alpha=0.2, color=line.get_color())
    ax.set(xlabel="environment steps per run", ylabel="episode return (band: min to max)",
           title=config.env)
    ax.legend(loc="best", fontsize="small")
    save_figure(fig, path)


def import_plotting() -> None:
    """Import matplotlib's Figure, Agg canvas and tickers (0.4 to 0.7 s). Run in a thread
    during training; a failure is left for the plot itself to report."""
    with contextlib.suppress(Exception):
        import matplotlib.backends.backend_agg  # noqa: F401
        import matplotlib.figure  # noqa: F401
        import matplotlib.ticker  # noqa: F401


def new_figure(**kwargs):
    """A matplotlib Figure drawn by Agg, without pyplot: nothing global changes (a notebook
    keeps its backend), and skipping pyplot's import saves about 0.2 s per run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str) -> None:
    """Save a matplotlib figure atomically (temporary file, then rename)."""
    from matplotlib.ticker import EngFormatter

    for ax in fig.axes:
        ax.xaxis.set_major_formatter(EngFormatter())  # steps as 50k, 1M
    fig.tight_layout()
    tmp = f"{path}.tmp{os.getpid()}.png"
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# The dashboard of diagnostics.png: (title, metrics drawn together, y scale).
DASHBOARD = (
    ("episode return", ("episode_return",), "linear"),
    ("policy entropy / log(legal actions)", ("entropy_normalized",), "linear"),
    ("approx KL: mean and max", ("approx_kl", "approx_kl_max"), "log"),
    ("clipped share: samples, gradient steps", ("clip_fraction", "grad_clip_fraction"), "linear"),
    ("critic: explained variance", ("explained_variance",), "linear"),
    ("update / weight norm", ("actor_update_ratio", "critic_update_ratio"), "log"),
)


def plot_diagnostics(config: Config, metrics: dict, path: str) -> None:
    """diagnostics.png: the key learning curves, each the mean over runs (see DASHBOARD)."""
    fig = new_figure(figsize=(13, 6.5))
    axes = fig.subplots(2, 3, sharex=True)
    for ax, (title, names, scale) in zip(axes.flat, DASHBOARD):
        for name in names:
            if name not in metrics:  # e.g. entropy_normalized of a continuous policy
                name = {"entropy_normalized": "entropy"}.get(name, name)
            values = np.asarray(metrics[name], np.float64)  # [S, updates done]
            steps = (np.arange(values.shape[1]) + 1) * config.batch_size
            with warnings.catch_warnings():  # all-NaN columns are expected for returns
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(values, axis=0)
            seen = np.isfinite(mean) & ((mean > 0) if scale == "log" else True)
            ax.plot(steps[seen], mean[seen], label=name)
        ax.set(title=title, yscale=scale)
        if len(names) > 1:
            ax.legend(fontsize="small")
    for ax in axes[1]:
        ax.set_xlabel("environment steps per run")
    fig.suptitle(f"{config.env}: mean over {config.num_runs} run(s)")
    save_figure(fig, path)


class TensorBoard:
    """--tensorboard: every metric of every seed as a TensorBoard scalar, against env steps.
    Rows are written when a checkpoint is, so what TensorBoard shows is what is saved."""

    def __init__(self, config: Config, out: str, first_update: int):
        from tensorboardX import SummaryWriter

        self.config, self.written = config, first_update
        self.writers = [SummaryWriter(os.path.join(out, "tensorboard", f"seed_{seed}"))
                        for seed in range(config.num_runs)]

    def write(self, metrics: dict) -> None:
        """Add the updates finished since the last call; {name: [S, updates done]}."""
        done = next(iter(metrics.values())).shape[1]
        for seed, writer in enumerate(self.writers):
            for update in range(self.written, done):
                for name, values in metrics.items():
                    value = float(values[seed, update])
                    if math.isfinite(value):  # NaN: no episode ended, or no evaluation
                        writer.add_scalar(name, value, (update + 1) * self.config.batch_size)
            writer.flush()
        self.written = done

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


def final_returns(metrics: dict) -> np.ndarray:
    """Each seed's return at the last update that finished an episode: [S]."""
    returns = np.asarray(metrics["episode_return"])
    last = [r[np.isfinite(r)][-1] if np.isfinite(r).any() else np.nan for r in returns]
    return np.array(last)



# A checkpoint is the whole Loop (parameters, optimizer state, schedule counter, normalizer
# statistics, env states, RNG keys, episode statistics, the metrics so far) in flax msgpack:
# no pickle, so loading a checkpoint cannot run code.
CHECKPOINT = "checkpoint.msgpack"
CHECKPOINT_FORMAT = 2  # 2: RunnerState gained the diagnostics probe batch
# Fields that say how to run, not what to train: they may differ between a run and its resume.
RUN_CONTROL = ("out", "quiet", "compile_cache", "save_every", "tensorboard", "resume",
               "cpu_threads")


class CheckpointError(ConfigError):
    """A run folder or checkpoint that cannot be used. The message names the fix."""


def is_key(x) -> bool:
    return jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def keys_to_data(tree):
    """Typed PRNG keys -> their raw uint32 data, which msgpack and io_callback can carry."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if is_key(x) else x, tree)


def checkpoint_bytes(config: Config, loop: Loop) -> bytes:
    host = jax.tree.map(np.asarray, keys_to_data(loop))
    train_config = {k: list(v) if isinstance(v, tuple) else v
                    for k, v in dataclasses.asdict(config).items() if k not in RUN_CONTROL}
    return serialization.msgpack_serialize({"format": CHECKPOINT_FORMAT, "config": train_config,
                                            "loop": serialization.to_state_dict(host)})


def save_checkpoint(config: Config, out: str, loop: Loop) -> None:
    """Write the checkpoint and the metrics it holds, each atomically (temp file, rename)."""
    write_atomic(os.path.join(out, CHECKPOINT), checkpoint_bytes(config, loop))
    write_atomic(os.path.join(out, "metrics.jsonl"), metrics_jsonl(config, loop.metrics()))


def load_checkpoint(config: Config, run_dir: str, template: Loop) -> Loop:
    """Read run_dir's checkpoint into the structure of `template` (from jax.eval_shape of
    Runner.init), or raise CheckpointError saying what is wrong."""
    path = os.path.join(run_dir, CHECKPOINT)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist; resume or evaluate a run that saved one")
    try:
        with open(path, "rb") as f:
            payload = serialization.msgpack_restore(f.read())
        saved_config, state, version = payload["config"], payload["loop"], payload["format"]
        if not (isinstance(saved_config, dict) and isinstance(state, dict)):
            raise TypeError
    except Exception:
        raise CheckpointError(f"{path} is corrupt or truncated; use an intact copy or train "
                              "again") from None
    if version != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {version!r}, and this ppo_jax.py "
                              f"reads format {CHECKPOINT_FORMAT}; use the version that wrote it")
    wanted = {k: v for k, v in dataclasses.asdict(config).items() if k not in RUN_CONTROL}
    for name, value in wanted.items():
        saved = saved_config.get(name)
        saved = tuple(saved) if isinstance(saved, list) else saved
        if saved != value:
            raise CheckpointError(f"{path} was trained with {name}={saved!r} but "
                                  f"{run_dir}/config.json says {value!r}; it belongs to another run")
    want = jax.eval_shape(keys_to_data, template)
    try:
        loop = serialization.from_state_dict(want, state)
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{path} does not fit this version of ppo_jax.py; train "
                              "again") from None
    for (where, w), x in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(loop)):
        if np.shape(x) != w.shape or np.asarray(x).dtype != w.dtype:
            raise CheckpointError(f"{path} holds {jax.tree_util.keystr(where)} of shape "
                                  f"{np.shape(x)} where {w.shape} is expected; it belongs to "
                                  "another run")
    return jax.tree.map(lambda t, x: jax.random.wrap_key_data(x, impl=KEY_IMPL) if is_key(t)
                        else jnp.asarray(x), template, loop)


def read_config(run_dir: str) -> Config:
    """The Config a run folder was trained with (its config.json)."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isdir(run_dir):
        raise CheckpointError(f"{run_dir} is not a run folder; pass the --out folder of a run")
    try:
        with open(path) as f:
            saved = json.load(f)
        fields = {f.name for f in dataclasses.fields(Config)}
        config = Config(**{k: tuple(v) if isinstance(v, list) else v
                           for k, v in saved.items() if k in fields})
        validate_config(config)
    except FileNotFoundError:
        raise CheckpointError(f"{run_dir} has no config.json; pass the --out folder of a "
                              "run") from None
    except ConfigError as error:
        raise CheckpointError(f"{path}: {error}") from None
    except (ValueError, TypeError, AttributeError):
        raise CheckpointError(f"{path} is not a valid ppo_jax config; restore it from the "
                              "run's original") from None
    return config


# ── Start-up: gymnax's import, XLA's threads, the compile cache ───────────────────────────
# Plumbing, not PPO: what makes a run start sooner, train faster and peak lower on the CPU.


class DeferredModule(types.ModuleType):
    """Stands in sys.modules for a module, and imports the real one on first attribute use."""

    def __getattr__(self, attr):
        return getattr(self._load(), attr)

    def __dir__(self):
        return dir(self._load())

    def __setattr__(self, attr, value):  # plt.show = ... (IPython's %matplotlib does this)
        if attr.startswith("__"):
            super().__setattr__(attr, value)
        else:
            setattr(self._load(), attr, value)

    def _load(self):
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        return importlib.import_module(self.__name__)


def import_gymnax():
    """gymnax, imported on first use, with seaborn and matplotlib.pyplot deferred until
    something draws.

    gymnax 1.0.1's Pong module imports seaborn (and through it scipy.stats) at import time,
    only to colour renderings: deferring it took 0.9 s off every start, and the peak RSS
    of a 2e7-step run from 852 to 694 MB (benchmarks/bench.py cold and memory). Catch and
    four misc modules (Pong, PointRobot, the two mazes) import pyplot, for the same reason:
    0.55 s and 28 MB, now paid only by what draws through pyplot (`eval --render`; the
    learning curve is drawn without it). Whatever uses them later gets the real modules.
    """
    for name in ("seaborn", "matplotlib.pyplot"):
        if name not in sys.modules and (spec := importlib.util.find_spec(name)):
            stand_in = DeferredModule(name)
            stand_in.__spec__ = spec  # so importlib.util.find_spec(name) still answers
            sys.modules[name] = stand_in
    import gymnax

    return gymnax


def small_run(config: Config) -> bool:
    """Whether one thread trains this config faster than two on a 2-core CPU: one run (no
    vmap over seeds or settings), at most 64 envs, and hidden-layer matmuls of at most 2^24
    multiply-adds per minibatch (minibatch size x widest layer^2). Its kernels are too small
    to share between threads, and the second one mostly spins waiting for work. Measured
    (benchmarks/README.md, Threads): 19-25 % faster on the standard config, the CartPole
    preset, 256 x 256 layers and 64 envs; even on Acrobot; slower with 8 seeds, 256 envs
    and Breakout-MinAtar, which keep JAX's default. Decided from the config alone
    (importing gymnax starts JAX), so the observation's size, and whether a CNN runs, do
    not enter."""
    return (config.num_runs == 1 and config.num_envs <= 64
            and config.minibatch_size * max(config.hidden_sizes) ** 2 <= 2**24)


def set_cpu_threads(config: Config) -> None:
    """Size XLA:CPU's thread pool: config.cpu_threads, or with 0 one thread for a small_run
    where no GPU or TPU plugin is installed (accelerator_installed).
    JAX's CPU client reads PJRT_NPROC when it starts, at the first array, so main() calls
    this before building anything. With 0, nothing changes if PJRT_NPROC is already set or
    JAX has already started (main called from Python)."""
    from jax._src import xla_bridge  # JAX has no public "has the CPU client started?"

    started = getattr(xla_bridge, "backends_are_initialized", lambda: False)()
    if config.cpu_threads:
        if started:
            raise ConfigError("--cpu-threads works only before this process first uses JAX; "
                              f"set PJRT_NPROC={config.cpu_threads} in the environment before "
                              "starting Python")
        os.environ["PJRT_NPROC"] = str(config.cpu_threads)
    elif (not started and "PJRT_NPROC" not in os.environ and small_run(config)
          and not accelerator_installed()):
        os.environ["PJRT_NPROC"] = "1"


def accelerator_installed() -> bool:
    """Whether JAX may run on a GPU or TPU here, told without starting it: a plugin is
    installed (a jax_plugins module or entry point, as JAX finds them, or libtpu) and
    JAX_PLATFORMS does not ask for the CPU. There, set_cpu_threads leaves PJRT_NPROC alone:
    it also narrows XLA's GPU compiler, and on an H200 the CartPole preset's `run` then
    compiled in 27.6 s instead of 4.6."""
    if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        return False
    return (any(importlib.util.find_spec(name) for name in ("jax_plugins", "libtpu"))
            or bool(importlib.metadata.entry_points(group="jax_plugins")))


# XLA:CPU compiles a while loop into one kernel when its body calls no library and touches
# fewer bytes than this (XLA's own default: 1 kB). A rollout of a few envs with its actor
# as matrix-vector products (matvec_rows) is such a loop: 20 to 40 kB at the standard config.
SMALL_LOOP_BYTES = 1 << 20


def raise_xla_loop_threshold() -> None:
    """Raise XLA:CPU's small-loop size to SMALL_LOOP_BYTES, through XLA_FLAGS. XLA reads
    those when JAX starts its CPU client, so main() calls this first; nothing changes once
    JAX has started, or when XLA_FLAGS already sets xla_backend_extra_options. Speed
    depends on it, the numbers hardly: such a loop is compiled by XLA's other emitter. With
    4 envs, CartPole, Acrobot and MountainCar trained identically with it and without;
    Pendulum differed in the last bits. Larger rollouts call YNNPACK: unchanged."""
    from jax._src import xla_bridge

    flags = os.environ.get("XLA_FLAGS", "")
    if (getattr(xla_bridge, "backends_are_initialized", lambda: False)()
            or "xla_backend_extra_options" in flags):
        return
    threshold = f"xla_cpu_small_while_loop_byte_threshold={SMALL_LOOP_BYTES}"
    os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_extra_options={threshold}".strip()


CACHE_MIN_COMPILE_SECONDS = 0.5  # quicker compiles are not worth a file
# The most each part of ~/.cache/ppo_jax may hold; the least recently used entries go first.
CACHE_MAX_BYTES = 1 << 30  # JAX's compilation cache (its own eviction; it needs filelock)
PROGRAMS_MAX_BYTES = 512 << 20  # the program store (evict_programs)


def enable_compile_cache() -> None:
    """Keep compiled programs on disk: a second identical run loads instead of compiling."""
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                         "ppo_jax")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_SECONDS)
    if importlib.util.find_spec("filelock"):  # else JAX refuses a bounded cache: unbounded
        jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
    cache_programs_with_host_calls()


def cache_programs_with_host_calls() -> None:
    """Let the persistent cache also keep programs that call the host through io_callback,
    as the default run's `run` does for its progress bar: it recompiled every time.

    JAX never stores such a program: it counts the callbacks as part of the compiled code.
    On CPU in jax 0.10, though, the program names each callback only by its index in a list
    that is handed over when the executable is loaded, and the loader takes a new list: so
    a stored program loads back with this process's callbacks (tests/test_compile_cache.py).
    The entry's key is JAX's own key of the program (its text, indices included; jaxlib
    version; XLA flags; compile options; devices), plus a suffix. JAX has no public hook
    for this, so it is done only on jax 0.10 (what requirements.txt pins) and on CPU (GPUs
    were not tried); elsewhere such programs are compiled every time, as JAX does."""
    from jax._src import compilation_cache, compiler, lru_cache

    jax_compile = compiler.compile_or_get_cached
    if (not jax.__version__.startswith("0.10.") or not hasattr(lru_cache, "_CACHE_SUFFIX")
            or getattr(jax_compile, "keeps_host_calls", False)):
        return

    def compile_or_load(backend, module, devices, options, host_callbacks, executable_devices,
                        *rest, **named):
        compile_here = lambda: jax_compile(backend, module, devices, options, host_callbacks,
                                           executable_devices, *rest, **named)
        if (not host_callbacks or backend.platform != "cpu"
                or not compilation_cache.is_cache_used(backend)):
            return compile_here()
        store = key = None  # store stays None for a cache folder JAX could not use
        try:
            jax_key = compilation_cache.get_cache_key(module, devices, options, backend)
            name, key = jax_key.rsplit("-", 1)[0], jax_key + "-host-calls"
            store = compilation_cache._get_cache(backend)
            entry = None if store is None else store.get(key)
            if entry is not None:
                executable, _ = compilation_cache.extract_executable_and_time(
                    compilation_cache.decompress_executable(entry))
                return backend.deserialize_executable(executable, executable_devices, options,
                                                      host_callbacks=host_callbacks)
        except Exception as error:  # e.g. a damaged entry: compile, and write it again
            warnings.warn(f"compiling {key or 'a program'}: the cache could not be read "
                          f"({error})")
            with contextlib.suppress(Exception):  # the cache never replaces an entry
                (store.path / f"{key}{lru_cache._CACHE_SUFFIX}").unlink()
        start = time.perf_counter()
        executable = compile_here()
        seconds = time.perf_counter() - start
        if (store is not None and jax.process_index() == 0  # (store is set after key)
                and seconds >= jax.config.jax_persistent_cache_min_compile_time_secs):
            try:
                compilation_cache.put_executable_and_time(key, name, executable, backend,
                                                          int(seconds))
            except Exception as error:  # as JAX does: a cache that cannot be written
                warnings.warn(f"cache entry {key} not written ({error})")
        return executable

    compile_or_load.keeps_host_calls = True
    compiler.compile_or_get_cached = compile_or_load


# The program store. JAX's cache is keyed by a program's lowered text, so a second
# identical run still traced and lowered init and run (about 2 s of a 7 s run) only to find
# its key. The command line also keeps both compiled programs, pickled by
# jax.experimental.serialize_executable's pickler, under a key computed before anything
# is traced: what the programs are made from. Like JAX's cache, the store holds machine code
# and trusts whoever can write its folder.


def programs_key(config: Config) -> str | None:
    """The key of a run's compiled init and run in the program store, known before anything
    is traced; None where the store does not apply.

    What makes the two programs: this file, the libraries that trace and compile them (by
    version), the config (less where its outputs go), JAX's settings, XLA's flags and
    thread count, and the machine. An env given as 'module:Class' is not covered (its code
    is outside this file and has no version), nor --save-every (its checkpoint call takes
    the whole state), nor a resume. jax 0.10 and CPU only, like
    cache_programs_with_host_calls."""
    if (not jax.__version__.startswith("0.10.") or jax.default_backend() != "cpu"
            or ":" in config.env or config.save_every or config.resume):
        return None
    from importlib import metadata

    with open(__file__, "rb") as f:
        source = f.read()
    cpu = platform.processor()
    with contextlib.suppress(OSError):  # XLA compiles for this CPU's instruction set
        with open("/proc/cpuinfo") as f:
            cpu = [line for line in f if line.startswith(("model name", "flags"))][:2]
    versions = [metadata.version(name) for name in ("jax", "jaxlib", "flax", "optax", "gymnax",
                                                     "chex", "numpy")]
    made_by = [hashlib.sha256(source).hexdigest(), __name__, sys.version, versions,
               config_json(dataclasses.replace(config, out="")),
               sorted((k, repr(v)) for k, v in jax.config.values.items()),
               os.environ.get("XLA_FLAGS", ""), xla_cpu_threads(),
               jax.devices()[0].client.platform_version, cpu]
    return hashlib.sha256(repr(made_by).encode()).hexdigest()[:40]


def report_host_calls(on_report, config: Config) -> list:
    """The host call that make_runner's `run` makes for on_report, built as JAX builds it:
    by lowering report_to_host alone (milliseconds, against seconds for `run`)."""
    lowered = jax.jit(functools.partial(report_to_host, on_report)).lower(
        jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((config.num_runs,), jnp.float32))
    return lowered._lowering.compile_args["host_callbacks"]


def programs_path(key: str) -> str:
    return os.path.join(jax.config.jax_compilation_cache_dir, "programs", f"{key}.pickle")


def program_picklers():
    """jax.experimental.serialize_executable's pickler and unpickler, extended to leave a
    program's host calls out and hand it this process's when it is loaded."""
    from jax.experimental import serialize_executable

    class Pickler(serialize_executable._JaxPjrtPickler):
        def __init__(self, file, host_calls):
            super().__init__(file)
            self.host_calls = host_calls

        def persistent_id(self, obj):
            for index, call in enumerate(self.host_calls):
                if obj is call:
                    return ("host call", index)
            return super().persistent_id(obj)

    class Unpickler(serialize_executable._JaxPjrtUnpickler):
        def __init__(self, file, host_calls):
            super().__init__(file, jax.devices()[0].client)
            self.host_calls = host_calls

        def persistent_load(self, pid):
            if pid[0] == "host call":
                return self.host_calls[pid[1]]
            if pid[0] == "exec":  # as serialize_executable loads it, with the host calls
                return self.backend.deserialize_executable(
                    pid[1], executable_devices=self.execution_devices,
                    host_callbacks=self.host_calls)
            return super().persistent_load(pid)

    return Pickler, Unpickler


class StoredProgram(NamedTuple):
    """One compiled program in the program store."""

    pickled: bytes  # the unloaded executable, its argument shapes and no_kwargs
    host_calls: int  # how many host calls the loader must hand it
    in_tree: Any
    out_tree: Any


@contextlib.contextmanager
def compiled_afresh():
    """Inside, XLA compiles every program itself, without JAX's persistent cache; yields
    the list of what it compiled. For the program store: a program loaded from JAX's cache
    pickles without its kernels, and run from the store it failed ("Function iota.5_kernel
    not found"). That happened whenever the store had no entry but JAX's cache had the
    programs: after the store evicted one, or when the store's key changed but the programs
    did not (a JAX setting, another numpy). Such a run now compiles, as a cold one does."""
    from jax._src import compiler

    cached, fresh = compiler.compile_or_get_cached, []

    def compile_here(backend, module, devices, options, host_callbacks, executable_devices,
                     *rest, **named):
        executable = compiler.backend_compile_and_load(backend, module, executable_devices,
                                                       options, host_callbacks)
        fresh.append(executable)
        return executable

    compiler.compile_or_get_cached = compile_here
    try:
        yield fresh
    finally:
        compiler.compile_or_get_cached = cached


def save_programs(key: str, programs: dict, fresh: list, keys) -> None:
    """Keep {name: jax.stages.Compiled} in the program store, for load_programs, if XLA
    compiled each of them in this process (`fresh`, from compiled_afresh), with the run's
    keys (seed_keys: a program of its own to compile, 0.15 s at every start). A store that
    cannot be written costs the next run its tracing, nothing more."""
    compiled_here = lambda c: any(c._executable.xla_executable is e for e in fresh)
    if not all(compiled_here(compiled) for compiled in programs.values()):
        warnings.warn("the compiled programs were not stored: they were not compiled here")
        return
    Pickler, _ = program_picklers()
    try:
        stored = {}
        for name, compiled in programs.items():
            unloaded = compiled._executable._unloaded_executable
            with io.BytesIO() as f:
                Pickler(f, unloaded.host_callbacks).dump(
                    (unloaded, jax.tree.leaves(compiled.args_info), compiled._no_kwargs))
                stored[name] = StoredProgram(f.getvalue(), len(unloaded.host_callbacks),
                                             jax.tree.structure(compiled.args_info),
                                             compiled.out_tree)
        stored["keys"] = np.asarray(jax.random.key_data(keys))
        os.makedirs(os.path.dirname(programs_path(key)), exist_ok=True)
        write_atomic(programs_path(key), pickle.dumps(stored))
        evict_programs(os.path.dirname(programs_path(key)))
    except Exception as error:
        warnings.warn(f"the compiled programs were not stored ({error})")


def evict_programs(folder: str, max_bytes: int | None = None) -> None:
    """Remove the store's least recently used entries (by modification time, which
    load_programs refreshes) until the rest fit in max_bytes (PROGRAMS_MAX_BYTES)."""
    max_bytes = PROGRAMS_MAX_BYTES if max_bytes is None else max_bytes
    entries = []
    for name in os.listdir(folder):
        with contextlib.suppress(OSError):  # removed meanwhile by another run
            if name.endswith(".pickle"):
                info = os.stat(os.path.join(folder, name))
                entries.append((info.st_mtime, info.st_size, name))
    total = sum(size for _, size, _ in entries)
    for _, size, name in sorted(entries):
        if total <= max_bytes:
            break
        with contextlib.suppress(OSError):
            os.remove(os.path.join(folder, name))
        total -= size


def load_programs(key: str, host_calls: dict) -> dict | None:
    """The programs save_programs kept under `key`, each loaded with this process's host
    calls ({name: list}), and the run's keys ("keys"); or None if there are none (or they
    cannot be read: then the entry is removed, and the run traces and compiles as usual)."""
    path = programs_path(key)
    if not os.path.exists(path):
        return None
    _, Unpickler = program_picklers()
    try:
        with open(path, "rb") as f:
            stored = pickle.load(f)
        programs = {"keys": jax.random.wrap_key_data(stored.pop("keys"), impl=KEY_IMPL)}
        for name, program in stored.items():
            calls = host_calls[name]
            if program.host_calls != len(calls):
                raise ValueError(f"{name} makes {program.host_calls} host calls, not {len(calls)}")
            unloaded, args_info, no_kwargs = Unpickler(io.BytesIO(program.pickled), calls).load()
            programs[name] = jax.stages.Compiled(unloaded.load(), [],
                                                 program.in_tree.unflatten(args_info),
                                                 program.out_tree, no_kwargs=no_kwargs)
        with contextlib.suppress(OSError):
            os.utime(path)  # used now: evicted last
        return programs
    except Exception as error:
        warnings.warn(f"compiling again: the stored programs {path} could not be loaded "
                      f"({error})")
        with contextlib.suppress(OSError):
            os.remove(path)
        return None


# Other processes count as keeping the machine busy when they used half a core or more
# while the compile thread was being found, and at least this much CPU time: with nothing
# else running, up to 0.11 s showed up in that window (about 0.2 s), enough to skip the
# compile thread's demotion and peak at 690 MB (benchmarks/README.md, On the Zen 4).
OTHERS_BUSY_MIN_SECONDS = 0.15


def thread_cpu_ticks() -> dict[int, int]:
    """CPU time (user + system, in clock ticks) of each of this process's threads, by id."""
    ticks = {}
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError, ValueError):  # a thread that just ended
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks[int(tid)] = int(fields[11]) + int(fields[12])
    return ticks


def machine_busy_ticks() -> int:
    """CPU time every process on the machine has used, in clock ticks (/proc/stat)."""
    with open("/proc/stat") as f:  # cpu  user nice system idle iowait irq softirq steal
        user, nice, system, _, _, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return user + nice + system + irq + softirq + steal


class DemotedThread(NamedTuple):
    """A thread compile_thread_yields put under SCHED_IDLE, and its policy before."""

    tid: int
    policy: int
    param: Any  # os.sched_param


@contextlib.contextmanager
def compile_thread_yields():
    """While XLA:CPU compiles a program, let its codegen threads go first: run the thread
    that compiles under SCHED_IDLE (it then runs only on a core nothing else wants), unless
    other processes keep the machine busy.

    That thread emits each fusion's MLIR and hands it to XLA's codegen threads. On 2 cores
    it emits much faster than they compile, and each fusion waiting in between keeps its
    own MLIR context, so compiling `run` held hundreds of MB at once: the peak RSS of a
    run (benchmarks/README.md, Memory). With the thread at nice 10 instead, cold runs on the
    EPYC Zen 3 peaked at 404 to 691 MB (47 runs); under SCHED_IDLE, 403 to 462 MB (24).
    JAX neither names its threads nor offers a knob, so the compile thread is found as the
    thread, not started by Python, that has used at least 0.1 s of CPU since the compile
    began and twice as much as any other, and it is demoted then (on Linux the policy is
    per thread). Not if other processes used half a core or more meanwhile, and at least
    OTHERS_BUSY_MIN_SECONDS: the compile would wait for them. Its policy is restored
    afterwards where the process may (leaving SCHED_IDLE needs CAP_SYS_NICE, as root has);
    elsewhere that thread stays idle-class, which delays a later compile only while other
    threads keep every core busy. Linux and CPU only."""
    if sys.platform != "linux" or jax.default_backend() != "cpu":
        yield []
        return
    done, found, per_second = threading.Event(), [], os.sysconf("SC_CLK_TCK")

    def demote() -> None:
        start, machine, threads = time.perf_counter(), machine_busy_ticks(), thread_cpu_ticks()
        while not done.wait(0.02):
            python = {thread.native_id for thread in threading.enumerate()}
            used = {tid: ticks - threads.get(tid, 0) for tid, ticks in thread_cpu_ticks().items()}
            xla = {tid: ticks for tid, ticks in used.items() if tid not in python}
            tid = max(xla, key=xla.get, default=None)
            runner_up = max((ticks for other, ticks in xla.items() if other != tid), default=0)
            if tid is not None and xla[tid] >= max(0.1 * per_second, 2 * runner_up):
                break
        else:
            return  # compiled before one thread stood out
        others = (machine_busy_ticks() - machine - sum(used.values())) / per_second
        if others >= max(0.5 * (time.perf_counter() - start), OTHERS_BUSY_MIN_SECONDS):
            return
        policy, param = os.sched_getscheduler(tid), os.sched_getparam(tid)
        if policy != os.SCHED_IDLE:  # else already so, from an earlier compile
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        found.append(DemotedThread(tid, policy, param))

    def demote_quietly() -> None:
        with contextlib.suppress(OSError):  # /proc unreadable, or the thread just ended
            demote()

    watcher = threading.Thread(target=demote_quietly, daemon=True)
    watcher.start()
    try:
        yield found  # [DemotedThread] once the compile thread is found and demoted
    finally:
        done.set()
        watcher.join()
        for thread in found:
            with contextlib.suppress(OSError):  # leaving SCHED_IDLE needs CAP_SYS_NICE
                os.sched_setscheduler(thread.tid, thread.policy, thread.param)


# ── CLI ───────────────────────────────────────────────────────────────────────────────────


def flag_value(argv: list[str], flag: str) -> str | None:
    """The value given to `flag` in argv (as `--flag v` or `--flag=v`), or None."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.partition("=")[2]
    return None


def parse_flags(cls, argv: list[str], **kwargs):
    """tyro.cli, with its boxed error turned into a ConfigError of one line."""
    import io

    import tyro

    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return tyro.cli(cls, args=argv, **kwargs)
    except SystemExit as exit:
        if exit.code in (0, None):
            sys.stderr.write(captured.getvalue())
            raise
        raise ConfigError(one_line(captured.getvalue())) from None


def parse_config(argv: list[str]) -> Config:
    """Flags -> Config. `--env X` picks the preset first, so explicit flags override it.
    `--resume DIR` starts from DIR's config.json instead; only run-control flags may change."""
    resume = flag_value(argv, "--resume")
    if resume is not None:
        default = dataclasses.replace(read_config(resume), out=resume, resume=resume)
    else:
        default = preset_config(flag_value(argv, "--env") or Config.env)
    config = parse_flags(Config, argv, default=default, description=__doc__.split("\n")[0])
    if resume is not None:
        if config.out != resume:
            raise ConfigError(f"--resume writes into {resume}; drop --out")
        changed = [f.name for f in dataclasses.fields(Config) if f.name not in RUN_CONTROL
                   and getattr(config, f.name) != getattr(default, f.name)]
        if changed:
            raise ConfigError(f"--resume continues {resume} with its own settings; drop "
                              f"--{changed[0].replace('_', '-')} (only --quiet, --save-every, "
                              "--tensorboard, --compile-cache and --cpu-threads may change)")
    return config


def one_line(panel: str) -> str:
    """The message of tyro's error panel, joined onto one line: the first section after the
    title. The panel is a box in UTF-8; in ASCII the title stands alone above a rule of '-'."""
    sections, section = [], []
    for line in panel.splitlines():
        text = line.strip().strip("│╭╮╰╯").strip()
        if text.startswith("─") or (text and set(text) <= set("-")):  # title bar or rule
            sections.append(section)
            section = []
        elif text.startswith("For full helptext"):
            break
        elif text:
            section.append(text)
    sections.append(section)
    # sections[0] is what stood above the first rule: the ASCII title, or nothing.
    lines = next((s for s in sections[1:] if s), sections[0])
    message = " ".join(lines) or "could not parse the flags"
    return f"{message} (see --help)"


def create_out_dir(config: Config) -> str:
    """Create the output folder, or raise ConfigError without leaving anything behind."""
    out = config.out or os.path.join(
        "runs", f"{config.env.replace(':', '.').replace('/', '.')}-{time.strftime('%Y%m%d-%H%M%S')}")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ConfigError(f"--out {out} already exists and is not an empty folder; "
                          "pick a new folder so no earlier run is overwritten")
    missing = []
    parent = os.path.abspath(out)
    while not os.path.exists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    try:
        os.makedirs(out, exist_ok=True)
        write_atomic(os.path.join(out, ".write_test"), "")
        os.remove(os.path.join(out, ".write_test"))
    except OSError as error:
        for path in missing:
            if os.path.isdir(path):
                os.rmdir(path)
        raise ConfigError(f"cannot write to --out {out} ({error.strerror}); "
                          "pick a folder you can write to") from None
    return out


def train_and_save(config: Config, out: str, start: float) -> int:
    """Compile, train with live progress, write every output, print the summary. Returns
    the exit code: 0 done, 130 stopped by Ctrl-C (checkpointed), 1 stopped by a NaN."""
    # With neither a bar nor checkpoints to write, the program has no host call.
    progress = Progress(config, show=not config.quiet) if not config.quiet or config.save_every else None
    tensorboard = None

    def save(loop: Loop) -> None:
        save_checkpoint(config, out, loop)
        if tensorboard is not None:
            tensorboard.write(loop.metrics())

    runner = make_runner(config, on_report=progress,
                         on_checkpoint=save if config.save_every else None)
    t0 = time.perf_counter()
    with ctrl_c_not_lost(), contextlib.ExitStack() as stack:  # Ctrl-C leaves until training
        key = programs_key(config) if config.compile_cache else None
        stored = None if key is None else load_programs(key, {
            "init": [], "run": [] if progress is None else report_host_calls(progress, config)})
        fresh = [] if key is None or stored else stack.enter_context(compiled_afresh())
        if config.resume:
            loop = load_checkpoint(config, out, jax.eval_shape(runner.init, seed_keys(config)))
            if loop.updates_done >= config.num_updates:
                raise CheckpointError(
                    f"{out} finished all {config.num_updates} updates; nothing to resume "
                    f"(evaluate it with: python ppo_jax.py eval {out})")
            lowered = runner.run.lower(loop)
        elif stored:  # a second identical run: nothing to trace, lower or compile
            loop = stored["init"](stored["keys"])
        else:  # XLA compiles init while Python traces and lowers run (from init's outputs)
            keys = seed_keys(config)
            init = runner.init.lower(keys)
            pool = concurrent.futures.ThreadPoolExecutor(1)
            try:
                compiling_init = pool.submit(init.compile)
                lowered = runner.run.lower(init.out_info)
                init_compiled = compiling_init.result()
                loop = init_compiled(keys)
            finally:
                pool.shutdown(wait=False)  # after a Ctrl-C meanwhile, exit now, not later
        first = loop.updates_done
        if progress is not None:
            progress.last_update = first
        if config.tensorboard:  # turned on at a resume: write the earlier updates too
            new_log = not os.path.isdir(os.path.join(out, "tensorboard"))
            tensorboard = TensorBoard(config, out, 0 if new_log else first)
        if stored:
            compiled = stored["run"]
        else:
            with compile_thread_yields():
                compiled = lowered.compile()
            if key is not None:
                save_programs(key, {"init": init_compiled, "run": compiled}, fresh, keys)
    t1 = time.perf_counter()
    # While XLA trains, this thread only waits (without the GIL), and a small run leaves a
    # core idle: import what the plots need meanwhile, not after.
    threading.Thread(target=import_plotting, daemon=True).start()
    loop = run_stoppable(progress, lambda: jax.block_until_ready(compiled(loop)))
    t2 = time.perf_counter()
    if progress is not None:
        progress.close()

    save(loop)
    if tensorboard is not None:
        tensorboard.close()
    metrics = loop.metrics()
    for index, setting in enumerate(config.settings if config.sweep else []):
        label = ",".join(f"{k}={v:g}" for k, v in setting.items())
        runs = range(index * config.num_seeds, (index + 1) * config.num_seeds)
        write_atomic(os.path.join(out, f"metrics_{label}.jsonl"),
                     metrics_jsonl(config, metrics, runs))
    write_atomic(os.path.join(out, "params.msgpack"),
                 serialization.to_bytes(jax.device_get(loop.runner.params)))
    plot_learning_curve(config, metrics, os.path.join(out, "learning_curve.png"))
    if config.diagnostics:  # drawing the dashboard takes 0.5 s, a twelfth of a default run
        plot_diagnostics(config, metrics, os.path.join(out, "diagnostics.png"))

    done, stop = loop.updates_done, int(loop.stop)
    steps = (done - first) * config.batch_size
    returns = final_returns(metrics)
    print(f"{config.env}: {config.num_runs} run(s) x {done * config.batch_size:,} steps")
    for index, setting in enumerate(config.settings):
        mine = returns[index * config.num_seeds:(index + 1) * config.num_seeds]
        label = ", ".join(f"{k}={v:g}" for k, v in setting.items())
        print(f"final return per seed{' for ' + label if label else ''}: "
              + " ".join(f"{r:.1f}" for r in mine)
              + (f"  (mean {np.nanmean(mine):.1f})" if len(mine) > 1 else ""))
    print(f"{steps * config.num_runs / (t2 - t1):,.0f} steps/s | compile {t1 - t0:.1f} s | "
          f"train {t2 - t1:.1f} s | wall {time.perf_counter() - start:.1f} s | output {out}")
    if stop == STOPPED and done < config.num_updates:
        print(f"stopped after update {done} of {config.num_updates}; resume with: "
              f"python ppo_jax.py --resume {out}", file=sys.stderr)
        return 130
    if stop == NONFINITE:
        metric = (GUARDED + ("parameters",))[int(loop.bad_metric)]
        print(f"error: {metric} became NaN or infinite in update {done + 1}; training stopped. "
              f"The last good state (update {done}) is in {os.path.join(out, CHECKPOINT)}; "
              "lower --learning-rate or --max-grad-norm and train again", file=sys.stderr)
        return 1
    return 0


@dataclasses.dataclass(frozen=True)
class EvalArgs:
    """python ppo_jax.py eval RUN_DIR: score a trained run's policies on fresh episodes."""

    run_dir: str
    """The --out folder of a run (it needs config.json and checkpoint.msgpack)."""
    episodes: int = 100
    """Episodes per seed, for each of the deterministic and the stochastic policy."""
    seed: int = 0
    """Random seed of the evaluation episodes."""
    render: bool = False
    """Also save policy.gif: one deterministic episode of seed 0."""


def eval_main(argv: list[str]) -> int:
    """The eval command: mean +- std return per seed, printed and saved to eval.json."""
    import tyro

    if not argv or (all(a.startswith("-") for a in argv) and not {"-h", "--help"} & set(argv)):
        raise ConfigError("eval needs a run folder: python ppo_jax.py eval RUN_DIR")
    args = parse_flags(EvalArgs, argv, config=(tyro.conf.PositionalRequiredArgs,),
                       description=EvalArgs.__doc__)
    if args.episodes <= 0:
        raise ConfigError(f"--episodes must be positive, got {args.episodes}")
    config, loop = load_run(args.run_dir)
    if args.render:
        check_renderable(config.env)
    if config.compile_cache:  # as the run was trained: evaluating it again skips compiling
        enable_compile_cache()
    setup = make_setup(config)
    keys = split_seed(args.seed, config.num_runs, config.num_runs)

    @jax.jit
    def evaluate_all(runner, keys):
        return evaluate_runs(setup, runner, keys, args.episodes)

    results = jax.device_get(evaluate_all(loop.runner, keys))
    report = {"env": config.env, "episodes": args.episodes, "updates": loop.updates_done,
              "seeds": []}
    print(f"{config.env} after {loop.updates_done * config.batch_size:,} steps, "
          f"{args.episodes} episodes per seed")
    for seed in range(config.num_runs):
        row = {"seed": seed}
        for name, returns in zip(("deterministic", "stochastic"), results):
            row[name] = {"mean": float(returns[seed].mean()), "std": float(returns[seed].std())}
        report["seeds"].append(row)
        print(f"seed {seed}: " + " | ".join(
            f"{name} {row[name]['mean']:.1f} +- {row[name]['std']:.1f}"
            for name in ("deterministic", "stochastic")))
    write_atomic(os.path.join(args.run_dir, "eval.json"), json.dumps(report, indent=2))
    if args.render:
        path = os.path.join(args.run_dir, "policy.gif")
        episode_return = render_episode(config, loop, path, key=make_key(args.seed))
        print(f"saved {path} (one deterministic episode of seed 0, return {episode_return:.1f})")
    return 0


def main(argv: list[str] | None = None) -> int:
    # Run as a script, the wall time counts the imports; called from Python, from here.
    start = IMPORTED_AT if __name__ == "__main__" else time.perf_counter()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["eval"]:
        try:
            return eval_main(argv[1:])
        except ConfigError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    try:
        config = parse_config(argv)
        validate_config(config)
        set_cpu_threads(config)
        raise_xla_loop_threshold()
        env, env_params = make_env(config.env)
        env_spec(env, env_params, config.action_mask)
        out = config.resume or create_out_dir(config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if config.compile_cache:
        enable_compile_cache()
    if not config.resume:
        write_atomic(os.path.join(out, "config.json"), config_json(config))
    try:
        return train_and_save(config, out, start)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except BaseException as error:
        if not config.resume and set(os.listdir(out)) <= {"config.json"}:
            # Nothing was produced: remove the folder rather than leave an empty one.
            os.remove(os.path.join(out, "config.json"))
            os.rmdir(out)
        if isinstance(error, KeyboardInterrupt):
            saved = os.path.exists(os.path.join(out, CHECKPOINT))
            print("\ninterrupted; " + (f"the last checkpoint is intact: resume with: python "
                                        f"ppo_jax.py --resume {out}" if saved else
                                        "nothing was saved"), file=sys.stderr)
            return 130
        raise


if __name__ == "__main__":
    # What ppo_jax's imports made lives as long as the process (gymnax, tyro and matplotlib
    # load later, inside main). Frozen, it is no longer re-scanned by each full garbage
    # collection that tracing triggers: `python ppo_jax.py --quiet` spent 0.58 and 0.64 s
    # collecting garbage, 0.51 and 0.39 s with this. (Only here: frozen objects are never
    # freed, so a process calling main() again and again must not freeze.)
    gc.freeze()
    code = main()
    # Every output is written, synced and closed by now. Tearing the interpreter down (every
    # module, then XLA's executables and thread pools) took 0.3 to 0.6 s of an 8 s second
    # run: skip it. os._exit runs no atexit handler, so flush what they would have.
    logging.shutdown()
    with contextlib.suppress(OSError):  # stdout may be a pipe that closed early (| head)
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)
