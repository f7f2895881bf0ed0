"""Student versions of the chapters: solutions stripped by nbgrader, checks kept.

    python _ext/assignments.py [OUT_DIR]      (default _build/assignments; `make assignments`)

Each chapter notebook in _toc.yml becomes OUT_DIR/NN_name.ipynb, in which every region between
`### BEGIN SOLUTION` and `### END SOLUTION` is replaced by `raise NotImplementedError()` and
all outputs are cleared. The exercise statements and the check cells stay as they are.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbconvert.exporters import NotebookExporter
from nbgrader.preprocessors import ClearOutput, ClearSolutions
from traitlets.config import Config

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.toc import notebooks  # noqa: E402

SOLUTION_STUB = "# YOUR CODE HERE\nraise NotImplementedError()"


def student_version(path: Path) -> nbformat.NotebookNode:
    """The notebook at `path` with its solutions replaced by stubs and its outputs cleared."""
    config = Config()
    config.ClearSolutions.enforce_metadata = False  # markers alone define the solutions
    config.ClearSolutions.code_stub = {"python": SOLUTION_STUB}
    exporter = NotebookExporter(config=config)
    exporter.register_preprocessor(ClearSolutions(config=config), enabled=True)
    exporter.register_preprocessor(ClearOutput(config=config), enabled=True)
    body, _ = exporter.from_filename(str(path))
    return nbformat.reads(body, as_version=4)


def main(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in notebooks():
        target = out_dir / path.name
        nbformat.write(student_version(path), target)
        written.append(target)
        print(f"{path.relative_to(ROOT)} -> {target}")
    return written


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "_build" / "assignments")
