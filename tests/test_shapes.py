"""Shape comments use only the letters the package docstring defines, one meaning each."""

import re
from pathlib import Path

import kvlib

PACKAGE = Path(kvlib.__file__).parent
# A shape comment: "# (B, K, S, D)" or "# (B, K, G*T, S): ..."; names inside are letters,
# numbers, products and sums of them.
SHAPE = re.compile(r"#.*?\(((?:[A-Za-z0-9_*+\- ]+,)+[A-Za-z0-9_*+\- ]*,?)\)")
LETTER = re.compile(r"(?<![A-Za-z_])([A-Z])(?![A-Za-z_])")


def defined_letters() -> set[str]:
    """The capital letters the 'Shape letters' table of kvlib's docstring defines."""
    table = kvlib.__doc__.split("Shape letters", 1)[1].split("\n\n", 2)[1]
    return set(re.findall(r"(?:^|\s{2,})([A-Z])  ", table, re.M))


def shape_letters(source: str) -> set[str]:
    found = set()
    for line in source.splitlines():
        for m in SHAPE.finditer(line):
            found |= set(LETTER.findall(m.group(1)))
    return found


def test_the_table_defines_the_documented_letters():
    assert defined_letters() >= set("BTSLHKGDCVFNPMRW")


def test_every_shape_letter_in_kvlib_is_defined():
    defined, undefined = defined_letters(), []
    for path in sorted(PACKAGE.rglob("*.py")):
        extra = shape_letters(path.read_text()) - defined
        if extra:
            undefined.append(f"{path.relative_to(PACKAGE.parent)}: {sorted(extra)}")
    assert not undefined, "shape letters not in kvlib's table:\n" + "\n".join(undefined)


def test_the_checker_reads_shape_comments():
    assert shape_letters("x = y.reshape(B, K, G * T, D)  # (B, K, G*T, D)") == set("BKGTD")
    assert shape_letters("z = 1  # (B, Q, S)") == {"B", "Q", "S"}
    assert shape_letters("w = f(a, b)  # no shape here") == set()
