"""Student versions: generated automatically, their checks fail where solutions were removed.

(The instructor versions, the notebooks themselves, pass: strict nbval runs them.)
"""

import sys

import pytest
from nbclient import NotebookClient

from tests.toc import ROOT, notebooks

sys.path.insert(0, str(ROOT / "_ext"))
from assignments import SOLUTION_STUB, student_version  # noqa: E402


def _src(cell) -> str:
    return "".join(cell["source"])


@pytest.mark.parametrize("path", notebooks(), ids=lambda p: p.stem)
def test_student_version_runs_and_its_checks_fail(path):
    nb = student_version(path)
    solutions = [i for i, c in enumerate(nb.cells) if SOLUTION_STUB in _src(c)]
    assert solutions, "no solution was stripped"
    for i in solutions:
        assert "BEGIN SOLUTION" not in _src(nb.cells[i])
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")

    NotebookClient(
        nb,
        timeout=600,
        allow_errors=True,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    ).execute()
    errors = {
        i: out["ename"]
        for i, c in enumerate(nb.cells)
        if c.cell_type == "code"
        for out in c.get("outputs", [])
        if out["output_type"] == "error"
    }
    for i in solutions:
        assert errors.get(i) == "NotImplementedError", f"cell {i} should stop at the stub"
        check = next(j for j in range(i + 1, len(nb.cells)) if "check_" in _src(nb.cells[j]))
        assert check in errors, f"the check after solution cell {i} passed without a solution"
    stray = {
        i: e for i, e in errors.items() if i not in solutions and "check_" not in _src(nb.cells[i])
    }
    assert not stray, f"cells outside the exercises failed in the student version: {stray}"
