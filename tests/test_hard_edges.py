"""Hard edges: every bad input, on the command line or through the API, is refused with one
clear line (exit code 2) or a typed exception, and leaves nothing behind; every failure while
running is one line too (exit code 1), with the last good checkpoint kept.

The cases, and where each is tested:
- code from run folders: a config.json naming a 'module:Class' env is refused by eval, --resume
  and load_run without --trust-env-module (BAD_CLI, test_trusted_foreign_env_still_runs_nothing)
- not an env class (os:getcwd, builtins:object, os:abort): BAD_CLI, before anything is called
- checksums: a flipped byte anywhere in a checkpoint (test_checkpoint.py), in params.msgpack
  (test_params_msgpack_carries_its_sha256_and_a_flipped_byte_is_refused)
- non-finite parameters in a checkpoint: refused by --resume and eval (test_checkpoint.py)
- resources: more memory than the device has is refused before anything runs
  (test_memory_beyond_the_device_is_refused_up_front, test_huge_runs_are_refused_within_a_minute);
  XLA's out-of-memory and OSError (ENOSPC, EACCES) end in one line with the checkpoint named
  (test_disk_full_while_training_..., test_failures_while_running_are_one_line_with_exit_code_1)
- non-finite float flags: BAD_CLI and test_cli.BAD_INPUTS
- litter: stale temporary files of a killed run are removed by the next resume
  (test_resume_removes_the_temporaries_of_a_killed_run); none after a disk error
- divergence: approx KL and value-loss explosions stop like a NaN (test_divergence_guard_...)
"""

import dataclasses
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import gymnax
import jax
import numpy as np
import pytest
from flax import serialization

