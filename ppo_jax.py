"""ppo_jax: Proximal Policy Optimization in one readable JAX file.

Run it:
    python ppo_jax.py --env Acrobot-v1 --num-seeds 8   # train, with live progress (--help: flags)
    python ppo_jax.py eval runs/<folder>               # score a trained run
    python ppo_jax.py diagnose runs/<folder>           # what went wrong in it, in plain lines
Import it:
    train = jax.jit(jax.vmap(ppo_jax.make_train(ppo_jax.Config(env="CartPole-v1"))))
    runner_state, metrics = train(jax.random.split(ppo_jax.make_key(0), 8))  # 8 seeds, one jit

The file reads in the algorithm's order, from the config to make_train, which composes
collect_rollout, compute_gae, ppo_loss and update; below the boundary line after it is the
program around PPO: diagnostics, the host loop of jitted chunks, the diagnosis of a run's
metrics, evaluation, files, the CLI.
Shape letters: T steps per rollout, N envs, B minibatch, A actions, D action dimensions,
S seeds (runs), U updates, K updates in a chunk.

Conventions, where PPO codebases disagree:
- A Transition is one step: the observation the action was chosen from, the action, and the
  reward and flags it produced; `terminated` and `truncated` belong to the step that ends it.
- A time limit is not a termination: a truncated step bootstraps from the critic's value of
  the true next observation (gymnax's info["final_observation"]); only termination zeroes it.
- Rewards are scaled by the running std of the discounted return (`normalize_reward`), and
  the value loss is 0.5 (V - R)^2 (or clipped: `clip_value_loss`). Gradients are clipped by
  their global norm over actor and critic together. Advantages are normalized per minibatch.
  The learning rate and the entropy coefficient follow per-update linear schedules.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import difflib
import functools
import hashlib
import importlib
import itertools
import json
import math
import os
import re
import signal
import sys
import threading
import time
import warnings
from typing import Any, Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization, struct


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
    """Adam, or plain SGD: the clipped gradient times a (larger) learning rate; see notebooks/02."""
    target_kl: float | None = None
    """Stop an update's remaining epochs once an epoch's mean approx KL exceeds this."""
    hidden_sizes: tuple[int, ...] = (64, 64)
    """Hidden layer widths of the actor and of the critic (separate networks)."""
    activation: Literal["tanh", "relu"] = "tanh"
    """Hidden layer activation."""
    cnn_channels: tuple[int, ...] = (16,)
    """Channels of the 3x3 convolutions that image observations (MinAtar) pass first."""
    diagnostics: bool = False
    """Also log per-term gradient norms, the exploration split, dormant units and feature rank
    on a probe batch (8 % more run time at the standard config; off: none at all)."""
    log_std_init: float = 0.0
    """Initial log standard deviation of the Gaussian policy (continuous actions)."""
    action_mask: Literal["auto", "on", "off"] = "auto"
    """Use the env's action_mask(state, params) method: auto = when it has one."""
    bootstrap_truncation: bool = True
    """Bootstrap from V(final observation) at time limits; off treats them as terminal."""
    normalize_obs: bool = False
    """Normalize observations by running mean and variance (kept in the jitted state)."""
    normalize_reward: bool = True
    """Scale rewards by the running std of the discounted return (as gymnasium does): on by
    default, it keeps the value loss in scale (docs/ablation.md)."""
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
    """Also checkpoint at the end of each chunk that completes an N-th update (0: only at the
    end, on Ctrl-C, or on a bad update)."""
    divergence_guard: bool = True
    """Stop, as on a NaN, at an update whose approx KL passes 10 or whose value loss passes
    10,000 times the mean square of its targets (a diverged, not a slow, run)."""
    tensorboard: bool = False
    """Also write every metric to <out>/tensorboard/seed_<i>, at each checkpoint and the end."""
    resume: str | None = None
    """Continue the run in this folder from its checkpoint, with its own config."""
    trust_env_module: bool = False
    """With --resume: let the run's 'module:Class' env import its module (that runs its code)."""
    quiet: bool = False
    """No live progress bar."""
    compile_cache: bool = True
    """Cache compiled programs under ~/.cache/ppo_jax: a second identical run skips compiling."""

    @property
    def batch_size(self) -> int: return self.num_envs * self.num_steps
    @property
    def minibatch_size(self) -> int: return self.batch_size // self.num_minibatches
    @property
    def num_updates(self) -> int: return self.total_timesteps // self.batch_size

    @property
    def settings(self) -> list[dict[str, float]]:
        """The grid that --sweep asks for, one dict of overrides per setting ([{}] without)."""
        axes = [parse_sweep(item) for item in self.sweep]
        return [dict(zip([name for name, _ in axes], values))
                for values in itertools.product(*(values for _, values in axes))]

    @property
    def num_runs(self) -> int:
        """The S axis of every array: run r is seed r % num_seeds of setting r // num_seeds."""
        return len(self.settings) * self.num_seeds

    def hparams(self) -> HParams:
        """The rates and coefficients as arrays to vmap over: [num_runs] when sweeping."""
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


# `--env X` starts from PRESETS[X] (results in the README); explicit flags override it.
PRESETS: dict[str, dict[str, Any]] = {
    "CartPole-v1": dict(total_timesteps=150_000, num_envs=16, num_steps=32, learning_rate=2.5e-3),
    "Acrobot-v1": dict(total_timesteps=500_000, num_envs=16, num_steps=128, learning_rate=5e-3,
                       gae_lambda=0.9, ent_coef=0.0),
    # Sparse reward: without normalized observations and rewards the policy stays at -200.
    "MountainCar-v0": dict(total_timesteps=1_000_000, num_envs=16, num_steps=16, gae_lambda=0.98,
                           ent_coef=0.0, learning_rate=3e-4, anneal_lr=False, normalize_obs=True),
    "Pendulum-v1": dict(total_timesteps=1_000_000, num_envs=16, num_steps=128,
                        gamma=0.9, ent_coef=0.0, learning_rate=1e-3, normalize_obs=True),
    # 64 envs find the flag (~100 steps of pushing) by chance; gamma 0.9999 keeps it in sight.
    "MountainCarContinuous-v0": dict(total_timesteps=2_000_000, num_envs=64, num_steps=128,
                                     gamma=0.9999, ent_coef=0.0, normalize_obs=True),
    # gamma 0.999, constant lr (gymnax baselines); on CPU a 2 x 256 MLP trains 7x faster than a CNN
    **{f"{game}-MinAtar": dict(total_timesteps=10_000_000, num_envs=64, num_steps=128,
                               num_minibatches=8, learning_rate=5e-4, anneal_lr=False,
                               gamma=0.999, activation="relu", hidden_sizes=(256, 256),
                               # measured: 0.01 left Breakout at 22 after 1e7 steps, 0.03 at 54
                               cnn_channels=(), ent_coef=0.03 if game == "Breakout" else 0.01,
                               normalize_reward=False)  # as measured (1e7 steps, in the README)
       for game in ("Breakout", "SpaceInvaders", "Asterix", "Freeway")},
}
SWEEPABLE = ("learning_rate", "ent_coef", "clip_eps", "gamma", "gae_lambda", "vf_coef",
             "max_grad_norm")
KEY_IMPL = "philox4x32"  # the PRNG of every key (see make_key)


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
    def require(valid, must: str, *names: str) -> None:  # in order: the first failure raises
        for name in names:
            if not valid(getattr(config, name)):
                raise ConfigError(f"{name} must {must}, got {getattr(config, name)}")
    require(lambda v: not isinstance(v, float) or math.isfinite(v), "be a finite number",
            *(field.name for field in dataclasses.fields(config)))
    require(lambda v: v > 0, "be positive", "num_seeds", "total_timesteps", "num_envs",
            "num_steps", "update_epochs", "num_minibatches", "eval_episodes")
    require(lambda v: v and min(v) > 0, "be positive widths", "hidden_sizes")
    require(lambda v: not v or min(v) > 0, "be positive", "cnn_channels")
    if config.batch_size % config.num_minibatches:
        raise ConfigError(f"num_envs * num_steps = {config.batch_size} is not divisible by "
                          f"num_minibatches = {config.num_minibatches}; pick a num_minibatches "
                          "that divides it")
    if config.total_timesteps < config.batch_size:
        raise ConfigError(f"total_timesteps = {config.total_timesteps} is less than one batch "
                          f"(num_envs * num_steps = {config.batch_size}); raise it or shrink "
                          "the batch")
    require(lambda v: v > 0 and math.isfinite(v), "be a positive number", "learning_rate")
    require(lambda v: 0 <= v <= 1, "lie in [0, 1]", "gamma", "gae_lambda")
    require(lambda v: v >= 0, "be >= 0", "clip_eps", "ent_coef", "vf_coef", "max_grad_norm")
    require(lambda v: v is None or v >= 0, "be >= 0", "ent_coef_final")
    if config.sweep:
        names = [parse_sweep(item)[0] for item in config.sweep]
        if len(set(names)) < len(names):
            raise ConfigError(f"--sweep names {', '.join(names)}: give each name once")
        for setting in config.settings:
            validate_config(dataclasses.replace(config, sweep=(), **setting))
    require(lambda v: v >= 0, "be >= 0 (0 never evaluates)", "eval_every")
    require(lambda v: v >= 0, "be >= 0 (0 saves only at the end)", "save_every")
    require(lambda v: v is None or v > 0, "be positive (or None to disable)", "target_kl")


