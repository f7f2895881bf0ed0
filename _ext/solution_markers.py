"""Sphinx extension: hide nbgrader's solution markers in the rendered book.

Exercise solutions sit between `### BEGIN SOLUTION` and `### END SOLUTION` lines so that
nbgrader can generate student versions. Readers of the book should see only the code, so
this removes the marker lines from every code block.
"""

from __future__ import annotations

import re

from docutils import nodes

MARKER = re.compile(r"^\s*#+\s*(BEGIN|END) (SOLUTION|HIDDEN TESTS)\s*$")


def strip_markers(text: str) -> str:
    """`text` without marker lines."""
    return "\n".join(line for line in text.split("\n") if not MARKER.match(line))


def _on_doctree_read(app, doctree) -> None:
    for block in doctree.findall(nodes.literal_block):
        text = block.astext()
        if not any(MARKER.match(line) for line in text.split("\n")):
            continue
        clean = strip_markers(text)
        block.children = [nodes.Text(clean)]
        block.rawsource = clean


def setup(app):
    app.connect("doctree-read", _on_doctree_read)
    return {"parallel_read_safe": True, "parallel_write_safe": True, "version": "1.0"}
