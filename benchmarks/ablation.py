"""What scales and stabilises the critic and the update: each switch on its own, 16 seeds per
cell, reported as IQM with a bootstrap 95 % interval over seeds.

    python benchmarks/ablation.py                      # every env below, into docs/ablation.md
    python benchmarks/ablation.py --envs CartPole-v1 --seeds 16 --out /tmp/a.md

A seed's score is its mean episode return over the last 5 % of its updates. Each cell trains
all its seeds in one jit through the Python API (jax.vmap(make_train(config))), so no guard
stops a run early. CartPole runs at PureJaxRL's settings (Config's defaults with rewards
unscaled, 5e5 steps); the other envs start from their preset.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import ppo_jax as P  # noqa: E402
from bench import machine  # noqa: E402

# name: the Config fields it changes from the base (the base: today's defaults or preset)
VARIANTS = {
    "base": {},
    "clip value loss": {"clip_value_loss": True},
    "normalize reward": {"normalize_reward": True},
    "clip value loss + normalize reward": {"clip_value_loss": True, "normalize_reward": True},
    "no truncation bootstrap": {"bootstrap_truncation": False},
    "no gradient clipping": {"max_grad_norm": 1000.0},
}
# env: the base config (CartPole: the classic settings, as PureJaxRL runs them: rewards unscaled)
BASES = {
    "CartPole-v1": lambda: P.Config(env="CartPole-v1", normalize_reward=False),
    "Acrobot-v1": lambda: P.preset_config("Acrobot-v1"),
    "Pendulum-v1": lambda: P.preset_config("Pendulum-v1"),
    "MountainCar-v0": lambda: P.preset_config("MountainCar-v0"),
    "MountainCarContinuous-v0": lambda: P.preset_config("MountainCarContinuous-v0"),
    "Breakout-MinAtar": lambda: P.preset_config("Breakout-MinAtar", total_timesteps=2_000_000),
}


def iqm(scores: np.ndarray) -> float:
    """Interquartile mean: the mean of the middle 50 % of the scores."""
    low, high = np.percentile(scores, [25, 75])
    return float(scores[(scores >= low) & (scores <= high)].mean())


def bootstrap_ci(scores: np.ndarray, reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % interval of the IQM, resampling seeds with replacement."""
    rng = np.random.default_rng(seed)
    stats = [iqm(scores[rng.integers(0, len(scores), len(scores))]) for _ in range(reps)]
    return tuple(np.percentile(stats, [2.5, 97.5]))


def scores_of(config: P.Config) -> np.ndarray:
    """Each seed's mean episode return over the last 5 % of its updates: [seeds]."""
    train = jax.jit(jax.vmap(P.make_train(config)))
    _, metrics = train(P.seed_keys(config))
    returns = np.asarray(metrics["episode_return"])
    tail = max(1, int(config.num_updates * 0.05))
    return np.nanmean(returns[:, -tail:], axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", nargs="+", default=list(BASES))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--total-timesteps", type=int, help="override every base's budget")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "ablation.md"))
    args = parser.parse_args()
    lines = [f"Measured by `python benchmarks/ablation.py` on {machine()}, {args.seeds} seeds "
             "per cell. Score: a seed's mean return over the last 5 % of its updates.", "",
             "| env | variant | IQM | 95 % CI | mean | worst seed | wall |",
             "|---|---|---:|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for env in args.envs:
        for name in args.variants:
            budget = {"total_timesteps": args.total_timesteps} if args.total_timesteps else {}
            config = P.Config(**{**vars(BASES[env]()), **VARIANTS[name], **budget,
                                 "num_seeds": args.seeds})
            start = time.perf_counter()
            scores = scores_of(config)
            low, high = bootstrap_ci(scores)
            lines.append(f"| {env} | {name} | {iqm(scores):.1f} | [{low:.1f}, {high:.1f}] | "
                         f"{scores.mean():.1f} | {scores.min():.1f} | "
                         f"{time.perf_counter() - start:.0f} s |")
            print(lines[-1], flush=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
