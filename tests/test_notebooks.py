"""The notebooks: committed executed, and each re-runs top to bottom at a reduced budget.

PPO_JAX_NOTEBOOK_QUICK=1 makes every notebook shrink its training budget; the committed
outputs come from the full budget.
"""

import pathlib

import nbformat
import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
NAMES = ["01_ppo_from_the_ground_up", "02_explore_vs_exploit", "03_entropy_collapse",
         "04_backprop_through_rl", "05_sweeps"]


def outputs_of(notebook) -> list:
    return [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]


def test_all_five_notebooks_exist():
    assert [path.stem for path in NOTEBOOKS] == NAMES


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_is_executed_without_errors_and_ends_with_its_answer(path):
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert not [out for out in outputs_of(notebook) if out.output_type == "error"]
    assert any("image/png" in out.get("data", {}) for out in outputs_of(notebook)), "no plots"
    assert "What we measured" in notebook.cells[-2].source
    answer = code[-1].outputs[0]["data"]["text/markdown"]
    assert len(answer) > 200
    text = "".join(out.get("text", "") for out in outputs_of(notebook))
    # The check cell before the answer tested each of its claims at the full budget.
    assert "holds" in text and "FAILS" not in text


# 01 calls the file's pieces one by one (rollout, GAE, loss, update, make_train): the default
# suite re-runs it (about 40 s) and --slow all five (about 4 minutes). The action mask and
# the diagnostics that 02 and 03 train with have their own tests.
RERUN_BY_DEFAULT = {"01_ppo_from_the_ground_up"}
RERUNS = [path if path.stem in RERUN_BY_DEFAULT else pytest.param(path, marks=pytest.mark.slow)
          for path in NOTEBOOKS]


@pytest.mark.parametrize("path", RERUNS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom_at_a_reduced_budget(path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("PPO_JAX_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    last = [cell for cell in notebook.cells if cell.cell_type == "code"][-1]
    assert "Reduced (CI) budget" in last.outputs[0]["data"]["text/markdown"]
