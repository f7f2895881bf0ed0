"""The book's own Sphinx extension and configuration."""

import sys

import yaml

from tests.toc import ROOT

sys.path.insert(0, str(ROOT / "_ext"))
from solution_markers import strip_markers  # noqa: E402


def test_strip_markers_removes_only_marker_lines():
    code = "x = 1\n### BEGIN SOLUTION\nanswer = 42\n    ### END SOLUTION\ny = 2"
    assert strip_markers(code) == "x = 1\nanswer = 42\ny = 2"
    assert strip_markers("# BEGIN SOLUTION is a phrase here: x") == (
        "# BEGIN SOLUTION is a phrase here: x"
    )


def test_config_has_what_the_book_needs():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert config["execute"]["execute_notebooks"] == "off"  # committed outputs, checked by nbval
    assert config["launch_buttons"]["colab_url"] == "https://colab.research.google.com"
    assert "sphinx_exercise" in config["sphinx"]["extra_extensions"]
    assert config["bibtex_bibfiles"] == ["book/references.bib"]
    assert (ROOT / config["bibtex_bibfiles"][0]).exists()


def test_every_citation_resolves_to_a_bib_entry():
    import json
    import re

    bib = (ROOT / "book/references.bib").read_text()
    keys = set(re.findall(r"@\w+\{([^,]+),", bib))
    cited = set()
    sources = [p.read_text() for p in (ROOT / "book").glob("*.md")]
    for nb in (ROOT / "notebooks").glob("*.ipynb"):
        cells = json.loads(nb.read_text())["cells"]
        sources += ["".join(c["source"]) for c in cells if c["cell_type"] == "markdown"]
    for text in sources:
        for group in re.findall(r"\{cite(?::\w+)?\}`([^`]+)`", text):
            cited |= {k.strip() for k in group.split(",")}
    assert cited, "the chapters cite nothing"
    assert cited <= keys, f"citations without a bib entry: {sorted(cited - keys)}"


def test_readme_example_runs(capsys):
    import re

    readme = (ROOT / "README.md").read_text()
    code = re.search(r"## Using kvlib\n\n```python\n(.*?)```", readme, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    seq_len, used, allocated = map(int, lines[-1].split())
    assert seq_len == 3 and 0 < used < allocated
    assert lines[0].startswith("Life is")