# ── Environment ───────────────────────────────────────────────────────────────────────────
# Any gymnax Environment works. To forbid actions, a discrete env defines action_mask(state,
# params) -> bool [A] (True where legal), called on the state each observation comes from.
def make_env(env_id: str) -> tuple[Any, Any]:
    """The gymnax environment and its default params, from an id or 'module:Class'."""
    import gymnax
    if ":" in env_id:
        module_name, _, class_name = env_id.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as error:
            raise ConfigError(f"cannot load env {env_id!r} ({error}); give 'module:Class' of an "
                              "importable gymnax Environment") from None
        if not (isinstance(cls, type)
                and issubclass(cls, gymnax.environments.environment.Environment)):
            raise ConfigError(f"{env_id} is not a gymnax Environment class; give 'module:Class' "
                              "of a subclass of gymnax.environments.environment.Environment")
        try:
            env = cls()
        except Exception as error:
            raise ConfigError(f"cannot create {env_id} ({type(error).__name__}: {error}); its "
                              "class must be constructible without arguments") from None
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
    from gymnax.environments.spaces import Discrete
    space = env.action_space(env_params)
    discrete, has_mask = isinstance(space, Discrete), callable(getattr(env, "action_mask", None))
    if action_mask == "on" and not discrete:
        raise ConfigError("action masking needs discrete actions; drop --action-mask on")
    if action_mask == "on" and not has_mask:
        raise ConfigError(f"{env.name} has no action_mask(state, params) method; "
                          "define one or pass --action-mask off")
    masked = discrete and has_mask and action_mask != "off"
    # reset is traced, not run, for the observation's shape
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
    delta, total = batch_mean - stats.mean, stats.count + n
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
    zero = jnp.zeros(obs.shape[0]) if config.normalize_reward else None
    obs_stats = update_running_stats(None, obs) if config.normalize_obs else None
    return Normalizers(obs_stats, None, None) if zero is None else Normalizers(
        obs_stats, RunningStats(jnp.float32(0.0), jnp.float32(1.0), jnp.float32(1e-4)), zero)


def update_normalizers(norm: Normalizers, obs, reward, done, gamma) -> Normalizers:
    """Fold one step of N envs (new observations, rewards, episode ends) into the stats."""
    obs_stats = None if norm.obs is None else update_running_stats(norm.obs, obs)
    if norm.reward is None:
        return Normalizers(obs_stats, None, None)
    discounted = norm.discounted_return * gamma + reward
    reward_stats = update_running_stats(norm.reward, discounted)
    return Normalizers(obs_stats, reward_stats, jnp.where(done, 0.0, discounted))


def scale_reward(norm: Normalizers, reward):
    """reward / std(discounted return), clipped to +-10; not centered: its sign is information."""
    if norm.reward is None:
        return reward
    return jnp.clip(reward / jnp.sqrt(norm.reward.var + 1e-8), -10.0, 10.0)


# ── Networks ──────────────────────────────────────────────────────────────────────────────
# A masked action's logit. Finite, so softmax gives it exactly zero probability without the
# inf - inf = NaN that -inf would produce in log-softmax and in its gradient.
MASKED_LOGIT = -1e9
ACTIVATIONS = {"tanh": nn.tanh, "relu": nn.relu}


def orthogonal(scale: float = 1.0):
    """Orthogonal init by Gram-Schmidt: QR's distribution (Haar, with the sign fix) from matmuls
    only, as QR under vmap over seeds is batched LAPACK calls that can deadlock XLA's CPU."""
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


class Torso(nn.Module):
    """The body of actor and critic: for images [H, W, C] (MinAtar) a small CNN (3x3, ReLU)
    first, then hidden layers, with orthogonal(sqrt 2) init throughout."""
    hidden_sizes: tuple[int, ...]
    activation: str
    cnn_channels: tuple[int, ...] = ()

    @nn.compact
    def __call__(self, obs):  # obs [B, *obs_shape] -> [B, hidden_sizes[-1]]
        x = obs.astype(jnp.float32)
        if x.ndim == 4:  # [B, H, W, C]
            for channels in self.cnn_channels:
                x = nn.relu(nn.Conv(channels, (3, 3), kernel_init=orthogonal(math.sqrt(2)))(x))
        x = x.reshape(x.shape[0], -1)
        for width in self.hidden_sizes:
            x = ACTIVATIONS[self.activation](
                nn.Dense(width, kernel_init=orthogonal(math.sqrt(2)))(x))
            self.sow("intermediates", "hidden", x)  # for representation_diagnostics; free otherwise
        return x


class Categorical(struct.PyTreeNode):
    """A categorical policy over A actions, restricted to the legal ones when masked."""
    logits: jax.Array  # [B, A]; masked entries hold MASKED_LOGIT
    mask: jax.Array | None = None  # [B, A], True where legal

    def log_probs(self): return jax.nn.log_softmax(self.logits)
    def sample(self, key): return jax.random.categorical(key, self.logits)
    def mode(self): return jnp.argmax(self.logits, axis=-1)
    def max_prob(self): return jnp.exp(self.log_probs().max(axis=-1))  # 1: deterministic policy

    def log_prob(self, action):
        return jnp.sum(self.log_probs() * jax.nn.one_hot(action, self.logits.shape[-1]), axis=-1)

    def normalized_entropy(self):
        """H / log(legal actions), comparable across states with different numbers of legal
        actions: 1 is uniform over them, 0 certain (and 0 when only one is legal)."""
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

    def mode(self): return self.mean

    def log_prob(self, action):
        """log N(a; mu, sigma) = sum_d -((a - mu) / sigma)^2 / 2 - log sigma - log(2 pi) / 2."""
        z = (action - self.mean) / jnp.exp(self.log_std)
        return jnp.sum(-0.5 * z**2 - self.log_std - 0.5 * jnp.log(2 * jnp.pi), axis=-1)

    def entropy(self):
        per_dim = 0.5 + 0.5 * jnp.log(2 * jnp.pi) + self.log_std
        return jnp.broadcast_to(per_dim.sum(), self.mean.shape[:-1])


class Actor(nn.Module):
    """pi(a | s): a torso and a policy head with small init (0.01), so early actions are even."""
    spec: EnvSpec
    hidden_sizes: tuple[int, ...]
    activation: str
    cnn_channels: tuple[int, ...] = ()
    log_std_init: float = 0.0

    @nn.compact
    def __call__(self, obs, mask=None):  # obs [B, *obs_shape], mask [B, A] or None
        x = Torso(self.hidden_sizes, self.activation, self.cnn_channels)(obs)
        out = nn.Dense(self.spec.num_actions, kernel_init=orthogonal(0.01))(x)
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
        return nn.Dense(1, kernel_init=orthogonal(1.0))(x)[:, 0]


class Agent(NamedTuple):
    """The two networks (static modules; their parameters live in RunnerState.params):
    policy gives pi(. | obs), a Categorical or a Gaussian over actions [B], value V(obs) [B]."""
    actor: Actor
    critic: Critic

    def policy(self, params, obs, mask=None): return self.actor.apply(params["actor"], obs, mask)
    def value(self, params, obs): return self.critic.apply(params["critic"], obs)


def make_agent(config: Config, spec: EnvSpec) -> Agent:
    return Agent(Actor(spec, config.hidden_sizes, config.activation, config.cnn_channels,
                       config.log_std_init),
                 Critic(config.hidden_sizes, config.activation, config.cnn_channels))


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
    """The rollout phase, T steps in N envs (a lax.scan) -> (state, Transitions [T, N, ...] as the
    learner sees them, FinishedEpisodes summed over the episodes that ended, in raw reward)."""
    def env_step(state: RunnerState, _):
        key, action_key, step_key = jax.random.split(state.key, 3)
        obs = normalize(state.norm.obs, state.obs)
        pi = agent.policy(state.params, obs, state.mask)
        action = pi.sample(action_key)
        env_action = action if spec.discrete else jnp.clip(action, spec.action_low,
                                                           spec.action_high)
        step_keys = jax.random.split(step_key, env_action.shape[0])
        next_obs, env_state, reward, terminated, truncated, info = jax.vmap(
            env.step, in_axes=(0, 0, 0, None))(step_keys, state.env_state, env_action, env_params)
        reward = reward.astype(jnp.float32)
        done = terminated | truncated
        norm = update_normalizers(state.norm, next_obs, reward, done, gamma)
        transition = Transition(obs, action, pi.log_prob(action), scale_reward(norm, reward),
                                terminated, truncated,
                                normalize(norm.obs, info["final_observation"]), state.mask)
        returns, lengths = state.episodes.returns + reward, state.episodes.lengths + 1
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
    """Generalized Advantage Estimation (Schulman et al. 2016), one reverse lax.scan over [T, N]
    inputs; next_values[t] is V of step t's true next observation (the final one if it ended):
        delta_t = r_t + gamma (1 - terminated_t) V(s'_t) - V(s_t)
        A_t     = delta_t + gamma lambda (1 - done_t) A_{t+1},  done_t = terminated_t or truncated_t
    Truncation keeps the bootstrap term (the clock stopped, not the episode) but cuts the
    lambda-trace: row t+1 is a new episode. Returns (advantages, advantages + values), [T, N]."""
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
    """Score the rollout with the critic (every obs, and every true next obs: next_obs[t] ==
    obs[t + 1] unless step t ended), compute advantages, flatten [T, N] to [T * N]."""
    T, N = traj.reward.shape
    flat = lambda x: None if x is None else x.reshape(T * N, *x.shape[2:])
    # Two calls, not one on both concatenated: that copy made the standard config 1.3x slower.
    values = agent.value(params, flat(traj.obs)).reshape(T, N)
    next_values = agent.value(params, flat(traj.next_obs)).reshape(T, N)
    terminated = traj.terminated if bootstrap_truncation else traj.terminated | traj.truncated
    advantages, targets = compute_gae(traj.reward, values, next_values, terminated,
                                      traj.truncated, gamma, gae_lambda)
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
    """The PPO objective on one minibatch, as a loss to minimise. Returns (loss, LossInfo):
        ratio  = pi(a|s) / pi_old(a|s)
        L_clip = -E[min(ratio A, clip(ratio, 1 - eps, 1 + eps) A)]     (A normalized per minibatch)
        L_V    = E[(V(s) - R)^2] / 2          (clipped: max of the plain and clipped squares)
        loss   = L_clip + vf_coef L_V - ent_coef H[pi]      (the entropy is a bonus: minus sign)"""
    pi = agent.policy(params, batch.obs, batch.mask)
    log_ratio = pi.log_prob(batch.action) - batch.log_prob
    ratio = jnp.exp(log_ratio)
    adv = (batch.advantage - batch.advantage.mean()) / (batch.advantage.std() + 1e-8)
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
    kl = (ratio - 1.0) - log_ratio  # k3 estimator of KL(pi_old || pi) (Schulman 2020): >= 0
    clip_fraction = jnp.mean(jnp.abs(ratio - 1.0) > clip_eps)
    discrete = isinstance(pi, Categorical)
    max_prob = pi.max_prob().mean() if discrete else jnp.nan
    entropy_normalized = pi.normalized_entropy().mean() if discrete else jnp.nan
    return loss, LossInfo(loss, policy_loss, value_loss, entropy, kl.mean(), kl.max(),
                          clip_fraction, max_prob, entropy_normalized)


