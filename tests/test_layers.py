"""kvlib's layers: a module imports only kvlib modules of lower layers (the table is in the
package docstring, `kvlib.__doc__`), so there is no import cycle and no upward import."""

import ast
import re
from pathlib import Path

import kvlib

PACKAGE = Path(kvlib.__file__).parent


def layers() -> dict[str, int]:
    """Module pattern (as written in the table, e.g. 'paged', 'exercises.*') -> layer."""
    table = {}
    for line in kvlib.__doc__.splitlines():
        m = re.fullmatch(r"\s+(\d+)\s+(.+)", line)
        if m:
            for name in m.group(2).split():
                table[name] = int(m.group(1))
    return table


def layer_of(module: str, table: dict[str, int]) -> int:
    short = "kvlib" if module == "kvlib" else module.removeprefix("kvlib.")
    if short in table:
        return table[short]
    for pattern, layer in table.items():
        if pattern.endswith(".*") and short.startswith(pattern[:-1]):
            return layer
    raise AssertionError(f"{module} has no layer: add it to the table in kvlib/__init__.py")


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def kvlib_imports(path: Path, known: set[str]) -> set[str]:
    """The kvlib modules `path` imports, anywhere in the file (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "kvlib"}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "kvlib":
            for alias in node.names:  # `from kvlib.gpu import kernels` imports a module
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return found


def test_every_module_has_a_layer_and_imports_only_lower_layers():
    table, mods = layers(), modules()
    assert len(table) > 20, "the layer table in kvlib/__init__.py was not found"
    upward = []
    for name, path in mods.items():
        mine = layer_of(name, table)
        for dep in kvlib_imports(path, set(mods)):
            if dep != name and layer_of(dep, table) >= mine:
                upward.append(f"{name} (layer {mine}) imports {dep} (layer {layer_of(dep, table)})")
    assert not upward, "imports that are not downward:\n" + "\n".join(upward)


def test_the_checker_sees_imports_inside_functions(tmp_path):
    source = "def f():\n    from kvlib.gpu import bench as gb\n    import kvlib.train\n"
    (tmp_path / "m.py").write_text(source)
    known = {"kvlib.gpu.bench", "kvlib.train", "kvlib.gpu"}
    assert kvlib_imports(tmp_path / "m.py", known) == {"kvlib.gpu.bench", "kvlib.train"}
