"""Evaluation: the eval command, GIFs, load_policy in Gymnasium's own env, and --eval-every."""

import contextlib
import io
import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ppo_jax as P

# 8 updates of 32 steps, one Adam step each: trained, but still short episodes (quick GIFs).
TINY = ["--total-timesteps", "256", "--num-envs", "4", "--num-steps", "8",
        "--hidden-sizes", "16", "16", "--update-epochs", "1", "--num-minibatches", "1",
        "--no-compile-cache", "--quiet", "--no-diagnostics"]
EVAL_EVERY = 3
LINE = re.compile(r"^seed (\d+): deterministic (-?\d+\.\d) \+- (\d+\.\d) \| "
                  r"stochastic (-?\d+\.\d) \+- (\d+\.\d)$")


def main_in_process(argv):
    """P.main(argv) -> (exit code, stdout, stderr), for module-scoped fixtures (no capsys)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = P.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Two seeds, observation normalization, and an evaluation every EVAL_EVERY updates."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    code, _, err = main_in_process(["--num-seeds", "2", "--normalize-obs", "--eval-every",
                                    str(EVAL_EVERY), "--out", str(out), *TINY])
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def evaluated(tiny_run, tmp_path_factory):
    """`eval --episodes 3 --render` on a copy of the tiny run."""
    run = tmp_path_factory.mktemp("evaluated") / "run"
    shutil.copytree(tiny_run, run)
    code, stdout, stderr = main_in_process(["eval", str(run), "--episodes", "3", "--render"])
    return dict(run=run, code=code, stdout=stdout, stderr=stderr)


def test_eval_prints_both_policies_for_every_seed_and_writes_eval_json(evaluated):
    assert evaluated["code"] == 0, evaluated["stderr"]
    assert "Traceback" not in evaluated["stderr"]
    rows = [LINE.match(line) for line in evaluated["stdout"].splitlines()]
    rows = [row for row in rows if row]
    assert [int(row[1]) for row in rows] == [0, 1], evaluated["stdout"]
    report = json.loads((evaluated["run"] / "eval.json").read_text())
    assert report["env"] == "CartPole-v1" and report["episodes"] == 3
    assert report["updates"] == 8
    assert [seed["seed"] for seed in report["seeds"]] == [0, 1]
    for row, seed in zip(rows, report["seeds"]):
        printed = [float(x) for x in row.groups()[1:]]
        saved = [seed[policy][stat] for policy in ("deterministic", "stochastic")
                 for stat in ("mean", "std")]
        np.testing.assert_allclose(printed, saved, atol=0.051)
        # CartPole pays 1 a step and every episode lasts at least one step.
        assert seed["deterministic"]["mean"] >= 1 and seed["stochastic"]["mean"] >= 1


def test_render_writes_a_gif_of_more_than_one_frame(evaluated):
    from PIL import Image

    assert evaluated["code"] == 0, evaluated["stderr"]
    path = evaluated["run"] / "policy.gif"
    assert f"saved {path}" in evaluated["stdout"]
    with Image.open(path) as gif:
        assert 1 < gif.n_frames <= P.MAX_FRAMES
    assert not [p for p in evaluated["run"].iterdir() if ".tmp" in p.name]


def test_load_policy_scores_475_in_gymnasiums_own_cartpole(cartpole_preset_run):
    import gymnasium

    act = P.load_policy(str(cartpole_preset_run), deterministic=True)
    env = gymnasium.make("CartPole-v1")
    returns = []
    for episode in range(20):
        obs, _ = env.reset(seed=episode)
        total, done = 0.0, False
        while not done:
            action = act(obs)
            assert isinstance(action, int)
            obs, reward, terminated, truncated, _ = env.step(action)
            total, done = total + reward, terminated or truncated
        returns.append(total)
    env.close()
    assert np.mean(returns) >= 475, returns


def test_load_policy_applies_the_runs_observation_normalizer(tiny_run):
    config, state = P.load_run(str(tiny_run))
    agent = P.make_setup(config).agent
    # Observations a little off the training distribution, where (obs - mean) / std and
    # the raw obs are far apart.
    obs = np.random.default_rng(0).normal(0.0, [1.0, 2.0, 0.2, 2.0], (64, 4)).astype(np.float32)
    for seed in (0, 1):
        params, stats = jax.tree.map(lambda x: x[seed],
                                     (state.params, state.norm.obs))
        assert stats is not None
        greedy = lambda x: np.asarray(jnp.argmax(agent.policy(params, x).logits, axis=-1))
        normalized, raw = greedy(P.normalize(stats, jnp.asarray(obs))), greedy(jnp.asarray(obs))
        act = P.load_policy(str(tiny_run), seed=seed, deterministic=True)
        actions = np.array([act(o) for o in obs])
        np.testing.assert_array_equal(actions, normalized, err_msg=f"seed {seed}")
        assert (actions != raw).any(), "the check cannot tell normalized from raw here"


def test_eval_every_records_returns_on_due_updates_and_the_last_and_null_elsewhere(tiny_run):
    rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    updates = P.read_config(str(tiny_run)).num_updates
    assert len(rows) == updates * 2 and updates % EVAL_EVERY  # the last update is not due
    for row in rows:
        done = row["update"] + 1
        due = done % EVAL_EVERY == 0 or done == updates
        for name in ("eval_return", "eval_return_stochastic"):
            if due:
                assert isinstance(row[name], float) and row[name] >= 1, row
            else:
                assert row[name] is None, row


def test_metrics_have_no_eval_columns_without_eval_every(cartpole_preset_run):
    first = json.loads((cartpole_preset_run / "metrics.jsonl").read_text().splitlines()[0])
    assert "eval_return" not in first and "eval_return_stochastic" not in first