# ── Update ────────────────────────────────────────────────────────────────────────────────
def make_optimizer(max_grad_norm, optimizer: str = "adam"):
    """Global-norm clipping, then Adam's scaling (eps 1e-5) or, for plain SGD, nothing more.
    update_minibatch applies the learning rate, so it can follow a schedule and be traced."""
    scale = optax.scale_by_adam(eps=1e-5) if optimizer == "adam" else optax.identity()
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), scale)


class UpdateInfo(NamedTuple):
    """Per-minibatch statistics of one optimizer step."""
    loss: LossInfo
    grad_norm: jax.Array  # global norm before clipping
    clipped: jax.Array  # whether global-norm clipping shrank this step


def update_minibatch(agent: Agent, hp: HParams, config: Config, ent_coef, lr, train: tuple,
                     batch: Batch):
    """One optimizer step on one minibatch. `train` is (params, opt_state)."""
    params, opt_state = train
    grads, info = jax.grad(ppo_loss, has_aux=True)(
        params, agent, batch, hp.clip_eps, hp.vf_coef, ent_coef, config.clip_value_loss)
    optimizer = make_optimizer(hp.max_grad_norm, config.optimizer)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, jax.tree.map(lambda u: -lr * u, updates))
    grad_norm = optax.tree.norm(grads)
    return (params, opt_state), UpdateInfo(info, grad_norm, grad_norm > hp.max_grad_norm)


def update_epoch(agent: Agent, hp: HParams, config: Config, ent_coef, lr, train: tuple,
                 batch: Batch, key):
    """One pass in shuffled minibatches (a lax.scan): new (params, opt_state), UpdateInfo [M]."""
    permutation = jax.random.permutation(key, config.batch_size)
    minibatches = jax.tree.map(lambda x: x[permutation].reshape(  # [M, B, ...]
        config.num_minibatches, config.minibatch_size, *x.shape[1:]), batch)
    minibatch_step = functools.partial(update_minibatch, agent, hp, config, ent_coef, lr)
    return jax.lax.scan(minibatch_step, train, minibatches)


def update(agent: Agent, hp: HParams, config: Config, ent_coef, lr, train: tuple,
           batch: Batch, key):
    """The learning phase: update_epochs passes (a lax.scan), lax.cond skipping those after one
    whose mean approx KL exceeds target_kl -> (params, opt_state), UpdateInfo [epochs, M], ran."""
    epoch = functools.partial(update_epoch, agent, hp, config, ent_coef, lr)
    epoch_keys = jax.random.split(key, config.update_epochs)
    if config.target_kl is None:
        train, infos = jax.lax.scan(lambda t, k: epoch(t, batch, k), train, epoch_keys)
        return train, infos, jnp.ones(config.update_epochs, bool)

    def epoch_step(carry, epoch_key):
        train, stopped = carry
        skipped = lambda t: (t, jax.tree.map(jnp.zeros_like, info_shape))
        train, info = jax.lax.cond(stopped, skipped, lambda t: epoch(t, batch, epoch_key), train)
        ran = ~stopped
        stopped = stopped | (info.loss.approx_kl.mean() > hp.target_kl)
        return (train, stopped), (info, ran)
    info_shape = jax.eval_shape(epoch, train, batch, epoch_keys[0])[1]
    (train, _), (infos, ran) = jax.lax.scan(epoch_step, (train, jnp.array(False)), epoch_keys)
    return train, infos, ran


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
                state: RunnerState, diagnose=None):
    """One PPO iteration: rollout, advantages, learning phase -> (state, scalar metrics).
    `diagnose` (make_diagnose, below the boundary) may add costlier metrics PPO does not need."""
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
    if diagnose is not None:
        state, more = diagnose(state, batch, params_before, ent_coef)
        metrics.update(more)
    return state, metrics


def summarize_update(spec: EnvSpec, finished: FinishedEpisodes, batch: Batch,
                     infos: UpdateInfo, ran, params_before, params_after, lr, ent_coef) -> dict:
    """One update's scalar metrics, losses averaged over all minibatches of the epochs that ran."""
    weights = jnp.broadcast_to(ran[:, None], infos.grad_norm.shape)  # [epochs, M]
    means = jax.tree.map(lambda x: jnp.sum(x * weights) / jnp.sum(weights), infos)
    episodes = jnp.maximum(finished.count, 1)
    metrics = {
        "episode_return": jnp.where(finished.count > 0, finished.return_sum / episodes, jnp.nan),
        "episode_length": jnp.where(finished.count > 0, finished.length_sum / episodes, jnp.nan),
        "episodes_finished": finished.count,
        "policy_loss": means.loss.policy_loss, "value_loss": means.loss.value_loss,
        "entropy": means.loss.entropy, "approx_kl": means.loss.approx_kl,
        "approx_kl_max": jnp.max(jnp.where(ran[:, None], infos.loss.approx_kl_max, 0.0)),
        "clip_fraction": means.loss.clip_fraction,
        "explained_variance": 1.0 - jnp.var(batch.target - batch.value) / jnp.var(batch.target),
        "value_rmse": jnp.sqrt(jnp.mean(jnp.square(batch.value - batch.target))),
        "target_rms": jnp.sqrt(jnp.mean(jnp.square(batch.target))),  # the scale V predicts
        "advantage_mean": batch.advantage.mean(),  # before per-minibatch normalization
        "advantage_std": batch.advantage.std(),
        "grad_norm": means.grad_norm, "grad_clip_fraction": means.clipped,
        "learning_rate": lr, "ent_coef": ent_coef, "epochs_run": ran.sum()}
    if spec.discrete:
        metrics.update(max_prob=means.loss.max_prob,
                       entropy_normalized=means.loss.entropy_normalized)
    for net in ("actor", "critic"):  # what the optimizer actually did to each network
        step = optax.tree.norm(jax.tree.map(jnp.subtract, params_after[net], params_before[net]))
        metrics.update({f"{net}_update_norm": step,
                        f"{net}_update_ratio": step / optax.tree.norm(params_before[net]),
                        f"{net}_param_norm": optax.tree.norm(params_after[net])})
    return metrics


def make_train(config: Config):
    """Build train(key, hparams=None) -> (RunnerState, metrics {name: [U]}) for one seed. It is
    pure: jit it, vmap it over keys (seeds) and over HParams (a grid). Memory is O(U)."""
    validate_config(config)
    env, env_params, spec, agent = make_setup(config)

    def train(key, hparams: HParams | None = None):
        hp = config.hparams() if hparams is None else hparams
        state = init_runner_state(config, env, env_params, spec, agent, hp, key)
        diagnose = make_diagnose(config, agent, hp, spec.discrete) if config.diagnostics else None
        step = functools.partial(update_step, config, env, env_params, spec, agent, hp,
                                 diagnose=diagnose)
        return jax.lax.scan(lambda s, _: step(s), state, length=config.num_updates)
    return train


def make_key(seed: int):
    """A Philox key: a few fused ops on every backend (the GPU's generator), where threefry is a
    loop on CPU (5-9 % more steps/s); under vmap, seed i draws the same numbers as alone."""
    return jax.random.key(seed, impl=KEY_IMPL)


def seed_keys(config: Config):
    """The key of each run, [num_runs]: every sweep setting gets the same num_seeds keys."""
    return split_seed(config.seed, config.num_seeds, config.num_runs)


@functools.partial(jax.jit, static_argnums=(1, 2))
def split_seed(seed, num_seeds: int, num_runs: int):
    keys = jax.random.split(make_key(seed), num_seeds)  # one program, not a few op by op
    return keys[jnp.arange(num_runs) % num_seeds]


# ════════════════ above: PPO, nothing else · below: running it as a program ════════════════
# ── Diagnostics (--diagnostics) ──────────────────────────────────────────────────────────
# Costlier looks inside an update, each at a slice of it; without --diagnostics, none at all.
PROBE_SIZE = 128  # observations of the fixed probe batch
OCCASIONAL_EVERY = 10  # per-term gradients and the probe batch, the costliest: every 10th update
EXPLORE_SAMPLES = 32  # samples whose policy gradients are taken one by one
DORMANT_TAU = 0.025  # Sokar et al. 2023: a unit whose normalized activity is <= tau is dormant
SATURATED = 0.99  # a tanh output beyond +-0.99 passes almost no gradient


