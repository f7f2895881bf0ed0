"""Every figure the book shows reads at the book's width (kvlib.figures), and the check can fail.

How the chapters' figures are reached without running every notebook a second time: a figure
cell is a code cell whose committed outputs hold an image. For each notebook, the cells a figure
cell needs are found from the code (names it reads, and, going backwards, the earlier cells that
bind them, then the names those read, and so on); only that slice runs, in a process of its own,
with matplotlib's Agg backend. `plt.show` is replaced by the check, and after each figure cell every
figure still open is checked too, then closed. If the slice misses a dependency (an error while
it runs), the notebook's code runs whole up to its last figure instead, so a figure is never
skipped. The check looks at fonts, layout and legends, not at the plotted values, so a slice
that leaves out a cell which only mutates an object changes nothing that is checked.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from kvlib.errors import KVLibTypeError, KVLibValueError  # noqa: E402
from kvlib.figures import check_figure, figure_problems  # noqa: E402
from tests.toc import ROOT, notebooks  # noqa: E402

NOTEBOOKS = notebooks()


# ---- the check itself, on figures made to pass and to fail ---------------------------------------


def test_a_plain_figure_passes():
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    x = np.arange(10)
    ax.plot(x, x, "o-", label="rising")
    ax.set(title="a title", xlabel="x", ylabel="y")
    ax.legend(loc="upper left")
    check_figure(fig)
    plt.close(fig)


def test_a_wide_figure_with_default_fonts_fails():
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))  # 10 pt ticks at 7 / 9.6 (cropped): 7.3
    for ax in axes:
        ax.plot([0, 1], [0, 1])
    problems = figure_problems(fig)
    assert any("renders at 7.3 pt in a 9.62-inch picture" in p for p in problems), problems
    with pytest.raises(KVLibValueError, match="not readable at the book's width"):
        check_figure(fig)
    fig.set_size_inches(7, 3.5)  # the same figure, 7 inches wide, passes
    assert not any("pt" in p for p in figure_problems(fig)), figure_problems(fig)
    plt.close(fig)


def test_a_legend_over_a_line_fails_and_beside_it_passes():
    fig, ax = plt.subplots()
    x = np.arange(10)
    ax.plot(x, np.full(10, 5.0), label="flat")
    ax.set_ylim(0, 10)
    ax.legend(loc="center")  # on the line
    assert figure_problems(fig) == ["the legend covers line 'flat' of axes 0"]
    ax.legend(loc="lower right")  # far from it
    assert figure_problems(fig) == []
    plt.close(fig)


def test_a_legend_between_two_points_of_a_line_fails():
    fig, ax = plt.subplots()
    ax.plot([0, 10], [0, 10], label="diagonal")  # two points only: the segment counts
    ax.legend(loc="center")
    assert figure_problems(fig) == ["the legend covers line 'diagonal' of axes 0"]
    plt.close(fig)


def test_a_legend_over_bars_points_or_a_filled_area_fails():
    x = np.arange(10)
    for draw in (
        lambda ax: ax.bar(x, np.full(10, 10.0), label="bars"),
        lambda ax: ax.scatter(np.full(5, 4.5), np.linspace(4, 6, 5), label="points"),
        lambda ax: ax.fill_between(x, 0, 10, label="area"),
    ):
        fig, ax = plt.subplots()
        draw(ax)
        ax.set(xlim=(0, 9), ylim=(0, 10))
        ax.legend(loc="center")
        problems = figure_problems(fig)
        assert len(problems) == 1 and "the legend covers" in problems[0], problems
        plt.close(fig)


def test_a_figure_legend_over_the_title_fails():
    # chapter 7's old prefill figure: fig.legend(loc="upper center") sat on the axes title
    fig, ax = plt.subplots()
    ax.plot([1, 2, 3], [3, 1, 2], label="peak memory")
    ax.plot([1, 2, 3], [1, 2, 3], label="time")
    ax.set_title("prefill of 1024 tokens")
    fig.legend(loc="upper center")
    problems = figure_problems(fig)
    assert any("covers the title 'prefill of 1024 tokens'" in p for p in problems), problems
    plt.close(fig)


def test_text_cut_off_at_the_figure_edge_fails():
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1], [0, 1e6])
    ax.set_title("a title far too long to fit into a figure three inches wide")
    problems = figure_problems(fig, min_pt=1, tight=False)  # saved as sized
    assert any(p.startswith("the title") and p.endswith("is cut off") for p in problems), problems
    assert figure_problems(fig, min_pt=1) == [], "saved tight, as Jupyter does, nothing is cut"
    plt.close(fig)


def test_bad_arguments_are_refused():
    with pytest.raises(KVLibTypeError, match="fig must be a matplotlib Figure, got int"):
        figure_problems(3)
    fig = plt.figure()
    with pytest.raises(KVLibValueError, match="width_in and min_pt must be > 0"):
        figure_problems(fig, width_in=0)
    plt.close(fig)


# ---- every figure of every chapter -------------------------------------------------------------


def _code_cells(path) -> list[tuple[int, str, bool]]:
    """(cell index, Python source with IPython magics translated, shows a figure) per code cell."""
    from IPython.core.inputtransformer2 import TransformerManager

    nb = json.loads(path.read_text())
    out = []
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        src = TransformerManager().transform_cell("".join(cell["source"]))
        shows = any("image/png" in o.get("data", {}) for o in cell.get("outputs", []))
        out.append((i, src, shows))
    return out


def _names(src: str) -> tuple[set[str], set[str]]:
    """(names the code binds, names it reads and does not bind itself), at any depth.

    A name the cell both binds and reads counts as its own (`x = f(x)` would need an earlier
    x: if the slice misses it, the notebook runs whole instead)."""
    bound, read = set(), set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.Name):
            (bound if isinstance(node.ctx, (ast.Store, ast.Del)) else read).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                bound.add((alias.asname or alias.name).split(".")[0])
    return bound, read - bound


def _slice(cells: list[tuple[int, str, bool]]) -> list[tuple[int, str, bool]]:
    """The figure cells and, transitively, the earlier cells binding a name they read."""
    keep, needed = set(), set()
    for pos in range(len(cells) - 1, -1, -1):
        index, src, shows = cells[pos]
        bound, read = _names(src)
        if shows or bound & needed:
            keep.add(pos)
            needed = (needed - bound) | read  # the last binding before a read is the one used
    return [cells[pos] for pos in sorted(keep)]


def _run(cells, problems: list[str]) -> None:
    from IPython.display import display

    namespace = {"__name__": "__main__", "display": display}
    current = {"cell": None}
    shown = plt.show

    def check_open_figures(*args, **kwargs):
        for num in plt.get_fignums():
            for p in figure_problems(plt.figure(num)):
                problems.append(f"cell {current['cell']}: {p}")
        plt.close("all")

    plt.show = check_open_figures
    try:
        for index, src, shows in cells:
            current["cell"] = index
            exec(compile(src, f"<cell {index}>", "exec"), namespace)  # noqa: S102
            if shows:
                check_open_figures()
    finally:
        plt.show = shown
        plt.close("all")


def notebook_problems(path: Path) -> list[str]:
    """The problems of every figure the notebook at path shows (run its figure slice, or the
    whole notebook up to its last figure when the slice fails)."""
    cells = _code_cells(path)
    problems: list[str] = []
    try:
        _run(_slice(cells), problems)
    except Exception:  # the slice missed a dependency: run the code whole, up to the last figure
        last = max(pos for pos, (_, _, shows) in enumerate(cells) if shows)
        problems.clear()
        _run(cells[: last + 1], problems)
    return problems


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_figure_of_the_chapter_reads_at_the_book_width(path):
    if not any(shows for _, _, shows in _code_cells(path)):
        pytest.skip(f"{path.name} shows no figure")
    # A process of its own, so the notebook's seeds, print options and plot style stay there.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    done = subprocess.run(
        [sys.executable, "-m", "tests.test_figures", str(path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"{path.name} did not run:\n{done.stderr[-3000:]}"
    problems = json.loads(done.stdout.strip().splitlines()[-1])
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


if __name__ == "__main__":
    print(json.dumps(notebook_problems(Path(sys.argv[1]))))
