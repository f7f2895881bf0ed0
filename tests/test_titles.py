"""Chapter titles agree everywhere a reader meets them, and no chapter numbers its sections.

A chapter's title is the H1 of its notebook, "# N. Title", where N is its place among the ten
chapters of _toc.yml; a chapter beyond the ten (its file starts with a letter) is "# A. Title",
lettered in _toc.yml order. The sidebar shows that H1 (the table of contents gives no other title),
and the intro's table of chapters links each chapter under the same "N. Title", in the same
order. Sections (## and deeper) carry no numbers, in every chapter alike.
"""

import json
import re

import pytest
import yaml

from tests.toc import ROOT, notebooks

NOTEBOOKS = notebooks()
H1 = re.compile(r"^# (\d+|[A-Z])\. (\S.*)$")
NUMBERED_SECTION = re.compile(r"^#{2,6} +\d+(\.\d+)*\.? ")
INTRO_LINK = re.compile(r"\[([^\]]+)\]\(\.\./notebooks/((?:\d\d|[A-Z])_\w+)\.ipynb\)")


def _markdown_lines(path):
    nb = json.loads(path.read_text())
    for index, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "markdown":
            continue
        in_code = False
        for line in "".join(cell["source"]).splitlines():
            if line.lstrip().startswith(("```", "~~~")):
                in_code = not in_code
            elif not in_code:
                yield index, line


def h1(path) -> str:
    """The notebook's one H1 line."""
    titles = [line for _, line in _markdown_lines(path) if line.startswith("# ")]
    assert len(titles) == 1, f"{path.name} has {len(titles)} H1 titles: {titles}"
    return titles[0]


def _chapter_entries(entries):
    for entry in entries:
        yield entry
        for key in ("chapters", "sections"):
            yield from _chapter_entries(entry.get(key, []))
        for part in entry.get("parts", []):
            yield from _chapter_entries(part.get("chapters", []))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_chapter_title_is_numbered_by_its_place_in_the_toc(path):
    m = H1.match(h1(path))
    assert m, f"{path.name}: the title {h1(path)!r} is not '# N. Title'"
    place = label(path)
    assert m.group(1) == place, f"{path.name} is chapter {place} in _toc.yml, titled {m[0]!r}"
    prefix = f"{int(place):02d}_" if place.isdigit() else f"{place}_"
    assert path.stem.startswith(prefix), f"{path.name} is chapter {place} in _toc.yml"


def label(path) -> str:
    """'1'..'10' for the ten chapters, 'A', 'B', ... for those beyond, in _toc.yml order."""
    numbered = [p for p in NOTEBOOKS if p.stem[0].isdigit()]
    if path in numbered:
        return str(numbered.index(path) + 1)
    beyond = [p for p in NOTEBOOKS if not p.stem[0].isdigit()]
    return chr(ord("A") + beyond.index(path))


def test_the_sidebar_shows_the_notebook_titles():
    # Jupyter Book labels a sidebar entry with the document's H1 unless _toc.yml gives a title.
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    overridden = [e["file"] for e in _chapter_entries([toc]) if "title" in e and "file" in e]
    assert not overridden, f"_toc.yml gives titles of its own to {overridden}; use the H1"


def test_the_intro_lists_every_chapter_by_its_title_in_order():
    links = INTRO_LINK.findall((ROOT / "book" / "intro.md").read_text())
    listed = [(text, f"notebooks/{stem}") for text, stem in links]
    expected = [(h1(p).removeprefix("# "), f"notebooks/{p.stem}") for p in NOTEBOOKS]
    assert listed == expected, (
        "the intro's chapter list differs from the chapters' titles:\n"
        + "\n".join(f"  intro {a!r:60} title {b!r}" for a, b in zip(listed, expected, strict=False))
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_chapter_numbers_its_sections(path):
    numbered = [
        f"cell {i}: {line}" for i, line in _markdown_lines(path) if NUMBERED_SECTION.match(line)
    ]
    assert not numbered, f"{path.name} numbers its sections (no chapter does):\n" + "\n".join(
        numbered
    )