def subsample(x, n: int):
    """n rows of x spread evenly over it (rollout order is time-major: spread over time)."""
    return x[jnp.arange(min(n, x.shape[0])) * (x.shape[0] // min(n, x.shape[0]))]


def loss_term_grad_norms(agent: Agent, params, minibatch: Batch, hp: HParams, ent_coef,
                         clip_value_loss: bool) -> dict:
    """Gradient norm of each loss term as weighted (policy, vf_coef x value, ent_coef x entropy)
    on the network it moves, at the update's first minibatch and starting parameters."""
    def terms(p):
        info = ppo_loss(p, agent, minibatch, hp.clip_eps, hp.vf_coef, ent_coef, clip_value_loss)[1]
        return {"policy": info.policy_loss, "value": hp.vf_coef * info.value_loss,
                "entropy": ent_coef * info.entropy}
    grads = jax.jacrev(terms)(params)  # {term: grads of the term, like params}
    # Actor and critic share no parameters: the other three term-network pairs are zero.
    return {"grad_norm_policy_actor": optax.tree.norm(grads["policy"]["actor"]),
            "grad_norm_entropy_actor": optax.tree.norm(grads["entropy"]["actor"]),
            "grad_norm_value_critic": optax.tree.norm(grads["value"]["critic"])}


def exploration_split(agent: Agent, params, batch: Batch, n: int = EXPLORE_SAMPLES) -> dict:
    """Do exploiting samples move the policy less? Mean per-sample |A| ||grad log pi(a|s)|| on n
    samples, over greedy (most likely) and over other actions, and how many of each."""
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
    """Per network on the probe batch: the dormant (ReLU; Sokar et al. 2023) or saturated (tanh)
    unit fraction, and the last layer's feature rank (tr C)^2 / tr(C^2), C its covariance: from
    1 to the width, with no eigendecomposition, so no LAPACK call (a test bans them)."""
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


def make_diagnose(config: Config, agent: Agent, hp: HParams, discrete: bool):
    """update_step's diagnose(state, batch, params_before, ent_coef) -> (state, metrics)."""
    def diagnose(state: RunnerState, batch: Batch, params_before, ent_coef):
        # The probe batch: the first rollout's observations, fixed for the whole run.
        probe = jnp.where(state.update == 1, subsample(batch.obs, PROBE_SIZE), state.probe)
        first = jax.tree.map(lambda x: x[:config.minibatch_size], batch)

        def occasional():  # every OCCASIONAL_EVERY updates, starting with the first
            return {**loss_term_grad_norms(agent, params_before, first, hp, ent_coef,
                                           config.clip_value_loss),
                    **representation_diagnostics(agent, state.params, probe, config.activation)}
        nan = {k: jnp.full(v.shape, jnp.nan, v.dtype)
               for k, v in jax.eval_shape(occasional).items()}
        metrics = jax.lax.cond(state.update % OCCASIONAL_EVERY == 1, occasional, lambda: nan)
        if discrete:
            metrics.update(exploration_split(agent, params_before, batch))
        return state.replace(probe=probe), metrics
    return diagnose


# ── Runner ────────────────────────────────────────────────────────────────────────────────
# The CLI trains S runs (seeds, or sweep settings) side by side with make_train's update_step in
# jitted chunks (state on the device); between them a Python loop shows progress, writes metrics
# and checkpoints, notices Ctrl-C. CHUNK_STEPS env steps per chunk: at the standard config 128
# updates (0.25 s on a CPU), whose calls cost 0.3 % of training (benchmarks/bench.py chunks).
CHUNK_STEPS = 1 << 16
# A NaN or inf in any stops training at the last good state (a param norm is finite iff all are).
GUARDED = ("policy_loss", "value_loss", "entropy", "approx_kl", "grad_norm",
           "actor_param_norm", "critic_param_norm")
# config.divergence_guard also stops on these: a policy that moved ~1000x farther than PPO's
# usual 0.01, or a critic whose squared error is 10,000x its targets' own mean square.
KL_LIMIT, VALUE_LOSS_LIMIT = 10.0, 1e4
PROBLEMS = (*(f"{name} became NaN or infinite" for name in GUARDED),
            f"approx_kl passed {KL_LIMIT:g}",
            f"value_loss passed {VALUE_LOSS_LIMIT:g} times the mean square of its targets")

def hparam_axes(hp: HParams) -> HParams:
    """vmap axes of HParams: 0 for the fields a sweep gives per run, None for scalars."""
    return HParams(*(0 if jnp.ndim(v) else None for v in hp))


def updates_done(state: RunnerState) -> int:  # of a batched RunnerState: all runs move together
    return int(np.asarray(state.update)[0])


def make_one_update(config: Config, setup: Setup):
    """(hp, state [S]) -> (state, metrics {name: [S]}): update_step for every run, and eval."""
    env, env_params, spec, agent = setup

    def step(hp: HParams, state: RunnerState):
        diagnose = make_diagnose(config, agent, hp, spec.discrete) if config.diagnostics else None
        return update_step(config, env, env_params, spec, agent, hp, state, diagnose)

    def one_update(hp: HParams, state: RunnerState):
        # One counter for all runs, unbatched so conditions on it stay branches, not selects.
        state = state.replace(update=state.update[0])
        if config.num_runs == 1:  # vmap over one run would still batch every matmul
            alone = jax.tree.map(lambda x: x[0], state.replace(update=None))
            hp_alone = HParams(*(v[0] if jnp.ndim(v) else v for v in hp))
            state, metrics = step(hp_alone, alone.replace(update=state.update))
            state, metrics = jax.tree.map(lambda x: x[None], (state, metrics))
        else:
            state_axes = jax.tree.map(lambda _: 0, state).replace(update=None)
            state, metrics = jax.vmap(step, in_axes=(hparam_axes(hp), state_axes))(hp, state)
        if config.eval_every:
            done = state.update[0]
            due = (done % config.eval_every == 0) | (done == config.num_updates)
            keys = jax.random.split(jax.random.fold_in(make_key(config.seed), done),
                                    config.num_runs)
            evaluated = lambda: tuple(r.mean(axis=-1) for r in evaluate_runs(
                setup, state, keys, config.eval_episodes))
            evals = jax.lax.cond(due, evaluated, lambda: (jnp.full(config.num_runs, np.nan),) * 2)
            metrics.update(eval_return=evals[0], eval_return_stochastic=evals[1])
        return state, metrics
    return one_update


class Runner(NamedTuple):
    """Jitted init(keys [S], hparams=None) -> RunnerState [S], and chunk(state, stop_at,
    hparams=None) -> (state, metrics {name: [K, S]}, bad): up to K updates before `stop_at`,
    stopping at the first non-finite GUARDED metric, not kept (bad: its index, else -1; rows
    not run are zeros). HParams are scalars or [S]; a resumed run repeats one bitwise."""
    init: Any
    chunk: Any
    chunk_updates: int


def make_runner(config: Config) -> Runner:
    validate_config(config)
    setup = make_setup(config)
    one_update = make_one_update(config, setup)
    chunk_updates = max(1, min(config.num_updates,
                               CHUNK_STEPS // (config.batch_size * config.num_runs)))

    @jax.jit
    def init(keys, hparams: HParams | None = None) -> RunnerState:
        hp = config.hparams() if hparams is None else hparams
        init_one = functools.partial(init_runner_state, config, *setup)
        state = jax.vmap(init_one, in_axes=(hparam_axes(hp), 0))(hp, keys)
        # Strong dtypes (gymnax's time counters start weak), as loaded ones: one chunk for both.
        return jax.tree.map(lambda x: jax.lax.convert_element_type(x, x.dtype), state)

    @jax.jit
    def chunk(state: RunnerState, stop_at, hparams: HParams | None = None):
        hp = config.hparams() if hparams is None else hparams
        no_metrics = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                                  jax.eval_shape(one_update, hp, state)[1])

        def guarded_update(state: RunnerState, bad):
            new_state, metrics = one_update(hp, state)
            sane = [jnp.isfinite(metrics[k]).all() for k in GUARDED]  # in PROBLEMS' order
            if config.divergence_guard:
                sane += [(metrics["approx_kl"] <= KL_LIMIT).all(), (metrics["value_loss"] <= (
                    VALUE_LOSS_LIMIT * jnp.square(metrics["target_rms"]) + 1e-8)).all()]
            sane = jnp.stack(sane)
            state = jax.lax.cond(sane.all(), lambda: new_state, lambda: state)
            return state, metrics, jnp.where(sane.all(), bad, jnp.argmin(sane).astype(jnp.int32))

        def chunk_step(carry, _):
            state, bad = carry
            active = (state.update[0] < stop_at) & (bad < 0)
            state, metrics, bad = jax.lax.cond(active, guarded_update,
                                               lambda s, b: (s, no_metrics, b), state, bad)
            return (state, bad), metrics
        (state, bad), metrics = jax.lax.scan(chunk_step, (state, jnp.int32(-1)),
                                             length=chunk_updates)
        return state, metrics, bad
    return Runner(init, chunk, chunk_updates)


def run_chunk(chunk, state: RunnerState, stop_at: int, hparams: HParams | None = None):
    """Call a Runner's chunk (or its compiled form): (state, NumPy {name: [S, n run]}, bad)."""
    outputs = chunk(state, jnp.int32(stop_at), *([] if hparams is None else [hparams]))
    return chunk_results(outputs, updates_done(state))


def chunk_results(outputs, before: int):
    """A chunk's outputs, waited for: (state, NumPy {name: [S, n run]}, bad), `before` updates
    having been done when it started."""
    state, metrics, bad = outputs
    ran = updates_done(state) - before
    return state, {k: np.asarray(v)[:ran].T for k, v in metrics.items()}, int(bad)


def train_runs(config: Config, runner: Runner, state: RunnerState, stop_at: int | None = None,
               hparams: HParams | None = None):
    """Chunks to update `stop_at` (default: the end) or a non-finite one: (state, {[S, n]}, bad)."""
    stop_at = config.num_updates if stop_at is None else stop_at
    parts, bad = [], -1
    while updates_done(state) < stop_at and bad < 0:
        state, metrics, bad = run_chunk(runner.chunk, state, stop_at, hparams)
        parts.append(metrics)
    return state, concat_metrics(parts), bad


def concat_metrics(parts: list[dict]) -> dict:  # chunks' {name: [S, n]} joined along updates
    return {k: np.concatenate([p[k] for p in parts], axis=1) for k in parts[0]} if parts else {}


class CtrlC:
    """SIGINT as a context manager: once training, a first Ctrl-C stops after the chunk, which is
    saved; otherwise it aborts (files are written atomically). Presses are counted, and those
    Python drops in a garbage-collector callback (JAX has one) are hidden, not lost."""
    presses, training, previous = 0, False, None  # Ctrl-Cs so far; whether training; restore

    def __enter__(self) -> CtrlC:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self.handler), sys.unraisablehook
            sys.unraisablehook = lambda dropped: None if issubclass(
                dropped.exc_type, KeyboardInterrupt) else self.previous[1](dropped)
        return self

    def __exit__(self, *exc_info) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous[0])
            sys.unraisablehook = self.previous[1]

    def handler(self, signum, frame):
        self.presses += 1
        if not (self.training and self.presses == 1):
            raise KeyboardInterrupt
        print("\nstopping after this chunk to save a checkpoint (Ctrl-C again to abort)",
              file=sys.stderr)

    def start_training(self) -> None:
        """From here on the first Ctrl-C stops gracefully; raises one that was dropped."""
        if self.presses:
            raise KeyboardInterrupt
        self.training = True


# ── Diagnosis (python ppo_jax.py diagnose RUN; also printed once each during training) ──────
# Thresholds from measured runs: the CartPole preset's approx KL peaked at 0.02 over 1,953
# updates and its clip fraction at 0.19; notebook 03's collapsing runs sat at KL ~0.9 late on.
KL_WARN, SUSTAINED = 0.05, 3  # approx KL above KL_WARN for SUSTAINED updates in a row
LOW_ENTROPY, GIVEN_BACK = 0.1, 0.2  # normalized entropy; share of its gain the return lost
ALWAYS_CLIPPED, DEAD_UNITS = 0.9, 0.5  # median share of clipped steps; dormant/saturated share


def first_sustained(x: np.ndarray, limit: float, n: int = SUSTAINED) -> np.ndarray:
    """[S]: the first update index of x [S, U] that starts n updates in a row above limit."""
    above = np.nan_to_num(x, nan=0.0) > limit
    if above.shape[1] < n:
        return np.full(len(x), -1)
    rows = np.lib.stride_tricks.sliding_window_view(above, n, axis=1).all(axis=2)
    return np.where(rows.any(axis=1), rows.argmax(axis=1), -1)


def smoothed(x: np.ndarray, width: int = 10) -> np.ndarray:
    """Trailing mean over `width` updates of x [S, U], NaN (no episode ended) left out."""
    filled = np.cumsum(np.nan_to_num(x), axis=1)
    counts = np.cumsum(np.isfinite(x), axis=1)
    shift = lambda c: np.pad(c, ((0, 0), (width, 0)))[:, :-width]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (filled - shift(filled)) / (counts - shift(counts))


class Finding(NamedTuple):
    check: str  # which check fired: "kl", "entropy", "grad_clip", "critic", or a metric's name
    update: int  # the first update (from 1) where it holds, over the runs
    line: str  # the evidence, likely causes and flags to try, in one plain line


def diagnose_metrics(config: Config, metrics: dict) -> list[Finding]:
    """What went wrong in metrics {name: [S, U]}, earliest first; empty for a healthy run."""
    found, lr = [], config.learning_rate

    def add(check: str, first: np.ndarray, text: str) -> None:
        hit = np.flatnonzero(first >= 0)
        if hit.size:
            at = int(first[hit].min()) + 1
            runs = f"{hit.size} of {len(first)} runs"
            found.append(Finding(check, at, f"from update {at} in {runs}: {text}"))
    for name in GUARDED:
        bad = ~np.isfinite(metrics[name])
        add(name, np.where(bad.any(axis=1), bad.argmax(axis=1), -1), f"{name} became NaN or "
            f"infinite; try a lower --learning-rate (now {lr:g}) or --max-grad-norm")
    kl, clip = metrics["approx_kl"], metrics["clip_fraction"]
    add("kl", first_sustained(kl, KL_WARN),
        f"approx KL up to {np.nanmax(kl):.2g} per update (usual <= 0.02), clip fraction up to "
        f"{np.nanmax(clip):.2f}: each update moves the policy too far, which can lock it onto a "
        f"few actions; try --learning-rate {lr / 10:g}, --target-kl 0.02 or fewer --update-epochs")
    if "entropy_normalized" in metrics:
        returns = smoothed(metrics["episode_return"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            start, peak = np.nanmin(returns, axis=1), np.nanmax(returns, axis=1)
            gave_back = peak - returns[:, -1] > GIVEN_BACK * (peak - start)
        low = metrics["entropy_normalized"] < LOW_ENTROPY
        add("entropy", np.where(low.any(axis=1) & gave_back, low.argmax(axis=1), -1),
            f"normalized entropy fell below {LOW_ENTROPY} (nearly deterministic) and the return "
            f"then gave back over {GIVEN_BACK:.0%} of its gain: premature convergence; try "
            "--ent-coef 0.01 (or --ent-coef-final), a lower --learning-rate or --target-kl 0.02")
    clipped = np.nanmedian(metrics["grad_clip_fraction"], axis=1)
    add("grad_clip", np.where(clipped >= ALWAYS_CLIPPED, 0, -1), f"the gradient was clipped "
        f"on {np.max(clipped):.0%} of steps (median): --max-grad-norm, not the learning rate, "
        "sets the step; often an unscaled value loss: try --normalize-reward or --clip-value-loss")
    # The critic: negative explained variance over the second half, with errors of at least
    # 10 % of the targets' size (a solved task's near-constant returns make the variance noise).
    middle = metrics["explained_variance"].shape[1] // 2
    if middle >= 10 and "target_rms" in metrics:
        explained = np.nanmedian(metrics["explained_variance"][:, middle:], axis=1)
        relative = np.nanmedian((metrics["value_rmse"] / metrics["target_rms"])[:, middle:], 1)
        add("critic", np.where((explained < 0) & (relative > 0.1), middle, -1),
            f"the critic explained none of the returns' variance in the second half (explained "
            f"variance {np.min(explained):.2f}): the advantages are mostly noise; try "
            "--normalize-reward, a lower --learning-rate or wider --hidden-sizes")
    for name in [k for k in metrics if k.endswith(("dormant_fraction", "saturated_fraction"))]:
        add(name, first_sustained(metrics[name], DEAD_UNITS, 1), f"{name} above {DEAD_UNITS}: "
            f"the {name.split('_')[0]} lost capacity; try a lower --learning-rate")
    return sorted(found, key=lambda finding: finding.update)


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
    """Return [E] of E fresh episodes, each to its first end or max_steps_in_episode (else 1000),
    deterministic (a Gaussian's mean) or sampled, normalized by frozen `obs_stats` (or None)."""
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


def evaluate_runs(setup: Setup, state: RunnerState, keys, num_episodes: int):
    """Returns of every run's deterministic and stochastic policy: two [S, E] arrays."""
    run = lambda deterministic: jax.vmap(lambda params, stats, key: evaluate(*setup, params,
        stats, key, num_episodes, deterministic))(state.params, state.norm.obs, keys)
    return run(True), run(False)


def policy_of(state: RunnerState, run: int):
    """Run `run`'s parameters and frozen observation statistics (None without them)."""
    return jax.tree.map(lambda x: x[run], (state.params, state.norm.obs))


def load_run(run_dir: str, trust_env_module: bool = False) -> tuple[Config, RunnerState]:
    """A run folder's config and the state [S] of its last checkpoint (see read_config)."""
    config = read_config(run_dir, trust_env_module)
    template = jax.eval_shape(make_runner(config).init, seed_keys(config))
    return config, load_checkpoint(config, run_dir, template)


def load_policy(run_dir: str, seed: int = 0, deterministic: bool = False,
                trust_env_module: bool = False):
    """A trained policy as a NumPy function obs (, mask) -> action for any loop, e.g. `act =
    load_policy("runs/x"); obs, *_ = env.step(act(obs))`; frozen obs normalization, clipping."""
    config, state = load_run(run_dir, trust_env_module)
    if not 0 <= seed < config.num_runs:
        raise ConfigError(f"seed {seed} is not in {run_dir}, which trained runs 0 to "
                          f"{config.num_runs - 1}")
    _, _, spec, agent = make_setup(config)
    params, obs_stats = policy_of(state, seed)
    key, calls = make_key(seed), itertools.count()

    @jax.jit
    def act(obs, mask, key):
        pi = agent.policy(params, normalize(obs_stats, obs[None]), mask)
        action = (pi.mode() if deterministic else pi.sample(key))[0]
        return action if spec.discrete else jnp.clip(action, spec.action_low, spec.action_high)

    def policy(obs, mask=None):
        mask = None if mask is None else jnp.asarray(mask, bool)[None]
        step_key = jax.random.fold_in(key, next(calls))
        action = np.asarray(act(jnp.asarray(obs, jnp.float32), mask, step_key))
        return int(action) if spec.discrete else action
    return policy


# ── Outputs and checkpoints ──────────────────────────────────────────────────────────────
def write_atomic(path: str, data, suffix: str = "") -> None:
    """Write bytes, a str, an iterable of str lines, or what `data(tmp_path)` saves, to a
    temporary file, then rename it: a reader never sees half a file, nor a failed one."""
    tmp = f"{path}.tmp{os.getpid()}{suffix}"
    try:
        if callable(data):
            data(tmp)
        else:
            with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
                f.write(data) if isinstance(data, (bytes, str)) else f.writelines(data)
                f.flush()
                os.fsync(f.fileno())  # on disk before the rename: a power cut keeps one whole
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temporaries(out: str) -> None:
    """Delete the temporary files that write_atomic left in `out` when its process was killed."""
    for name in os.listdir(out):
        match = re.fullmatch(r".+\.tmp(\d+)(\.\w+)?", name)
        if match and int(match[1]) != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(match[1]), 0)  # signal 0 only asks: is that process alive?
                continue
            os.remove(os.path.join(out, name))


def config_json(config: Config) -> str:
    derived = {k: getattr(config, k) for k in ("batch_size", "minibatch_size", "num_updates")}
    return json.dumps({**dataclasses.asdict(config), **derived}, indent=2)


def metrics_jsonl(config: Config, metrics: dict, runs=None, first_update: int = 0):
    """JSON lines, per update from `first_update`, per run (default all) of {name: [S, n]}, NaN as
    null; a sweep adds "setting": 1, "sweep": {"learning_rate": 0.001} ("seed" within it)."""
    host, settings = {k: np.asarray(v).tolist() for k, v in metrics.items()}, config.settings
    for column in range(len(next(iter(host.values()))[0])):
        update = first_update + column
        for run in range(config.num_runs) if runs is None else runs:
            row = {"update": update, "seed": run % config.num_seeds,
                   "env_steps": (update + 1) * config.batch_size}
            if config.sweep:
                row.update(setting=run // config.num_seeds, sweep=settings[run // config.num_seeds])
            for name, values in host.items():
                value = values[run][column]
                row[name] = None if isinstance(value, float) and not math.isfinite(value) else value
            yield json.dumps(row) + "\n"


@contextlib.contextmanager
def new_figure(path: str, **kwargs):
    """A Figure drawn by Agg without pyplot (a notebook keeps its backend), saved atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    yield fig
    for ax in fig.axes:
        ax.xaxis.set_major_formatter(EngFormatter())  # steps as 50k, 1M
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100), ".png")


def plot_learning_curve(config: Config, metrics: dict, path: str) -> None:
    """Mean episode return over seeds with their min-max band; one curve per sweep setting."""
    all_returns = np.asarray(metrics["episode_return"])  # [S, updates done]
    steps = (np.arange(all_returns.shape[1]) + 1) * config.batch_size
    with new_figure(path, figsize=(6, 4)) as fig:
        ax = fig.subplots()
        for index, setting in enumerate(config.settings):
            returns = all_returns[index * config.num_seeds:(index + 1) * config.num_seeds]
            seen = np.isfinite(returns).any(axis=0)
            with warnings.catch_warnings():  # all-NaN columns (no episode ended yet) expected
                warnings.simplefilter("ignore", RuntimeWarning)
                mean, low, high = (f(returns, axis=0) for f in (np.nanmean, np.nanmin, np.nanmax))
            label = ", ".join(f"{k}={v:g}" for k, v in setting.items()) or "mean"
            line, = ax.plot(steps[seen], mean[seen], label=f"{label} ({config.num_seeds} seeds)")
            if config.num_seeds > 1:
                ax.fill_between(steps[seen], low[seen], high[seen], alpha=0.2,
                                color=line.get_color())
        ax.set(xlabel="environment steps per run", ylabel="episode return (band: min to max)",
               title=config.env)
        ax.legend(loc="best", fontsize="small")


# The dashboard of diagnostics.png: (title, metrics drawn together, y scale).
DASHBOARD = (
    ("episode return", ("episode_return",), "linear"),
    ("policy entropy / log(legal actions)", ("entropy_normalized",), "linear"),
    ("approx KL: mean and max", ("approx_kl", "approx_kl_max"), "log"),
    ("clipped share: samples, gradient steps", ("clip_fraction", "grad_clip_fraction"), "linear"),
    ("critic: explained variance", ("explained_variance",), "linear"),
    ("update / weight norm", ("actor_update_ratio", "critic_update_ratio"), "log"))
MAX_FRAMES = 150  # drawing a frame takes ~0.2 s: a GIF shows at most this many, evenly spaced
# The envs gymnax's Visualizer draws (it leaves the others blank).
RENDERABLE = ("CartPole-v1", "Acrobot-v1", "Pendulum-v1", "MountainCar-v0",
              "MountainCarContinuous-v0", "Asterix-MinAtar", "Breakout-MinAtar", "Freeway-MinAtar",
              "Seaquest-MinAtar", "SpaceInvaders-MinAtar", "Catch-bsuite", "Pong-misc",
              "PointRobot-misc", "MetaMaze-misc", "FourRooms-misc")


def plot_diagnostics(config: Config, metrics: dict, path: str) -> None:
    """diagnostics.png: the key learning curves, each the mean over runs (see DASHBOARD)."""
    with new_figure(path, figsize=(13, 6.5)) as fig:
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


def check_renderable(env_id: str) -> None:
    if env_id not in RENDERABLE:
        raise ConfigError(f"gymnax cannot draw {env_id}; --render supports {', '.join(RENDERABLE)}")


def render_episode(config: Config, state: RunnerState, path: str, seed: int = 0, key=None) -> float:
    """GIF of seed `seed`'s deterministic episode on `key` (default make_key(0)); its return."""
    check_renderable(config.env)
    env, env_params, spec, agent = make_setup(config)
    params, obs_stats = policy_of(state, seed)
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
    shown = np.unique(np.linspace(0, length - 1, min(length, MAX_FRAMES)).astype(int))
    frames = [jax.tree.map(lambda x: x[t], states) for t in shown]
    for device in ("SDL_AUDIODRIVER", "SDL_VIDEODRIVER"):  # pygame draws off-screen, silently
        os.environ.setdefault(device, "dummy")
    import matplotlib
    matplotlib.use("Agg")
    from gymnax.visualize import Visualizer
    animation = Visualizer(env, env_params, frames, np.cumsum(rewards)[shown])
    write_atomic(path, animation.animate, ".gif")
    return float(rewards[:length].sum())


def final_returns(metrics: dict) -> np.ndarray:
    """Each seed's return at the last update that finished an episode: [S]."""
    returns = np.asarray(metrics["episode_return"])
    return np.array([r[np.isfinite(r)][-1] if np.isfinite(r).any() else np.nan for r in returns])


def read_metrics(config: Config, path: str, updates: int) -> dict:
    """A resumed run's first `updates` updates of metrics.jsonl, {name: [S, updates]} (null
    -> NaN, later rows dropped); CheckpointError if any is missing."""
    rows = {}
    with contextlib.suppress(FileNotFoundError), open(path) as f:
        for line in f:
            with contextlib.suppress(ValueError):
                row = json.loads(line)
                if isinstance(row, dict) and row.get("update", updates) < updates:
                    run = row.get("setting", 0) * config.num_seeds + row["seed"]
                    rows[row["update"], run] = row
    if len(rows) < updates * config.num_runs:
        raise CheckpointError(f"{path} holds {len(rows)} of the {updates * config.num_runs} rows "
                              "the checkpoint covers; restore it from a copy to resume")
    first = next(iter(rows.values()), {})  # none: a resume from update 0
    names = [k for k in first if k not in ("update", "seed", "setting", "sweep", "env_steps")]
    return {name: np.array([[np.nan if rows[u, r][name] is None else rows[u, r][name]
                             for u in range(updates)] for r in range(config.num_runs)])
            for name in names}


class MetricsLog:
    """Chunks' metrics: appended to metrics.jsonl (and TensorBoard), kept as NumPy for plots."""

    def __init__(self, config: Config, out: str, first_update: int):
        self.config, self.path = config, os.path.join(out, "metrics.jsonl")
        self.parts, self.done, self.writers = [], first_update, []
        if first_update:  # a resume: the metrics so far, and the file cut back to them
            self.parts.append(read_metrics(config, self.path, first_update))
        write_atomic(self.path, metrics_jsonl(config, self.parts[0]) if first_update else "")
        if config.tensorboard:
            from tensorboardX import SummaryWriter
            self.writers = [SummaryWriter(os.path.join(out, "tensorboard", f"seed_{seed}"))
                            for seed in range(config.num_runs)]
            if first_update:  # turned on at a resume: write the earlier updates too
                self.write_tensorboard(self.parts[0], 0)

    def write_tensorboard(self, metrics: dict, first_update: int) -> None:
        """Add updates first_update, first_update + 1, ... of {name: [S, n]}, against steps."""
        for seed, writer in enumerate(self.writers):
            for name, values in metrics.items():
                for update, value in enumerate(np.asarray(values[seed], np.float64), first_update):
                    if math.isfinite(value):  # NaN: no episode ended, or no evaluation
                        writer.add_scalar(name, value, (update + 1) * self.config.batch_size)
            writer.flush()

    def append(self, metrics: dict) -> None:
        """Add {name: [S, n]}: the n updates after the last ones added."""
        with open(self.path, "a") as f:
            f.writelines(metrics_jsonl(self.config, metrics, first_update=self.done))
        self.write_tensorboard(metrics, self.done)
        self.parts.append(metrics)
        self.done += next(iter(metrics.values())).shape[1]

    def metrics(self) -> dict:
        """Every update's {name: [S, n]} so far (the parts are joined once, then kept joined)."""
        self.parts = [concat_metrics(self.parts)] if len(self.parts) > 1 else self.parts
        return self.parts[0] if self.parts else {}

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


# A checkpoint: every run's RunnerState (params, optimizer, counter, normalizers, env states, keys,
# episodes) in msgpack, no pickle, so loading runs no code; metrics.jsonl is written first.
CHECKPOINT = "checkpoint.msgpack"
CHECKPOINT_FORMAT = 4  # 4: a SHA-256 of the body travels with it; 3: no hash
# Fields that say how to run, not what to train: they may differ between a run and its resume.
RUN_CONTROL = ("out", "quiet", "compile_cache", "save_every", "tensorboard", "resume",
               "divergence_guard", "trust_env_module")
CACHE_MIN_COMPILE_SECONDS = 0.5  # enable_compile_cache: quicker compiles are not worth a file


class CheckpointError(ConfigError):
    """A run folder or checkpoint that cannot be used. The message names the fix."""


def is_key(x) -> bool: return jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def keys_to_data(tree):
    """Typed PRNG keys -> their raw uint32 data, which msgpack can carry."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if is_key(x) else x, tree)


def save_checkpoint(config: Config, out: str, state: RunnerState) -> None:
    """Write the state and the config it trains with, atomically (write_atomic)."""
    host = jax.tree.map(np.asarray, keys_to_data(state))
    train_config = {k: list(v) if isinstance(v, tuple) else v
                    for k, v in dataclasses.asdict(config).items() if k not in RUN_CONTROL}
    body = serialization.msgpack_serialize({"format": CHECKPOINT_FORMAT, "config": train_config,
                                            "state": serialization.to_state_dict(host)})
    write_atomic(os.path.join(out, CHECKPOINT), serialization.msgpack_serialize(
        {"sha256": hashlib.sha256(body).hexdigest(), "body": body}))  # any flipped byte: refused


def load_checkpoint(config: Config, run_dir: str, template: RunnerState) -> RunnerState:
    """run_dir's checkpoint in the structure of `template` (eval_shape of Runner.init)."""
    path = os.path.join(run_dir, CHECKPOINT)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist; resume or evaluate a run that saved one")
    with open(path, "rb") as f:  # an OSError here (say, no permission) is no corruption
        data = f.read()
    try:
        sealed = serialization.msgpack_restore(data)
        if hashlib.sha256(sealed["body"]).hexdigest() != sealed["sha256"]:
            raise ValueError
        payload = serialization.msgpack_restore(sealed["body"])
        saved_config, state, version = payload["config"], payload["state"], payload["format"]
        if not (isinstance(saved_config, dict) and isinstance(state, dict)):
            raise TypeError
    except Exception:
        raise CheckpointError(f"{path} is corrupt or truncated; use an intact copy or train "
                              "again") from None
    if version != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {version!r}, and this ppo_jax.py "
                              f"reads format {CHECKPOINT_FORMAT}; use the version that wrote it")
    for name, value in dataclasses.asdict(config).items():
        saved = saved_config.get(name)
        saved = tuple(saved) if isinstance(saved, list) else saved
        if name not in RUN_CONTROL and saved != value:
            raise CheckpointError(f"{path} was trained with {name}={saved!r} but {run_dir}"
                                  f"/config.json says {value!r}; it belongs to another run")
    want = jax.eval_shape(keys_to_data, template)
    try:
        loaded = serialization.from_state_dict(want, state)
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{path} does not fit this version of ppo_jax.py; train "
                              "again") from None
    for (where, w), x in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(loaded)):
        if np.shape(x) != w.shape or np.asarray(x).dtype != w.dtype:
            raise CheckpointError(f"{path} holds {jax.tree_util.keystr(where)} of shape "
                                  f"{np.shape(x)} where {w.shape} is expected; it belongs to "
                                  "another run")
    if not all(np.isfinite(x).all() for x in jax.tree.leaves(loaded.params)):
        raise CheckpointError(f"{path} holds non-finite parameters; use an earlier copy")
    return jax.tree.map(lambda t, x: jax.random.wrap_key_data(x, impl=KEY_IMPL) if is_key(t)
                        else jnp.asarray(x), template, loaded)


