"""Checkpoints: resume is bitwise, Ctrl-C saves and resumes, bad checkpoints are refused with
one line, and a non-finite update stops training on the last good state."""

import contextlib
import hashlib
import io
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import serialization

import ppo_jax as P
from helpers import tiny_config

ROOT = Path(__file__).parents[1]
TINY = ["--total-timesteps", "1024", "--num-envs", "4", "--num-steps", "32",
        "--hidden-sizes", "16", "16", "--no-compile-cache", "--no-diagnostics"]
# Long enough to be interrupted: 500 updates in four chunks (128 updates of 512 steps each, see
# CHUNK_STEPS), a few seconds of training after ~10 s of start-up and compiling. The first
# checkpoint (end of chunk 1) says training has begun; the stop lands at the end of a chunk.
LONG = ["--total-timesteps", "256000", "--num-envs", "16", "--num-steps", "32",
        "--hidden-sizes", "16", "16", "--update-epochs", "2", "--num-minibatches", "2",
        "--save-every", "10", "--no-compile-cache", "--no-diagnostics"]


def cli(*args, **kwargs):
    return subprocess.Popen([sys.executable, str(ROOT / "ppo_jax.py"), *args], cwd=ROOT,
                            text=True, **kwargs)


def main_in_process(argv):
    """P.main(argv) -> (exit code, stdout, stderr), for module-scoped fixtures (no capsys)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = P.main(argv)
    return code, out.getvalue(), err.getvalue()


def listing(path) -> set:
    return {str(p.relative_to(path)) for p in Path(path).rglob("*")}


def assert_one_error_line(err: str, *expected: str):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for text in expected:
        assert text in lines[0], lines[0]


def assert_trees_equal(expected, actual):
    expected, actual = P.keys_to_data(expected), P.keys_to_data(actual)
    assert jax.tree.structure(expected) == jax.tree.structure(actual)
    for (where, x), y in zip(jax.tree_util.tree_leaves_with_path(expected),
                             jax.tree.leaves(actual)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                      err_msg=jax.tree_util.keystr(where))


# ── Resume, in process ────────────────────────────────────────────────────────────────────


def reload(config, state, folder: Path, template):
    """save_checkpoint then load_checkpoint: what a resumed run starts from."""
    folder.mkdir()
    P.save_checkpoint(config, str(folder), state)
    return P.load_checkpoint(config, str(folder), template)


def test_resume_from_a_checkpoint_is_bitwise_identical_to_an_uninterrupted_run(tmp_path):
    # Two seeds and both normalizers, so the checkpoint must carry every kind of state.
    config = tiny_config(num_seeds=2, normalize_obs=True, normalize_reward=True,
                         diagnostics=True)  # the probe batch is part of the state too
    runner = P.make_runner(config)
    keys = P.seed_keys(config)
    template = jax.eval_shape(runner.init, keys)
    start = runner.init(keys)
    assert_trees_equal(start, reload(config, start, tmp_path / "start", template))
    full, full_metrics, bad = P.train_runs(config, runner, start)
    assert P.updates_done(full) == config.num_updates and bad == -1

    part, part_metrics, _ = P.train_runs(config, runner, start, stop_at=5)
    assert P.updates_done(part) == 5
    loaded = reload(config, part, tmp_path / "part", template)
    assert_trees_equal(part, loaded)
    resumed, rest_metrics, _ = P.train_runs(config, runner, loaded)
    assert runner.chunk._cache_size() == 1  # a loaded state has the fresh one's types

    assert P.updates_done(resumed) == config.num_updates
    actual = P.concat_metrics([part_metrics, rest_metrics])
    assert full_metrics.keys() == actual.keys()
    for name in full_metrics:
        np.testing.assert_array_equal(actual[name], full_metrics[name], err_msg=name)
    assert_trees_equal(full, resumed)  # parameters, optimizer, env states, keys, normalizers


# ── Ctrl-C, in a real process ─────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def ctrl_c(tmp_path_factory):
    """A CLI run stopped by SIGINT once its first checkpoint exists, then resumed."""
    base = tmp_path_factory.mktemp("ctrl_c")
    run = base / "run"
    with open(base / "stderr.log", "w+") as log:
        proc = cli(*LONG, "--out", str(run), stdout=subprocess.PIPE, stderr=log)
        deadline = time.monotonic() + 120
        while (not (run / P.CHECKPOINT).exists() and proc.poll() is None
               and time.monotonic() < deadline):
            time.sleep(0.02)
        checkpoint_seen = (run / P.CHECKPOINT).exists()
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        stdout, _ = proc.communicate(timeout=120)
        log.seek(0)
        stderr = log.read()
    files_after_stop = listing(run)
    stopped = P.load_run(str(run))[1] if (run / P.CHECKPOINT).exists() else None
    metrics_at_stop = (run / "metrics.jsonl").read_bytes() if stopped is not None else b""
    resume = subprocess.run([sys.executable, str(ROOT / "ppo_jax.py"), "--resume", str(run),
                             "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    return dict(run=run, checkpoint_seen=checkpoint_seen, code=proc.returncode, stdout=stdout,
                stderr=stderr, files_after_stop=files_after_stop, stopped=stopped,
                metrics_at_stop=metrics_at_stop, resume=resume)


def test_first_ctrl_c_stops_after_the_update_saves_and_exits_130(ctrl_c):
    assert ctrl_c["checkpoint_seen"], ctrl_c["stderr"][-3000:]
    # Had training finished before the signal landed, the exit code would be 0.
    assert ctrl_c["code"] == 130, ctrl_c["stderr"][-3000:]
    assert "Traceback" not in ctrl_c["stderr"]
    assert "stopped after update" in ctrl_c["stderr"]  # the graceful path, not an abort
    assert f"resume with: python ppo_jax.py --resume {ctrl_c['run']}" in ctrl_c["stderr"]
    assert not [f for f in ctrl_c["files_after_stop"] if ".tmp" in f]
    assert {"checkpoint.msgpack", "metrics.jsonl", "config.json"} <= ctrl_c["files_after_stop"]
    config = P.read_config(str(ctrl_c["run"]))
    done = P.updates_done(ctrl_c["stopped"])
    assert 10 <= done < config.num_updates
    rows = ctrl_c["metrics_at_stop"].decode().splitlines()
    assert len(rows) == done


def test_ctrl_c_while_compiling_exits_130_and_leaves_no_folder(tmp_path):
    """Before training starts (the chunk being traced or compiled) Ctrl-C has
    nothing to save: one line, exit code 130, and the new folder is gone."""
    run = tmp_path / "run"
    proc = cli(*TINY, "--out", str(run), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while (not (run / "config.json").exists() and proc.poll() is None
           and time.monotonic() < deadline):
        time.sleep(0.01)
    time.sleep(0.3)  # into the compile
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "interrupted; nothing was saved"
    assert "Traceback" not in stderr and not run.exists()


def test_resume_after_ctrl_c_finishes_and_keeps_the_metrics_so_far(ctrl_c):
    assert ctrl_c["code"] == 130, ctrl_c["stderr"][-3000:]
    resume = ctrl_c["resume"]
    assert resume.returncode == 0, resume.stderr[-3000:]
    assert resume.stderr == ""  # --quiet: no bar, no warning
    config, state = P.load_run(str(ctrl_c["run"]))
    assert P.updates_done(state) == config.num_updates
    metrics = (ctrl_c["run"] / "metrics.jsonl").read_bytes()
    assert metrics.startswith(ctrl_c["metrics_at_stop"])
    assert len(metrics.splitlines()) == config.num_updates
    assert not [f for f in listing(ctrl_c["run"]) if ".tmp" in f]


@pytest.mark.slow  # a third compile; test_resume_from_a_checkpoint_is_bitwise_... is fast
def test_resume_after_ctrl_c_matches_the_uninterrupted_run_byte_for_byte(ctrl_c, tmp_path):
    assert ctrl_c["code"] == 130 and ctrl_c["resume"].returncode == 0
    reference = tmp_path / "reference"
    result = subprocess.run([sys.executable, str(ROOT / "ppo_jax.py"), *LONG, "--quiet",
                             "--out", str(reference)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("metrics.jsonl", P.CHECKPOINT, "params.msgpack"):
        assert (ctrl_c["run"] / name).read_bytes() == (reference / name).read_bytes(), name


# ── Bad checkpoints ───────────────────────────────────────────────────────────────────────


def corrupt(run: Path):
    (run / P.CHECKPOINT).write_bytes(np.random.default_rng(0).bytes(4096))


def truncate(run: Path):
    data = (run / P.CHECKPOINT).read_bytes()
    (run / P.CHECKPOINT).write_bytes(data[:len(data) // 2])


def edit_config(run: Path, **changes):
    saved = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**saved, **changes}))


def unseal(run: Path) -> dict:
    """The checkpoint's payload (format, config, state), its SHA-256 checked."""
    sealed = serialization.msgpack_restore((run / P.CHECKPOINT).read_bytes())
    assert hashlib.sha256(sealed["body"]).hexdigest() == sealed["sha256"]
    return serialization.msgpack_restore(sealed["body"])


