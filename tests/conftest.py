import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The suite is bound by XLA compile time: most tests compile a small training program and
# run it for a fraction of a second. With XLA:CPU's MLIR fusion emitters off and its
# fast-compile preset on, the suite took 826 s instead of 1118 s; with LLVM's optimisation
# off too (backend level 0), 484 s instead of 603 s (a tiny config's training program
# compiled in 3.3 s instead of 6.5 s). The programs compute the same algorithm (the tests
# check numbers against NumPy with tolerances, and bitwise comparisons are between programs
# compiled alike, except the one that compares the two ways of compiling init); they train
# slower, which costs these tiny runs little. Set before JAX starts its backend, so that
# test subprocesses (the CLI, the notebooks' kernels) inherit it.
# PPO_JAX_TEST_XLA_DEFAULTS=1 runs the suite with XLA's own defaults, as users compile.
if not os.environ.get("PPO_JAX_TEST_XLA_DEFAULTS"):
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""),
                                        "--xla_cpu_use_fusion_emitters=false",
                                        "--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_COMPILE",
                                        "--xla_backend_optimization_level=0"]).strip()

import contextlib  # noqa: E402
import io  # noqa: E402

import pytest  # noqa: E402




def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long learning runs, skipped unless --slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cartpole_preset_run(tmp_path_factory):
    """The CartPole-v1 preset on two seeds through the command line, trained once for the
    session: test_learning checks that it is solved, test_eval scores and reads it."""
    import ppo_jax as P

    out = tmp_path_factory.mktemp("cartpole") / "run"
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = P.main(["--env", "CartPole-v1", "--num-seeds", "2", "--out", str(out),
                       "--quiet", "--no-compile-cache"])
    assert code == 0, err.getvalue()
    return out