def save_params(out: str, params) -> None:
    """params.msgpack (flax msgpack of {"actor", "critic"}, every leaf [S, ...]) and its
    SHA-256 in params.msgpack.sha256, in `sha256sum -c` format."""
    data = serialization.to_bytes(jax.device_get(params))
    write_atomic(os.path.join(out, "params.msgpack"), data)
    write_atomic(os.path.join(out, "params.msgpack.sha256"),
                 f"{hashlib.sha256(data).hexdigest()}  params.msgpack\n")


def load_params(run_dir: str) -> dict:
    """A finished run's params.msgpack as nested NumPy arrays, checked against its SHA-256."""
    path = os.path.join(run_dir, "params.msgpack")
    try:
        with open(path, "rb") as f, open(path + ".sha256") as digest:
            data, expected = f.read(), digest.read().split()[:1]
    except FileNotFoundError as error:
        raise CheckpointError(f"{error.filename} does not exist; load the parameters of a run "
                              "that finished (or its checkpoint, with load_run)") from None
    if [hashlib.sha256(data).hexdigest()] != expected:
        raise CheckpointError(f"{path} does not match {path}.sha256: it is corrupt or truncated; "
                              "use an intact copy, or the same parameters from load_run")
    return serialization.msgpack_restore(data)


def read_config(run_dir: str, trust_env_module: bool = False) -> Config:
    """The Config a run folder was trained with (its config.json). A folder is data: an env
    given as 'module:Class' is refused unless `trust_env_module`, as importing runs code."""
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
    if ":" in config.env and not trust_env_module:
        raise CheckpointError(f"{path} names the env {config.env}, and importing its module runs "
                              "that module's code; if you trust this folder, add "
                              "--trust-env-module")
    return config


