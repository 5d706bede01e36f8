"""Hard edges: every bad input, on the command line or through the API, is refused with one
clear line (exit code 2) or a typed exception, and leaves nothing behind."""

import json
import os
from pathlib import Path

import gymnax
import jax
import pytest
from flax import serialization

import ppo_jax as P
from helpers import tiny_config
from test_cli import BAD_INPUTS as CLI_BAD_INPUTS


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A one-seed run folder with a real (untrained) checkpoint, and broken look-alikes."""
    base = tmp_path_factory.mktemp("edges")
    config = tiny_config(out=str(base / "run"), compile_cache=False)
    paths = {name: base / name for name in ("run", "empty", "no_checkpoint", "not_json",
                                            "invalid_value", "unknown_env", "not_a_mapping",
                                            "wrong_type", "foreign_checkpoint")}
    for path in paths.values():
        path.mkdir()
    (paths["run"] / "config.json").write_text(P.config_json(config))
    P.save_checkpoint(config, str(paths["run"]), P.make_runner(config).init(P.seed_keys(config)))
    saved = json.loads(P.config_json(config))
    for name, changes in {"no_checkpoint": {}, "invalid_value": {"num_envs": 0},
                          "unknown_env": {"env": "CartPol-v1"}, "wrong_type": {"num_envs": "4"},
                          "foreign_checkpoint": {}}.items():
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