import ppo_jax as P
from helpers import tiny_config
from test_cli import BAD_INPUTS as CLI_BAD_INPUTS, run_cli


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A one-seed run folder with a real (untrained) checkpoint, and broken look-alikes."""
    base = tmp_path_factory.mktemp("edges")
    config = tiny_config(out=str(base / "run"), compile_cache=False)
    paths = {name: base / name for name in ("run", "empty", "no_checkpoint", "not_json",
                                            "invalid_value", "unknown_env", "not_a_mapping",
                                            "wrong_type", "foreign_checkpoint", "foreign_env")}
    for path in paths.values():
        path.mkdir()
    (paths["run"] / "config.json").write_text(P.config_json(config))
    P.save_checkpoint(config, str(paths["run"]), P.make_runner(config).init(P.seed_keys(config)))
    saved = json.loads(P.config_json(config))
    for name, changes in {"no_checkpoint": {}, "invalid_value": {"num_envs": 0},
                          "unknown_env": {"env": "CartPol-v1"}, "wrong_type": {"num_envs": "4"},
                          "foreign_checkpoint": {}, "foreign_env": {"env": "os:abort"}}.items():
        (paths[name] / "config.json").write_text(json.dumps({**saved, **changes}))
    (paths["not_json"] / "config.json").write_text("{not json")
    (paths["not_a_mapping"] / "config.json").write_text("[1, 2]")
    # Valid msgpack, but not a checkpoint: its config is not a mapping.
    (paths["foreign_checkpoint"] / P.CHECKPOINT).write_bytes(
        serialization.msgpack_serialize({"format": 1, "config": [1, 2], "loop": {}}))
    paths["file"] = paths["run"] / "config.json"
    paths["missing"] = base / "missing"
    return {name: str(path) for name, path in paths.items()}


def listing(*roots) -> dict:
    """Every file and folder under roots, with its size and modification time."""
    found = {}
    for root in roots:
        for path in Path(root).rglob("*"):
            stat = path.stat()
            found[str(path)] = (stat.st_size, stat.st_mtime_ns)
    return found


# name: (argv with {folder} placeholders, text the one error line must contain)
BAD_CLI = {
    "resume of a file": (["--resume", "{file}"], "is not a run folder"),
    "resume of a missing folder": (["--resume", "{missing}"], "is not a run folder"),
    "resume of an empty folder": (["--resume", "{empty}"], "has no config.json"),
    "resume without checkpoint": (["--resume", "{no_checkpoint}"], "does not exist"),
    "resume of config.json not json": (["--resume", "{not_json}"], "not a valid ppo_jax config"),
    "resume of config.json with a bad value": (["--resume", "{invalid_value}"],
                                               "num_envs must be positive"),
    "resume of config.json with an unknown env": (["--resume", "{unknown_env}"],
                                                  "did you mean CartPole-v1"),
    "resume changing the env": (["--resume", "{run}", "--env", "Acrobot-v1"], "drop --env"),
    "resume changing hidden sizes": (["--resume", "{run}", "--hidden-sizes", "32", "32"],
                                     "drop --hidden-sizes"),
    "resume changing the seed": (["--resume", "{run}", "--seed", "1"], "drop --seed"),
    "resume with an unknown flag": (["--resume", "{run}", "--gama", "0.5"], "gama"),
    "eval of a missing run": (["eval", "{missing}"], "is not a run folder"),
    "eval of a file": (["eval", "{file}"], "is not a run folder"),
    "eval of an empty folder": (["eval", "{empty}"], "has no config.json"),
    "eval without checkpoint": (["eval", "{no_checkpoint}"], "does not exist"),
    "eval of config.json not json": (["eval", "{not_json}"], "not a valid ppo_jax config"),
    "eval of config.json with an unknown env": (["eval", "{unknown_env}"], "unknown env"),
    "resume of a folder naming a module": (["--resume", "{foreign_env}"],
                                           "add --trust-env-module"),
    "eval of a folder naming a module": (["eval", "{foreign_env}"], "add --trust-env-module"),
    "trusted folder naming a function": (["eval", "{foreign_env}", "--trust-env-module"],
                                         "os:abort is not a gymnax Environment class"),
    "env that is a function": (["--env", "os:getcwd"], "is not a gymnax Environment class"),
    "env that is not an Environment": (["--env", "builtins:object"],
                                       "is not a gymnax Environment class"),
    "infinite vf coef": (["--vf-coef", "inf"], "vf_coef must be a finite number"),
    "infinite final entropy": (["--ent-coef-final", "inf"], "ent_coef_final must be a finite"),
    "nan gamma": (["--gamma", "nan"], "gamma must be a finite number"),
    "infinite clip": (["--clip-eps", "inf"], "clip_eps must be a finite number"),
    "eval with zero episodes": (["eval", "{run}", "--episodes", "0"],
                                "--episodes must be positive"),
    "eval with negative episodes": (["eval", "{run}", "--episodes", "-3"],
                                    "--episodes must be positive"),
    "eval with episodes not a number": (["eval", "{run}", "--episodes", "abc"], "--episodes"),
    "eval without a run folder": (["eval"], "eval needs a run folder"),
    "eval with an unknown flag": (["eval", "{run}", "--episode", "5"], "--episode"),
    "eval with a training flag": (["eval", "{run}", "--quiet"], "--quiet"),
    "negative save-every": (["--save-every", "-1"], "save_every must be >= 0"),
    "negative eval-every": (["--eval-every", "-2"], "eval_every must be >= 0"),
    "zero eval episodes": (["--eval-episodes", "0"], "eval_episodes must be positive"),
    "zero target kl": (["--target-kl", "0"], "target_kl must be positive"),
    "negative final entropy": (["--ent-coef-final", "-0.1"], "ent_coef_final must be >= 0"),
    "zero hidden width": (["--hidden-sizes", "0", "16"], "hidden_sizes must be positive"),
    "no hidden layers": (["--hidden-sizes"], "hidden_sizes must be positive"),
    "zero minibatches": (["--num-minibatches", "0"], "num_minibatches must be positive"),
    "infinite learning rate": (["--learning-rate", "inf"], "learning_rate must be a finite number"),
    "infinite entropy coefficient": (["--ent-coef", "inf"], "ent_coef must be a finite number"),
    "nan log std": (["--log-std-init", "nan"], "log_std_init must be a finite number"),
    "negative max grad norm": (["--max-grad-norm", "-1"], "max_grad_norm must be >= 0"),
    "negative vf coef": (["--vf-coef", "-0.5"], "vf_coef must be >= 0"),
    "unknown activation": (["--activation", "sigmoid"], "sigmoid"),
    "float timesteps": (["--total-timesteps", "1e5"], "--total-timesteps"),
    "unimportable custom env": (["--env", "no_such_module:Env"], "cannot load env"),
    "mask on an env without one": (["--action-mask", "on"], "has no action_mask"),
}

# Malformed run files: valid JSON or msgpack of the wrong shape. The message need only name
# the file's folder.
MALFORMED_RUN_FILES = {
    "resume of config.json that is a list": (["--resume", "{not_a_mapping}"], "not_a_mapping"),
    "eval of config.json that is a list": (["eval", "{not_a_mapping}"], "not_a_mapping"),
    "eval of config.json with a string size": (["eval", "{wrong_type}"], "wrong_type"),
    "eval of a checkpoint whose config is not a mapping": (["eval", "{foreign_checkpoint}"],
                                                           "foreign_checkpoint"),
}


def check_refused(argv, expected, folders, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default --out would land here, and must not
    argv = [arg.format(**folders) for arg in argv]
    if argv[:1] != ["eval"] and "--quiet" not in argv:
        argv.append("--quiet")
    before = listing(tmp_path, Path(folders["run"]).parent)
    assert P.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err
    assert expected in lines[0], lines[0]
    assert listing(tmp_path, Path(folders["run"]).parent) == before


@pytest.mark.parametrize("name", BAD_CLI)
def test_bad_cli_input_gets_one_line_exit_code_2_and_leaves_nothing(name, folders, capsys,
                                                                    tmp_path, monkeypatch):
    check_refused(*BAD_CLI[name], folders, capsys, tmp_path, monkeypatch)


@pytest.mark.parametrize("name", CLI_BAD_INPUTS)
def test_cli_bad_inputs_of_test_cli_also_leave_nothing_behind(name, folders, capsys, tmp_path,
                                                              monkeypatch):
    check_refused(*CLI_BAD_INPUTS[name], folders, capsys, tmp_path, monkeypatch)


@pytest.mark.parametrize("name", MALFORMED_RUN_FILES)
def test_malformed_run_files_get_one_line_and_exit_code_2(name, folders, capsys, tmp_path,
                                                          monkeypatch):
    check_refused(*MALFORMED_RUN_FILES[name], folders, capsys, tmp_path, monkeypatch)


def render_deepsea(tmp_path):
    config = tiny_config(env="DeepSea-bsuite")
    P.render_episode(config, P.make_runner(config).init(P.seed_keys(config)),
                     str(tmp_path / "policy.gif"))


def template_of(config):
    return jax.eval_shape(P.make_runner(config).init, P.seed_keys(config))


# name: (call(folders, tmp_path), exception type, text its message must contain)
BAD_API = {
    "load_policy of a seed the run lacks": (
        lambda f, t: P.load_policy(f["run"], seed=1), P.ConfigError, "seed 1 is not in"),
    "load_policy of a negative seed": (
        lambda f, t: P.load_policy(f["run"], seed=-1), P.ConfigError, "seed -1 is not in"),
    "load_policy of a missing run": (
        lambda f, t: P.load_policy(f["missing"]), P.CheckpointError, "is not a run folder"),
    "load_run of a folder naming a module": (
        lambda f, t: P.load_run(f["foreign_env"]), P.CheckpointError, "--trust-env-module"),
    "load_policy of a folder naming a module": (
        lambda f, t: P.load_policy(f["foreign_env"]), P.CheckpointError, "--trust-env-module"),
    "load_params of a run that never finished": (
        lambda f, t: P.load_params(f["run"]), P.CheckpointError, "does not exist"),
    "load_run without checkpoint": (
        lambda f, t: P.load_run(f["no_checkpoint"]), P.CheckpointError, "does not exist"),
    "read_config of a file": (
        lambda f, t: P.read_config(f["file"]), P.CheckpointError, "is not a run folder"),
    "read_config of config.json not json": (
        lambda f, t: P.read_config(f["not_json"]), P.CheckpointError, "not a valid"),
    "read_config of a bad value": (
        lambda f, t: P.read_config(f["invalid_value"]), P.ConfigError, "num_envs must be"),
    "load_checkpoint into another config": (
        lambda f, t: P.load_checkpoint(tiny_config(gamma=0.5), f["run"],
                                       template_of(tiny_config(gamma=0.5))),
        P.CheckpointError, "gamma=0.99"),
    "make_runner of zero envs": (
        lambda f, t: P.make_runner(tiny_config(num_envs=0)), P.ConfigError, "num_envs"),
    "make_train of gamma above one": (
        lambda f, t: P.make_train(tiny_config(gamma=2.0)), P.ConfigError, "gamma"),
    "make_env of an unknown id": (
        lambda f, t: P.make_env("CartPole-v2"), P.ConfigError, "did you mean CartPole-v1"),
    "env_spec masking a continuous env": (
        lambda f, t: P.env_spec(*gymnax.make("Pendulum-v1"), action_mask="on"),
        P.ConfigError, "discrete"),
    "parse_config of an unknown flag": (
        lambda f, t: P.parse_config(["--gama", "0.9"]), P.ConfigError, "gama"),
    "save_every negative": (
        lambda f, t: P.validate_config(tiny_config(save_every=-1)), P.ConfigError,
        "save_every"),
}


@pytest.mark.parametrize("name", BAD_API)
def test_bad_api_call_raises_a_typed_error_naming_the_problem(name, folders, tmp_path):
    call, error_type, expected = BAD_API[name]
    before = listing(Path(folders["run"]).parent)
    with pytest.raises(error_type) as error:
        call(folders, tmp_path)
    assert expected in str(error.value)
    assert "\n" not in str(error.value)
    assert listing(Path(folders["run"]).parent) == before


def test_render_of_an_env_gymnax_cannot_draw_raises_config_error(tmp_path):
    with pytest.raises(P.ConfigError, match="cannot draw"):
        render_deepsea(tmp_path)
    assert not os.listdir(tmp_path)


# ── Failures while running: one line, exit code 1, the last checkpoint kept ───────────────


def run_main(argv, capsys) -> tuple[int, str]:
    """P.main(argv) -> (exit code, the one error line), asserting it is one line."""
    code = P.main(argv)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return code, err


def tiny_cli(out, *more) -> list:
    return ["--total-timesteps", "1024", "--num-envs", "4", "--num-steps", "32",
            "--hidden-sizes", "16", "16", "--no-compile-cache", "--quiet", "--out", str(out),
            *more]


def test_trusted_foreign_env_still_runs_nothing(folders, capsys):
    """os:abort would kill the process if called: refused as not a class, so never called."""
    code, err = run_main(["--resume", folders["foreign_env"], "--trust-env-module"], capsys)
    assert code == 2 and "os:abort is not a gymnax Environment class" in err


def test_memory_beyond_the_device_is_refused_up_front(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(P, "device_memory", lambda: 1000)
    code, err = run_main(tiny_cli(tmp_path / "run"), capsys)
    assert code == 2 and "GiB free; lower --num-envs" in err, err
    assert not (tmp_path / "run").exists()


def test_a_real_config_fits_the_memory_xla_counts():
    config = tiny_config()
    runner = P.make_runner(config)
    state = runner.init(P.seed_keys(config))
    compiled = runner.chunk.lower(state, 0).compile()
    P.check_memory(config, compiled)  # fits
    analysis = compiled.memory_analysis()
    assert 0 < analysis.temp_size_in_bytes < 100 * 2**20  # tiny: counted, and not absurd


@pytest.mark.parametrize("flags", [["--num-seeds", "100000000"],
                                   ["--num-envs", "10000000", "--total-timesteps", "1000000000"]])
def test_huge_runs_are_refused_within_a_minute(flags, tmp_path):
    result = run_cli(*flags, "--quiet", "--no-compile-cache", cwd=tmp_path, timeout=60)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and "GiB free" in result.stderr, result.stderr
    assert not (tmp_path / "runs").exists() or not os.listdir(tmp_path / "runs")


def test_disk_full_while_training_is_one_line_and_keeps_the_last_checkpoint(
        tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(P, "CHUNK_STEPS", 256)  # chunks of 2 updates: checkpoints at 2, 4, 6
    out, saves, save, real_fsync = tmp_path / "run", [], P.save_checkpoint, os.fsync

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    def save_but_fill_the_disk_at_the_second(config, out, state):
        saves.append(P.updates_done(state))
        if len(saves) == 2:  # everything written from here on fails
            monkeypatch.setattr(os, "fsync", disk_full)
        save(config, out, state)
    monkeypatch.setattr(P, "save_checkpoint", save_but_fill_the_disk_at_the_second)
    code, err = run_main(tiny_cli(out, "--save-every", "2"), capsys)
    assert code == 1 and "No space left on device" in err and f"--resume {out}" in err, err
    assert not [f for f in os.listdir(out) if ".tmp" in f]
    config, state = P.load_run(str(out))
    assert P.updates_done(state) == saves[0] == 2
    monkeypatch.setattr(os, "fsync", real_fsync)  # space again: the resume finishes
    assert P.main(["--resume", str(out), "--quiet"]) == 0
    assert P.updates_done(P.load_run(str(out))[1]) == config.num_updates


FAILURES = {  # name: (what raises, the exception, text of the one line)
    "no permission to read the checkpoint": (
        "load_checkpoint", PermissionError(errno.EACCES, "Permission denied", "ckpt"),
        "Permission denied (ckpt)"),
    "XLA out of memory": (
        "load_checkpoint", jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while "
                                                      "trying to allocate 5 bytes."),
        "the device ran out of memory"),
}


@pytest.mark.parametrize("name", FAILURES)
@pytest.mark.parametrize("command", ["eval", "--resume"])
def test_failures_while_running_are_one_line_with_exit_code_1(name, command, folders, capsys,
                                                             monkeypatch):
    where, error, expected = FAILURES[name]

    def fail(*args, **kwargs):
        raise error
    monkeypatch.setattr(P, where, fail)
    before = listing(folders["run"])
    code, err = run_main([command, folders["run"], "--quiet"][:2 if command == "eval" else 3],
                         capsys)
    assert code == 1 and expected in err, err
    assert listing(folders["run"]) == before


def test_resume_removes_the_temporaries_of_a_killed_run(folders, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(folders["run"], run)
    dead = next(pid for pid in range(4_000_000, 3_000_000, -1) if not alive(pid))
    for name in (f"metrics.jsonl.tmp{dead}", f"learning_curve.png.tmp{dead}.png"):
        (run / name).write_text("half")
    (run / f"config.json.tmp{os.getppid()}").write_text("a live writer's")  # left alone
    assert P.main(["--resume", str(run), "--quiet"]) == 0
    assert sorted(f for f in os.listdir(run) if ".tmp" in f) == [f"config.json.tmp{os.getppid()}"]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def test_params_msgpack_carries_its_sha256_and_a_flipped_byte_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert P.main(tiny_cli(out)) == 0
    digest, name = (out / "params.msgpack.sha256").read_text().split()
    data = (out / "params.msgpack").read_bytes()
    assert name == "params.msgpack" and hashlib.sha256(data).hexdigest() == digest
    params = P.load_params(str(out))
    np.testing.assert_array_equal(params["actor"]["params"]["Dense_0"]["kernel"],
                                  np.asarray(P.load_run(str(out))[1].params["actor"]["params"]
                                             ["Dense_0"]["kernel"]))
    for where in (0, len(data) // 2, len(data) - 1):
        spoiled = bytearray(data)
        spoiled[where] ^= 0x01
        (out / "params.msgpack").write_bytes(bytes(spoiled))
        with pytest.raises(P.CheckpointError, match="does not match .*sha256"):
            P.load_params(str(out))


# ── Divergence guard ──────────────────────────────────────────────────────────────────────


def test_divergence_guard_stops_an_exploding_policy_on_the_cli(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_main(tiny_cli(out, "--learning-rate", "1.0"), capsys)
    assert code == 1 and "approx_kl passed 10 in update 1" in err, err
    assert str(out / P.CHECKPOINT) in err
    config, state = P.load_run(str(out))
    assert P.updates_done(state) == 0  # the update that exploded is not kept
    assert P.main(tiny_cli(tmp_path / "off", "--learning-rate", "1.0",
                           "--no-divergence-guard")) == 0


def test_divergence_guard_stops_an_exploding_critic():
    """Plain SGD without clipping and a huge value coefficient: the critic explodes while
    the policy hardly moves, so the value-loss rule, not the KL one, must stop it."""
    config = tiny_config(optimizer="sgd", learning_rate=0.01, vf_coef=100.0, max_grad_norm=1e9,
                         normalize_reward=False)  # raw CartPole returns: a fast explosion
    runner = P.make_runner(config)
    state, metrics, bad = P.train_runs(config, runner, runner.init(P.seed_keys(config)))
    assert P.PROBLEMS[bad].startswith("value_loss passed")
    assert P.updates_done(state) < config.num_updates
    assert (metrics["approx_kl"] < P.KL_LIMIT).all()
    unguarded = dataclasses.replace(config, divergence_guard=False)
    runner = P.make_runner(unguarded)
    _, metrics, bad = P.train_runs(unguarded, runner, runner.init(P.seed_keys(config)))
    assert bad == -1 and np.nanmax(metrics["value_loss"]) > 1e6  # it would have run on


def test_checkpoints_are_written_at_the_chunk_ends_where_one_is_due(tmp_path, monkeypatch):
    monkeypatch.setattr(P, "CHUNK_STEPS", 256)  # chunks of 2 updates (batch 128), 8 updates
    saved, save = [], P.save_checkpoint
    monkeypatch.setattr(P, "save_checkpoint", lambda config, out, state: (
        saved.append(P.updates_done(state)), save(config, out, state)))
    assert P.main(tiny_cli(tmp_path / "run", "--save-every", "3")) == 0
    assert saved == [4, 6, 8]  # passed 3 in the chunk to 4, 6 in the one to 6; 8: the end