def reseal(run: Path, payload: dict):
    """Write a payload back with a matching SHA-256, as a careful forger would."""
    body = serialization.msgpack_serialize(payload)
    (run / P.CHECKPOINT).write_bytes(serialization.msgpack_serialize(
        {"sha256": hashlib.sha256(body).hexdigest(), "body": body}))


def shapes_of_another_run(run: Path):
    """Config says 32-wide and the checkpoint's config agrees, but its arrays are 16-wide."""
    edit_config(run, hidden_sizes=[32, 32])
    payload = unseal(run)
    payload["config"]["hidden_sizes"] = [32, 32]
    reseal(run, payload)


def flip_a_byte(run: Path, where: float = 0.5):
    data = bytearray((run / P.CHECKPOINT).read_bytes())
    data[int(where * (len(data) - 1))] ^= 0x01
    (run / P.CHECKPOINT).write_bytes(bytes(data))


def nan_parameters(run: Path):
    """A NaN weight in an otherwise valid, correctly hashed checkpoint."""
    payload = unseal(run)
    layer = payload["state"]["params"]["actor"]["params"]["Torso_0"]["Dense_0"]
    layer["kernel"] = np.full_like(layer["kernel"], np.nan)
    reseal(run, payload)


# name: (spoil(run folder), what the message names, the fix it ends with)
BAD_CHECKPOINTS = {
    "corrupt": (corrupt, "is corrupt or truncated", "intact copy"),
    "truncated": (truncate, "is corrupt or truncated", "intact copy"),
    # The run folder now says 32-wide, or Acrobot: its checkpoint is a 16-wide CartPole one.
    "other hidden sizes": (lambda run: edit_config(run, hidden_sizes=[32, 32]),
                           "hidden_sizes=(16, 16)", "another run"),
    "other env": (lambda run: edit_config(run, env="Acrobot-v1"), "env='CartPole-v1'",
                  "another run"),
    "other shapes": (shapes_of_another_run, "of shape", "another run"),
    "a flipped byte": (flip_a_byte, "is corrupt or truncated", "intact copy"),
    "NaN parameters": (nan_parameters, "holds non-finite parameters", "earlier copy"),
}


