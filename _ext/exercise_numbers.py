"""Sphinx extension: number exercises per chapter ("Exercise 1", "Exercise 2", ... in each
document) instead of across the whole book.

sphinx-exercise numbers exercises through Sphinx's figure numbering, which counts on through
every document of an unnumbered table of contents (chapter 5 would start at "Exercise 12").
After Sphinx has assigned those numbers, this renumbers each document's exercises from 1, in
the order they appear; titles, solutions and references all read the numbers from there.
"""

from __future__ import annotations


def renumber(app, env) -> list[str]:
    """Each document's exercise numbers restarted at 1, in document order."""
    for by_type in env.toc_fignumbers.values():
        numbers = by_type.get("exercise")
        if numbers:
            in_order = sorted(numbers, key=numbers.__getitem__)
            by_type["exercise"] = {label: (n,) for n, label in enumerate(in_order, 1)}
    return []


def setup(app):
    # after Sphinx's own numbering (TocTreeCollector.get_updated_docs, priority 500)
    app.connect("env-get-updated", renumber, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
