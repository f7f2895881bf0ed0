"""The notebook contract: every chapter has the same bootstrap, goals, summary, executed outputs,
exercises with checks and solution markers, and no copies of kvlib code."""

import ast
import configparser
import importlib
import inspect
import json
import re
import textwrap
from pathlib import Path

import pytest

import kvlib
from kvlib.notebook import BOOTSTRAP, BOOTSTRAP_REAL, within
from tests.toc import ROOT, notebooks, toc_files

NOTEBOOKS = notebooks()


def _load(path):
    return json.loads(path.read_text())


def _src(cell) -> str:
    return "".join(cell["source"])


def _code(nb):
    return [c for c in nb["cells"] if c["cell_type"] == "code" and _src(c).strip()]


def test_toc_lists_existing_documents_and_every_chapter_notebook():
    for name in toc_files():
        assert any((ROOT / f"{name}{ext}").exists() for ext in (".md", ".ipynb")), name
    listed = {p.name for p in NOTEBOOKS}
    on_disk = {p.name for p in (ROOT / "notebooks").glob("[0-9A-Z]*_*.ipynb")}
    assert on_disk <= listed, f"chapter notebooks missing from _toc.yml: {sorted(on_disk - listed)}"
    assert NOTEBOOKS, "no chapter notebooks in _toc.yml"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_first_code_cell_is_the_bootstrap(path):
    cells = _code(_load(path))
    uses_real_model = any("load_smollm2" in _src(cell) for cell in cells)
    assert _src(cells[0]) == (BOOTSTRAP_REAL if uses_real_model else BOOTSTRAP)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_goals_summary_and_whats_next(path):
    nb = _load(path)
    markdown = [_src(c) for c in nb["cells"] if c["cell_type"] == "markdown"]
    assert markdown[0].startswith("# "), "the first cell is the chapter title"
    assert "Learning goals" in markdown[0]
    text = "\n".join(markdown)
    assert "Summary" in text and "What's next" in text


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_executed_in_order(path):
    nb = _load(path)
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    counts = [c["execution_count"] for c in _code(nb)]
    assert counts == list(range(1, len(counts) + 1)), f"execution counts {counts}"
    for cell in _code(nb):
        assert "NBVAL_" not in _src(cell), "use cell tags, not # NBVAL_ comments"
        for out in cell.get("outputs", []):
            assert out.get("output_type") != "error", f"committed error output: {_src(cell)[:60]}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_exercises_have_solutions_and_checks(path):
    nb = _load(path)
    cells = nb["cells"]
    labels = []
    for i, cell in enumerate(cells):
        m = re.search(r"```\{exercise\}.*\n:label: (ex-(?:\d\d|[A-Z])-[\w-]+)", _src(cell))
        if cell["cell_type"] != "markdown" or not m:
            continue
        label = m.group(1)
        labels.append(label)
        # setup cells may sit between the statement and its solution
        j = next(
            (
                j
                for j in range(i + 1, len(cells))
                if f"{{solution-start}} {label}" in _src(cells[j])
            ),
            None,
        )
        assert j is not None, f"{label} has no solution-start"
        start, code, end, check = cells[j : j + 4]
        assert ":class: dropdown" in _src(start), "solutions are togglable"
        body = _src(code)
        assert "### BEGIN SOLUTION" in body and "### END SOLUTION" in body
        assert "{solution-end}" in _src(end)
        assert re.search(r"check_\w+\(", _src(check)), "a check call follows the solution"
        assert "BEGIN SOLUTION" not in _src(check)
    assert len(labels) >= 2, f"{path.name} has {len(labels)} exercises; the contract asks 2-3"
    chapter = path.name.split("_")[0]  # 01 .. 10, or A for a chapter beyond the ten
    assert all(label.startswith(f"ex-{chapter}-") for label in labels), labels


class _Canonical(ast.NodeTransformer):
    """The names a function binds (itself, its arguments, its variables) become v0, v1, ... in
    order of first use, so that renaming them does not hide a copy; the names it reads from
    outside (`max`, `torch`) stay as they are."""

    def __init__(self, bound: set[str]) -> None:
        self.bound, self.names = bound, {}

    def _name(self, name: str) -> str:
        if name not in self.bound:
            return name
        return self.names.setdefault(name, f"v{len(self.names)}")

    def visit_Name(self, node: ast.Name) -> ast.AST:
        return ast.copy_location(ast.Name(id=self._name(node.id), ctx=node.ctx), node)

    def visit_arg(self, node: ast.arg) -> ast.AST:
        return ast.copy_location(ast.arg(arg=self._name(node.arg)), node)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        node.name = self._name(node.name)
        node.returns = None
        node.body = _body(node) or [ast.Pass()]
        self.generic_visit(node)
        return node


def _body(fn: ast.FunctionDef) -> list[ast.stmt]:
    """The function's statements without its docstring."""
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        return body[1:]
    return body


