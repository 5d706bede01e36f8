"""diagnose: each check against a plain-Python reading of the same numbers, silence on a healthy
run, the KL warning at the right update of a run made to collapse, and the command line."""

import jax
import numpy as np
import pytest

import ppo_jax as P
from helpers import tiny_config

U, S = 60, 2


def healthy() -> dict:
    """Metrics [S, U] of a calm run whose return rises and stays."""
    flat = lambda v: np.full((S, U), v, dtype=float)
    metrics = {name: flat(0.1) for name in P.GUARDED}
    metrics.update(approx_kl=flat(0.01), clip_fraction=flat(0.05), grad_clip_fraction=flat(0.3),
                   explained_variance=flat(0.6), value_rmse=flat(2.0), target_rms=flat(50.0), entropy_normalized=np.linspace(1, 0.3, U)[None]
                   .repeat(S, 0), episode_return=np.linspace(10, 200, U)[None].repeat(S, 0))
    return metrics


def naive_first_sustained(row, limit, n):
    for start in range(len(row) - n + 1):
        if all(row[start + k] > limit for k in range(n)):
            return start
    return -1


def checks(metrics) -> dict:
    return {f.check: f.update for f in P.diagnose_metrics(tiny_config(), metrics)}


def test_a_healthy_run_has_no_findings():
    assert checks(healthy()) == {}


def test_first_sustained_matches_a_plain_loop():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 0.1, (5, 40))
    x[1, 3] = np.nan
    for n in (1, 3, 5):
        expected = [naive_first_sustained(list(row), 0.06, n) for row in x]
        assert P.first_sustained(x, 0.06, n).tolist() == expected


def test_each_check_fires_at_its_first_update():
    metrics = healthy()
    metrics["approx_kl"][1, 7:12] = 0.5  # run 1: updates 8-12 far above the usual KL
    metrics["approx_kl"][0, 30] = 0.5  # one spike alone is no finding
    metrics["value_loss"][0, 40] = np.nan
    metrics["grad_clip_fraction"][1] = 0.97
    metrics["explained_variance"][0, U // 2:] = -0.5
    metrics["explained_variance"][1, U // 2:] = -0.5  # but run 1's errors are tiny: EV is noise
    metrics["value_rmse"][0] = 20.0
    found = checks(metrics)
    assert found == {"kl": 8, "value_loss": 41, "grad_clip": 1, "critic": U // 2 + 1}


def test_entropy_collapse_fires_only_when_the_return_gives_back_its_gain():
    metrics = healthy()
    metrics["entropy_normalized"][0, 20:] = 0.05  # nearly deterministic from update 21 ...
    assert "entropy" not in checks(metrics)  # ... while the return keeps rising: fine
    metrics["episode_return"][0, 30:] = 50.0  # then it falls from ~105 back towards 10
    assert checks(metrics)["entropy"] == 21


def test_each_line_names_the_evidence_and_a_flag_to_try():
    metrics = healthy()
    metrics["approx_kl"][:, 2:] = 0.8
    (check, update, line), = P.diagnose_metrics(tiny_config(learning_rate=1e-3), metrics)
    assert (check, update) == ("kl", 3)
    assert "in 2 of 2 runs" in line and "0.8" in line and "--learning-rate 0.0001" in line


def test_a_run_made_to_collapse_is_flagged_at_the_update_its_kl_says():
    config = tiny_config(learning_rate=0.2, total_timesteps=128 * 30, num_seeds=2)
    _, metrics = jax.jit(jax.vmap(P.make_train(config)))(P.seed_keys(config))
    metrics = {k: np.asarray(v) for k, v in metrics.items()}
    starts = [naive_first_sustained(list(row), P.KL_WARN, P.SUSTAINED)
              for row in metrics["approx_kl"]]
    assert max(starts) >= 0, metrics["approx_kl"]  # lr 0.2 does push KL far up
    found = checks(metrics)
    assert found["kl"] == min(s for s in starts if s >= 0) + 1


def test_the_preset_run_is_silent(cartpole_preset_run, capsys):
    assert P.main(["diagnose", str(cartpole_preset_run)]) == 0
    out = capsys.readouterr().out
    assert "nothing looks wrong" in out, out


@pytest.mark.parametrize("argv", [["diagnose"], ["diagnose", "--seed", "1"]])
def test_diagnose_without_a_folder_is_one_line(argv, capsys):
    assert P.main(argv) == 2
    assert capsys.readouterr().err.strip().startswith("error: diagnose needs a run folder")


def test_training_prints_each_warning_once_unless_quiet(tmp_path, capsys):
    argv = ["--total-timesteps", "3840", "--num-envs", "4", "--num-steps", "32",
            "--hidden-sizes", "16", "16", "--learning-rate", "0.2", "--no-compile-cache",
            "--no-divergence-guard"]
    P.main([*argv, "--out", str(tmp_path / "loud")])
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning:" in line]
    kinds = [line.split("runs: ")[1][:12] for line in warned]  # e.g. "approx KL up"
    assert warned and len(kinds) == len(set(kinds)), warned
    assert all(f"diagnose {tmp_path / 'loud'}" in line for line in warned)
    P.main([*argv, "--out", str(tmp_path / "quiet"), "--quiet"])
    assert "warning:" not in capsys.readouterr().err