# ── CLI ───────────────────────────────────────────────────────────────────────────────────
def parse_flags(cls, argv: list[str], **kwargs):
    """tyro.cli, its boxed error turned into a ConfigError: the first section after the title."""
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
    sections = [[]]
    for line in captured.getvalue().splitlines():
        text = line.strip().strip("│╭╮╰╯").strip()
        if text.startswith("For full helptext"):
            break
        if text.startswith("─") or (text and set(text) <= set("-")):  # title bar or rule
            sections.append([])
        elif text:
            sections[-1].append(text)
    # A box in UTF-8; in ASCII, sections[0] is the title above a rule of '-' (or nothing).
    message = " ".join(next((s for s in sections[1:] if s), sections[0]))
    raise ConfigError(f"{message or 'could not parse the flags'} (see --help)")


def parse_config(argv: list[str]) -> Config:
    """Flags -> Config. `--env X` picks the preset first, so explicit flags override it.
    `--resume DIR` starts from DIR's config.json instead; only run-control flags may change."""
    def flag_value(flag: str) -> str | None:  # given as `--flag v` or `--flag=v`
        for i, arg in enumerate(argv):
            if arg == flag and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(flag + "="):
                return arg.partition("=")[2]
        return None
    resume = flag_value("--resume")
    if resume is not None:
        trusted = "--trust-env-module" in argv
        default = dataclasses.replace(read_config(resume, trusted), out=resume, resume=resume)
    else:
        default = preset_config(flag_value("--env") or Config.env)
    config = parse_flags(Config, argv, default=default, description=__doc__.split("\n")[0])
    if resume is not None:
        if config.out != resume:
            raise ConfigError(f"--resume writes into {resume}; drop --out")
        changed = [f.name for f in dataclasses.fields(Config) if f.name not in RUN_CONTROL
                   and getattr(config, f.name) != getattr(default, f.name)]
        if changed:
            raise ConfigError(f"--resume continues {resume} with its own settings; drop "
                              f"--{changed[0].replace('_', '-')} (only run-control flags such "
                              "as --quiet, --save-every or --tensorboard may change)")
    return config


