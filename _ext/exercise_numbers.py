"""Sphinx extension: number the exercises of every chapter from 1 (Exercise 1, 2, ...).

sphinx-exercise numbers exercises through Sphinx's figure numbering, which counts across the
whole book when the table of contents is not numbered, so chapter 5 would open at "Exercise 12".
After Sphinx has assigned the numbers, this restarts them at 1 in every document, keeping their
order. Exercise titles and the solutions' references to them read the same numbers.
"""

from __future__ import annotations


def renumber(toc_fignumbers: dict) -> None:
    """Per document, number the "exercise" entries 1, 2, ... in their current order (in place)."""
    for numbers in toc_fignumbers.values():
        exercises = numbers.get("exercise")
        if exercises:
            ordered = sorted(exercises, key=exercises.get)
            numbers["exercise"] = {label: (i + 1,) for i, label in enumerate(ordered)}


def _on_env_get_updated(app, env) -> list[str]:
    renumber(env.toc_fignumbers)
    return []


def setup(app):
    # after Sphinx's own toctree collector (priority 500) has assigned the book-wide numbers
    app.connect("env-get-updated", _on_env_get_updated, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True, "version": "1.0"}