@pytest.fixture
def bad_run(request, ctrl_c, tmp_path):
    """A copy of the finished (resumed) run, spoiled one way."""
    run = tmp_path / "run"
    shutil.copytree(ctrl_c["run"], run)
    BAD_CHECKPOINTS[request.param][0](run)
    return run


@pytest.mark.parametrize("bad_run", BAD_CHECKPOINTS, indirect=True)
def test_bad_checkpoint_raises_checkpoint_error_naming_the_problem(bad_run, request):
    name = request.node.callspec.params["bad_run"]
    with pytest.raises(P.CheckpointError) as error:
        P.load_run(str(bad_run))
    _, problem, fix = BAD_CHECKPOINTS[name]
    assert problem in str(error.value) and fix in str(error.value)
    assert str(bad_run / P.CHECKPOINT) in str(error.value)


@pytest.mark.parametrize("command", ["resume", "eval"])
@pytest.mark.parametrize("bad_run", BAD_CHECKPOINTS, indirect=True)
def test_bad_checkpoint_on_the_cli_gets_one_line_and_exit_code_2(bad_run, command, request,
                                                                 capsys):
    name = request.node.callspec.params["bad_run"]
    before = {p: p.stat().st_mtime_ns for p in bad_run.iterdir()}
    argv = ["--resume", str(bad_run), "--quiet"] if command == "resume" else ["eval", str(bad_run)]
    assert P.main(argv) == 2
    assert_one_error_line(capsys.readouterr().err, BAD_CHECKPOINTS[name][1])
    assert {p: p.stat().st_mtime_ns for p in bad_run.iterdir()} == before  # nothing touched


