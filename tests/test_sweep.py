"""Hyperparameter sweeps: a grid of settings x seeds in one jit equals the settings run one
by one, and the CLI writes one metrics stream per setting."""

import json
import os

import jax
import numpy as np
import pytest

import ppo_jax as P
from helpers import tiny_config


def test_a_vmapped_grid_equals_the_settings_run_one_by_one():
    config = tiny_config(num_seeds=2, sweep=("learning_rate=1e-3,3e-3", "gamma=0.9,0.99"))
    assert config.num_runs == 8
    runner = P.make_runner(config)
    grid = P.train_runs(config, runner, runner.init(P.seed_keys(config)))[1]
    # Swapping the grid's axes would put setting 2, which differs from setting 1 in both
    # names, at index 1: so setting 1 alone checks the order (one compile per setting).
    setting = config.settings[1]  # its seeds are runs 2 and 3
    alone = P.Config(**{**vars(config), "sweep": (), **setting})
    _, metrics = jax.jit(jax.vmap(P.make_train(alone)))(P.seed_keys(alone))
    for name, values in metrics.items():
        np.testing.assert_allclose(grid[name][2:4], np.asarray(values), rtol=1e-4, atol=1e-5,
                                   err_msg=f"{setting} {name}")
    # the settings differ, so the test compares something
    assert not np.allclose(grid["learning_rate"][2], grid["learning_rate"][4])
    assert not np.allclose(grid["value_loss"][2], grid["value_loss"][4])


def test_settings_are_the_cartesian_grid_in_flag_order():
    config = tiny_config(sweep=("ent_coef=0,0.01", "clip_eps=0.1,0.2,0.3"))
    assert config.settings == [{"ent_coef": e, "clip_eps": c}
                               for e in (0.0, 0.01) for c in (0.1, 0.2, 0.3)]
    hp = config.hparams()
    assert hp.ent_coef.shape == (6,)
    np.testing.assert_allclose(hp.clip_eps, [0.1, 0.2, 0.3, 0.1, 0.2, 0.3], rtol=1e-6)
    np.testing.assert_allclose(hp.ent_coef_final, hp.ent_coef)  # no decay asked: constant
    np.testing.assert_allclose(hp.gamma, 0.99)


@pytest.mark.parametrize("sweep, expected", [
    (("lerning_rate=1e-3",), "sweep one of"),
    (("learning_rate=fast",), "must be numbers"),
    (("learning_rate=1e-3,0",), "learning_rate must be a positive"),
    (("gamma=0.9,1.5",), "gamma must lie in [0, 1]"),
    (("gamma=0.9", "gamma=0.99"), "give each name once"),
])
def test_bad_sweeps_are_refused_naming_the_fix(sweep, expected):
    with pytest.raises(P.ConfigError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        P.validate_config(tiny_config(sweep=sweep))


def test_cli_sweep_writes_one_stream_per_setting(tmp_path):
    out = tmp_path / "sweep"
    code = P.main(["--out", str(out), "--quiet", "--no-compile-cache", "--num-seeds", "2",
                   "--sweep", "learning_rate=1e-3,3e-3", "--total-timesteps", "1024",
                   "--num-envs", "4", "--num-steps", "32", "--hidden-sizes", "16", "16",
                   "--diagnostics"])
    assert code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 8 * 2 * 2
    assert {(r["setting"], r["seed"]) for r in rows} == {(s, i) for s in (0, 1) for i in (0, 1)}
    assert {r["sweep"]["learning_rate"] for r in rows} == {1e-3, 3e-3}
    for value in ("0.001", "0.003"):
        stream = out / f"metrics_learning_rate={value}.jsonl"
        mine = [json.loads(line) for line in stream.read_text().splitlines()]
        assert len(mine) == 8 * 2 and {r["sweep"]["learning_rate"] for r in mine} == {float(value)}
    assert os.path.getsize(out / "learning_curve.png") > 0
    assert os.path.getsize(out / "diagnostics.png") > 0
    assert rows[0]["pg_norm_greedy"] is not None or rows[0]["greedy_count"] == 0
