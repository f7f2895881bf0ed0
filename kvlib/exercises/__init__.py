"""Automatic checks for the chapters' exercises: `kvlib.exercises.chNN.check_*`.

A check takes the student's answer, compares it with kvlib's own computation and raises
`AssertionError` with a hint when it is wrong; when right it prints one line starting with
"Correct". Solutions live in the notebooks between `### BEGIN SOLUTION` and
`### END SOLUTION` (nbgrader markers), so student versions are generated automatically.
"""

from __future__ import annotations


def correct(message: str) -> None:
    """Report a passed check."""
    print(f"Correct: {message}")


def expect(condition: bool, hint: str) -> None:
    """Fail a check with a hint for the student."""
    if not condition:
        raise AssertionError(hint)