def normalised(fn: ast.FunctionDef) -> str:
    """The function's code with names canonical and docstring, annotations and comments gone."""
    fn = ast.parse(ast.unparse(fn)).body[0]
    bound = {fn.name} | {a.arg for a in ast.walk(fn) if isinstance(a, ast.arg)}
    bound |= {
        n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
    }
    tree = _Canonical(bound).visit(fn)
    for node in ast.walk(tree):
        if isinstance(node, ast.arg):
            node.annotation = None
        elif isinstance(node, ast.AnnAssign):
            node.annotation = ast.Constant(None)
    return ast.dump(tree)


def _functions(tree: ast.AST) -> list[ast.FunctionDef]:
    """Functions of more than two statements: smaller ones repeat by nature."""
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and len(_body(n)) > 2]


def _kvlib_functions() -> dict[str, str]:
    """normalised code -> "module.function" for every function of kvlib (exercises excepted)."""
    out = {}
    for path in sorted(Path(kvlib.__file__).parent.rglob("*.py")):
        if "exercises" in path.parts:
            continue
        for fn in _functions(ast.parse(path.read_text())):
            out[normalised(fn)] = f"{path.stem}.{fn.name}"
    return out


def _copies(source: str, known: dict[str, str]) -> list[str]:
    """'name copies module.function' for each function in `source` that copies a kvlib one."""
    lines = source.splitlines()
    source = "\n".join(line for line in lines if not line.lstrip().startswith(("%", "!")))
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    found = [(fn.name, known.get(normalised(fn))) for fn in _functions(tree)]
    return [f"{name} copies {where}" for name, where in found if where]


def test_the_copy_check_sees_through_renaming():
    source = textwrap.dedent(
        inspect.getsource(importlib.import_module("kvlib.generate").pad_prompts)
    )
    renamed = source.replace("def pad_prompts", "def my_pad").replace("rows", "seqs")
    renamed = renamed.replace('"""', "'''", 2)  # another docstring does not matter either
    assert renamed != source
    assert _copies(renamed, _kvlib_functions()) == ["my_pad copies generate.pad_prompts"]
    changed = renamed.replace("max(", "min(", 1)
    assert changed != renamed and _copies(changed, _kvlib_functions()) == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_do_not_copy_kvlib_functions(path):
    known = _kvlib_functions()
    found = [c for cell in _code(_load(path)) for c in _copies(_src(cell), known)]
    assert not found, f"{path.name}: " + "; ".join(found)


def test_within_prints_only_the_tolerance_unless_the_comparison_fails():
    # Two CPUs' round-off reads the same: no digits of the difference are printed...
    assert within(2.4e-7, 1e-5) == within(0.0, 1e-5) == "< 1e-05"
    # ...but a comparison that failed its tolerance prints its value, and so fails nbval.
    assert within(3.1e-3, 1e-5) == "3.1e-03, NOT < 1e-05"
    assert within(1e-5, 1e-5) == "1.0e-05, NOT < 1e-05"
    assert within(float("nan"), 1e-5) == "nan, NOT < 1e-05"
    for bad in (-1.0, 0.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="tol"):
            within(0.0, bad)
    with pytest.raises(ValueError, match="negative"):
        within(-1e-9, 1e-5)


def test_no_sanitizer_hides_numbers():
    """tests/sanitize.cfg masks only what varies by design (timings, addresses, rates), never a
    computed difference: round-off stays out of outputs through `within`."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(ROOT / "tests" / "sanitize.cfg")
    for section in parser.sections():
        masked = re.compile(parser[section]["regex"])
        for text in ("2.4e-07", "1.0e-05", "3.3e-04", "0.0", "28.856"):
            assert not masked.fullmatch(text), f"[{section}] would hide the number {text}"


# Printed forms that carry round-off digits: a number in scientific notation below 1e-3, or a
# float printed with nine or more decimals. Either one reads differently on another CPU or BLAS.
_ROUND_OFF_DIGITS = re.compile(r"\d\.\d+e-(0[4-9]|[1-9]\d)\b|\d\.\d{9,}")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_outputs_print_round_off_only_through_within(path):
    for cell in _code(_load(path)):
        if "nbval-ignore-output" in cell["metadata"].get("tags", []):
            continue
        for out in cell.get("outputs", []):
            text = out.get("text") or out.get("data", {}).get("text/plain") or ""
            m = _ROUND_OFF_DIGITS.search("".join(text))
            assert m is None, (
                f"{path.name}: cell {_src(cell)[:60]!r} prints {m.group(0)!r}; print differences "
                "that round-off can move through kvlib.notebook.within(diff, tol)"
            )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_exercise_titles_leave_the_numbering_to_the_book(path):
    """_ext/exercise_numbers.py numbers each chapter's exercises from 1: a title carries no
    number of its own and no :nonumber:, or the book would show two numbers or none."""
    for cell in _load(path)["cells"]:
        src = _src(cell)
        for m in re.finditer(r"```\{exercise\}(.*)\n((?::\w+:.*\n)*)", src):
            assert not re.match(r"\s*\d", m.group(1)), f"{path.name}: numbered title {m[0]!r}"
            assert ":nonumber:" not in m.group(2), f"{path.name}: {m[0]!r} opts out of numbering"
