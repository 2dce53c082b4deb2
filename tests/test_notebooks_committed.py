"""Every notebook is committed with the outputs of a real-model run, so a reader sees the
tables and plots without running anything (CI executes them at tiny scale in memory and
never writes them back: ``execute_notebook``)."""

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 8


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_with_real_scale_outputs(path):
    nb = nbformat.read(path, as_version=4)
    stamp = nb.metadata.get("fatellm", {})
    assert stamp.get("scale") == "real", (
        f"{path.name} was not executed by scripts/run_notebook.py (real models): run "
        f"`python scripts/run_notebook.py notebooks/{path.name}` and commit the result")
    code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    not_run = [i for i, c in enumerate(code) if c.execution_count is None]
    assert not not_run, f"{path.name}: code cells {not_run} have no stored execution"
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), (
        f"{path.name}: cells were not executed top to bottom in one kernel")
    errors = [o.get("ename") for c in code for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, f"{path.name}: stored outputs contain errors {errors}"
    assert sum(len(c.get("outputs", [])) for c in code) >= len(code) // 2, (
        f"{path.name}: most cells have no stored output")