def create_out_dir(config: Config) -> str:
    """Create the output folder, or raise ConfigError without leaving anything behind."""
    name = config.env.replace(":", ".").replace("/", ".")
    out = config.out or os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ConfigError(f"--out {out} already exists and is not an empty folder; "
                          "pick a new folder so no earlier run is overwritten")
    missing, parent = [], os.path.abspath(out)
    while not os.path.exists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    try:
        os.makedirs(out, exist_ok=True)
        write_atomic(os.path.join(out, ".write_test"), "")
        os.remove(os.path.join(out, ".write_test"))
    except OSError as error:
        for path in filter(os.path.isdir, missing):
            os.rmdir(path)
        raise ConfigError(f"cannot write to --out {out} ({error.strerror}); "
                          "pick a folder you can write to") from None
    return out


def device_memory() -> int | None:
    """Bytes the default device can hold: its allocator's limit (GPU), else available RAM."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return stats["bytes_limit"]
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def check_memory(config: Config, *compiled) -> None:
    """Refuse, before they run, programs that need more memory than the device has: XLA's own
    count of each one's arguments, outputs and temporaries (rollout, minibatches, states)."""
    analyses = [a for a in (program.memory_analysis() for program in compiled) if a is not None]
    need = max((a.argument_size_in_bytes + a.output_size_in_bytes + a.temp_size_in_bytes
                for a in analyses), default=0)
    limit = device_memory()
    if limit and need > limit:
        raise ConfigError(f"{config.num_runs} run(s) x {config.num_envs} envs x "
                          f"{config.num_steps} steps need about {need / 2**30:.1f} GiB, and the "
                          f"{jax.default_backend()} has {limit / 2**30:.1f} GiB free; lower "
                          "--num-envs, --num-steps or --num-seeds")


def enable_compile_cache() -> None:
    """JAX's persistent cache (1 GiB, LRU): a second identical run loads instead of compiling."""
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                         "ppo_jax")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_SECONDS)
    jax.config.update("jax_compilation_cache_max_size", 1 << 30)  # evicts with filelock


def training_loop(config: Config, out: str, runner: Runner, state: RunnerState, log: MetricsLog,
                  ctrl_c: CtrlC):
    """Run chunks to the end, a non-finite or diverging update, or Ctrl-C, with progress and
    checkpoints: (state, problem or None). Each chunk is dispatched before the host handles the
    last one's metrics and checkpoint, so the device does not wait for the host."""
    from tqdm import tqdm
    label = config.env + (f" x{config.num_runs}" if config.num_runs > 1 else "")
    bar = tqdm(total=config.num_updates * config.batch_size, unit="step", unit_scale=True,
               initial=log.done * config.batch_size, dynamic_ncols=True, file=sys.stderr,
               desc=label, disable=config.quiet)

    def launch(state: RunnerState, done: int):  # (updates done at its end, unless one fails)
        return min(config.num_updates, done + runner.chunk_updates), runner.chunk(
            state, config.num_updates)
    problem, running, warned = None, launch(state, log.done), set()
    with contextlib.closing(bar):
        while running:
            end, outputs = running
            go_on = end < config.num_updates and not ctrl_c.presses
            running = launch(outputs[0], end) if go_on else None  # the device goes on meanwhile
            done_before = log.done
            state, metrics, bad = chunk_results(outputs, done_before)
            if bad >= 0:  # the next chunk, already dispatched, is dropped
                problem, running = f"{PROBLEMS[bad]} in update {updates_done(state) + 1}", None
            if metrics["episode_return"].size:
                log.append(metrics)
                findings = [] if config.quiet else diagnose_metrics(config, log.metrics())
                for finding in findings:
                    if finding.check not in warned:
                        warned.add(finding.check)
                        bar.write(f"warning: {finding.line} (python ppo_jax.py diagnose {out})",
                                  sys.stderr)
                bar.update(metrics["episode_return"].shape[1] * config.batch_size)
                returns = metrics["episode_return"][:, -1]
                if np.isfinite(returns).any():
                    spread = f" (min {np.nanmin(returns):.1f})" if returns.size > 1 else ""
                    bar.set_postfix_str(f"return {np.nanmean(returns):.1f}{spread}")
            every = config.save_every
            if running and every and log.done // every > done_before // every:  # one was due
                save_checkpoint(config, out, state)
    return state, problem