def test_a_flipped_byte_anywhere_in_a_checkpoint_is_refused(ctrl_c, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ctrl_c["run"], run)
    intact = (run / P.CHECKPOINT).read_bytes()
    for where in np.linspace(0, 1, 12):
        flip_a_byte(run, where)
        with pytest.raises(P.CheckpointError, match="corrupt or truncated"):
            P.load_run(str(run))
        (run / P.CHECKPOINT).write_bytes(intact)
    P.load_run(str(run))  # and the intact one still loads


# ── Resume refusals ───────────────────────────────────────────────────────────────────────


RESUME_REFUSALS = {
    "finished run": ([], "nothing to resume"),
    "changed hyperparameter": (["--gamma", "0.5"], "drop --gamma"),
    "changed size": (["--num-envs", "8"], "drop --num-envs"),
    "new out folder": (["--out", "elsewhere"], "drop --out"),
}


@pytest.mark.parametrize("name", RESUME_REFUSALS)
def test_refused_resume_gets_one_line_exit_code_2_and_touches_nothing(name, ctrl_c, tmp_path,
                                                                      capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where "elsewhere" would be created
    run = tmp_path / "run"
    shutil.copytree(ctrl_c["run"], run)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    flags, expected = RESUME_REFUSALS[name]
    assert P.main(["--resume", str(run), "--quiet", *flags]) == 2
    assert_one_error_line(capsys.readouterr().err, expected)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_resume_accepts_the_run_control_flags(ctrl_c):
    run = str(ctrl_c["run"])
    config = P.parse_config(["--resume", run, "--quiet", "--save-every", "3",
                             "--no-compile-cache"])
    saved = P.read_config(run)
    assert config.resume == run and config.out == run and config.save_every == 3
    train = {f: getattr(saved, f) for f in P.Config.__dataclass_fields__ if f not in P.RUN_CONTROL}
    assert train == {f: getattr(config, f) for f in train}


# ── NaN guard ─────────────────────────────────────────────────────────────────────────────

# Adam moves every weight by ~lr per step whatever the gradient's size: at 1e30 the first
# minibatch step overflows the value head, so the first update's losses are inf/NaN.
ABSURD_LR = "1e30"


@pytest.fixture(scope="module")
def diverged(tmp_path_factory):
    out = tmp_path_factory.mktemp("nan") / "run"
    code, stdout, stderr = main_in_process(
        ["--learning-rate", ABSURD_LR, "--out", str(out), "--quiet", *TINY])
    return dict(out=out, code=code, stdout=stdout, stderr=stderr)


def test_nan_guard_stops_on_the_last_good_state(diverged):
    config, state = P.load_run(str(diverged["out"]))
    done = P.updates_done(state)
    assert done < config.num_updates
    for leaf in jax.tree.leaves(state.params):
        assert np.isfinite(np.asarray(leaf)).all()
    metrics = P.read_metrics(config, str(diverged["out"] / "metrics.jsonl"), done)
    for name, values in metrics.items():  # only the good updates are reported
        if name in P.GUARDED:
            assert np.isfinite(values).all(), name


def test_nan_guard_exits_1_with_one_line_naming_the_metric_and_the_checkpoint(diverged):
    assert diverged["code"] == 1, diverged["stderr"]
    lines = diverged["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), diverged["stderr"]
    assert any(f"{name} became NaN" in lines[0] for name in P.GUARDED)
    assert str(diverged["out"] / P.CHECKPOINT) in lines[0]
    assert (diverged["out"] / P.CHECKPOINT).is_file()
