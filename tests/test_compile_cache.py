"""JAX's persistent compilation cache serves a second identical run; nothing in the cache
folder can run code; ppo_jax.py uses public JAX only."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]

TINY_CLI = ["--total-timesteps", "2048", "--num-envs", "4", "--num-steps", "32",
            "--update-epochs", "2", "--num-minibatches", "2", "--hidden-sizes", "16", "16",
            "--no-diagnostics", "--quiet"]

# The command line, caching even the tests' quick compiles.
CLI = """
import sys
import ppo_jax as P
P.CACHE_MIN_COMPILE_SECONDS = 0.0
sys.exit(P.main(sys.argv[1:]))
"""


def run_cli(cache_home, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home)}
    result = subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True, text=True,
                            timeout=600, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def cached(cache_home) -> set:
    folder = Path(cache_home) / "ppo_jax"
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def test_a_second_identical_run_finds_every_program_in_the_cache(tmp_path):
    run_cli(tmp_path / "home", *TINY_CLI, "--out", str(tmp_path / "a"))
    first = cached(tmp_path / "home")
    assert any(name.startswith("jit_chunk") for name in first), first
    run_cli(tmp_path / "home", *TINY_CLI, "--out", str(tmp_path / "b"))
    assert cached(tmp_path / "home") - {"atime"} <= first | {"atime"}  # nothing new compiled
    a, b = ((tmp_path / run / "metrics.jsonl").read_text() for run in ("a", "b"))
    assert a == b


def test_crafted_files_in_the_cache_folder_never_run_code(tmp_path):
    """Whoever can write the cache folder cannot make a run execute code: ppo_jax keeps no
    pickles there, and JAX's cache entries are compiled programs keyed by a hash of what
    makes them, never unpickled."""
    import pickle

    marker = tmp_path / "ran"
    folder = tmp_path / "home" / "ppo_jax"
    (folder / "programs").mkdir(parents=True)

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    run_cli(tmp_path / "home", *TINY_CLI, "--out", str(tmp_path / "first"))
    entries = [p for p in folder.iterdir() if p.name.startswith("jit_")]
    assert entries  # the real entries a second run would load: each replaced by a pickle
    for path in [*entries, folder / "programs" / "store.pkl", folder / "init.pickle"]:
        path.write_bytes(pickle.dumps(Payload()))
    run_cli(tmp_path / "home", *TINY_CLI, "--out", str(tmp_path / "run"))
    assert not marker.exists()


def test_a_cache_folder_that_cannot_be_made_only_costs_the_compile(tmp_path):
    result = run_cli("/proc/ppo_jax_no_such_cache", *TINY_CLI, "--out", str(tmp_path / "run"))
    assert "final return" in result.stdout


def test_the_compilation_cache_is_bounded():
    script = ("import jax, ppo_jax as P; P.enable_compile_cache(); "
              "print(jax.config.jax_compilation_cache_max_size)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.stdout.split()[-1] == str(1 << 30), result.stderr[-2000:]


def test_ppo_jax_uses_public_jax_only_and_no_pickle():
    source = (ROOT / "ppo_jax.py").read_text()
    assert "jax._src" not in source
    assert not re.search(r"import pickle|pickle\.\w+|cloudpickle|serialize_executable", source)
    assert not re.search(r"\bio_callback\b|\bgc\.freeze\b|\bos\._exit\b", source)
    # import_module only where a user's 'module:Class' env is loaded
    calls = [line for line in source.splitlines() if "import_module(" in line]
    assert len(calls) == 1 and "module_name" in calls[0], calls