def train_and_save(config: Config, out: str, start: float) -> int:
    """Compile, train, write every output (checkpoint, parameters, plots, metrics per sweep
    setting), print the summary. Exit code: 0 done, 130 Ctrl-C (checkpointed), 1 a NaN or a
    diverged update (the last good state checkpointed)."""
    with CtrlC() as ctrl_c:
        t0 = time.perf_counter()
        runner, keys = make_runner(config), jax.eval_shape(lambda: seed_keys(config))
        template = jax.eval_shape(runner.init, keys)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:  # init compiles beside the chunk
            init = None if config.resume else pool.submit(lambda: runner.init.lower(keys).compile())
            runner = runner._replace(chunk=runner.chunk.lower(template, jnp.int32(0)).compile())
            check_memory(config, runner.chunk, *([] if config.resume else [init.result()]))
            state = (load_checkpoint(config, out, template) if config.resume
                     else init.result()(seed_keys(config)))
        if updates_done(state) >= config.num_updates:
            raise CheckpointError(f"{out} finished all {config.num_updates} updates; nothing to "
                                  f"resume (evaluate it with: python ppo_jax.py eval {out})")
        first = updates_done(state)
        log = MetricsLog(config, out, first)
        ctrl_c.start_training()
        t1 = time.perf_counter()
        try:
            state, problem = training_loop(config, out, runner, state, log, ctrl_c)
        finally:
            log.close()
        t2 = time.perf_counter()
        done, metrics = updates_done(state), log.metrics()
        save_checkpoint(config, out, state)
        for index, setting in enumerate(config.settings if config.sweep else []):
            label = ",".join(f"{k}={v:g}" for k, v in setting.items())
            runs = range(index * config.num_seeds, (index + 1) * config.num_seeds)
            write_atomic(os.path.join(out, f"metrics_{label}.jsonl"),
                         metrics_jsonl(config, metrics, runs))
        save_params(out, state.params)
        if metrics:  # at least one update finished
            plot_learning_curve(config, metrics, os.path.join(out, "learning_curve.png"))
            if config.diagnostics:
                plot_diagnostics(config, metrics, os.path.join(out, "diagnostics.png"))
        returns = final_returns(metrics) if metrics else np.full(config.num_runs, np.nan)
        print(f"{config.env}: {config.num_runs} run(s) x {done * config.batch_size:,} steps")
        for index, setting in enumerate(config.settings):
            mine = returns[index * config.num_seeds:(index + 1) * config.num_seeds]
            label = ", ".join(f"{k}={v:g}" for k, v in setting.items())
            print(f"final return per seed{' for ' + label if label else ''}: "
                  + " ".join(f"{r:.1f}" for r in mine)
                  + (f"  (mean {np.nanmean(mine):.1f})" if len(mine) > 1 else ""))
        steps = (done - first) * config.batch_size * config.num_runs
        print(f"{steps / max(t2 - t1, 1e-9):,.0f} steps/s | compile {t1 - t0:.1f} s | "
              f"train {t2 - t1:.1f} s | wall {time.perf_counter() - start:.1f} s | output {out}")
    if problem:
        print(f"error: {problem}; training stopped. The last good state (update {done}) is in "
              f"{os.path.join(out, CHECKPOINT)}; lower --learning-rate or --max-grad-norm and "
              "train again", file=sys.stderr)
        return 1
    if done < config.num_updates:  # stopped by Ctrl-C
        print(f"stopped after update {done} of {config.num_updates}; resume with: "
              f"python ppo_jax.py --resume {out}", file=sys.stderr)
        return 130
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
    trust_env_module: bool = False
    """Let the run's 'module:Class' env import its module (that runs its code)."""


def eval_main(argv: list[str]) -> int:
    """The eval command: mean +- std return per seed, printed and saved to eval.json."""
    import tyro
    if not argv or (all(a.startswith("-") for a in argv) and not {"-h", "--help"} & set(argv)):
        raise ConfigError("eval needs a run folder: python ppo_jax.py eval RUN_DIR")
    args = parse_flags(EvalArgs, argv, config=(tyro.conf.PositionalRequiredArgs,),
                       description=EvalArgs.__doc__)
    if args.episodes <= 0:
        raise ConfigError(f"--episodes must be positive, got {args.episodes}")
    config, state = load_run(args.run_dir, args.trust_env_module)
    if args.render:
        check_renderable(config.env)
    if config.compile_cache:  # as the run was trained: evaluating it again skips compiling
        enable_compile_cache()
    setup, keys = make_setup(config), jax.random.split(make_key(args.seed), config.num_runs)
    evaluate_all = jax.jit(lambda state, keys: evaluate_runs(setup, state, keys, args.episodes))
    results = jax.device_get(evaluate_all(state, keys))
    done = updates_done(state)
    report = {"env": config.env, "episodes": args.episodes, "updates": done, "seeds": []}
    print(f"{config.env} after {done * config.batch_size:,} steps, "
          f"{args.episodes} episodes per seed")
    for seed in range(config.num_runs):
        row = {name: {"mean": float(returns[seed].mean()), "std": float(returns[seed].std())}
               for name, returns in zip(("deterministic", "stochastic"), results)}
        report["seeds"].append({"seed": seed, **row})
        print(f"seed {seed}: " + " | ".join(f"{name} {stats['mean']:.1f} +- {stats['std']:.1f}"
                                           for name, stats in row.items()))
    write_atomic(os.path.join(args.run_dir, "eval.json"), json.dumps(report, indent=2))
    if args.render:
        path = os.path.join(args.run_dir, "policy.gif")
        episode_return = render_episode(config, state, path, key=make_key(args.seed))
        print(f"saved {path} (one deterministic episode of seed 0, return {episode_return:.1f})")
    return 0


def diagnose_main(argv: list[str]) -> int:
    """The diagnose command: what went wrong in a run, from its metrics.jsonl alone."""
    if len(argv) != 1 or argv[0].startswith("-"):
        raise ConfigError("diagnose needs a run folder: python ppo_jax.py diagnose RUN_DIR")
    config = read_config(argv[0], trust_env_module=True)  # reads numbers; imports no env
    path = os.path.join(argv[0], "metrics.jsonl")
    with contextlib.suppress(FileNotFoundError), open(path) as f:
        updates = sum(1 for line in f if line.strip()) // config.num_runs
    metrics = read_metrics(config, path, updates) if updates else {}
    if not metrics:
        raise CheckpointError(f"{path} holds no finished update; diagnose a run that trained")
    findings = diagnose_metrics(config, metrics)
    print(f"{config.env}, {config.num_runs} run(s) x {updates} updates: " +
          (f"{len(findings)} finding(s)" if findings else "nothing looks wrong"))
    for finding in findings:
        print(f"- {finding.line}")
    return 0


def failure(error: BaseException, out: str | None) -> tuple[int, str] | None:
    """The exit code and the one line that `error` ends the program with (None: a bug, raise)."""
    checkpoint = os.path.join(out, CHECKPOINT) if out else None
    if checkpoint and os.path.exists(checkpoint):
        kept = f"; the last checkpoint is intact: resume with: python ppo_jax.py --resume {out}"
    else:
        kept = "; nothing was saved" if out else ""
    if isinstance(error, KeyboardInterrupt):
        return 130, "\ninterrupted" + kept
    if isinstance(error, ConfigError):
        return 2, f"error: {error}"
    if isinstance(error, OSError):
        where = f" ({error.filename})" if error.filename else ""
        return 1, f"error: {error.strerror or error}{where}; free space or fix permissions{kept}"
    if isinstance(error, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(error):
        return 1, ("error: the device ran out of memory; lower --num-envs, --num-steps or "
                   f"--num-seeds{kept}")
    return None


def main(argv: list[str] | None = None) -> int:
    """The command line: train (or resume), or `eval`. Exit codes as failure() and the README."""
    start, out, fresh = time.perf_counter(), None, False
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["eval"]:
            return eval_main(argv[1:])
        if argv[:1] == ["diagnose"]:
            return diagnose_main(argv[1:])
        config = parse_config(argv)
        validate_config(config)
        make_setup(config)  # an unknown env or a bad mask fails here, before any folder exists
        out = config.resume or create_out_dir(config)
        fresh = not config.resume
        if config.compile_cache:
            enable_compile_cache()
        if fresh:
            write_atomic(os.path.join(out, "config.json"), config_json(config))
        else:
            remove_stale_temporaries(out)
        return train_and_save(config, out, start)
    except BaseException as error:
        metrics = os.path.join(out or "", "metrics.jsonl")  # nothing trained: remove the folder
        if (fresh and set(os.listdir(out)) <= {"config.json", "metrics.jsonl"}
                and (not os.path.exists(metrics) or os.path.getsize(metrics) == 0)):
            for name in os.listdir(out):
                os.remove(os.path.join(out, name))
            os.rmdir(out)
        code_and_line = failure(error, out)
        if code_and_line is None:
            raise
        print(code_and_line[1], file=sys.stderr)
        return code_and_line[0]


if __name__ == "__main__":
    sys.exit(main())
