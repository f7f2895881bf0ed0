"""`assert_not_revealed`: a check's output never shows the expected answer.

The book's rule for `kvlib.exercises`: a check says right or wrong (and, when wrong, how far off
or what to reconsider); it never prints the expected value. In the rendered book the output of a
check sits right under the collapsed solution, so a printed answer would give the exercise away.

`assert_not_revealed(text, value)` looks for `value` in the forms a message would naturally print
it, as a whole number (a form inside a longer number or word, like "7" in "Qwen2.5-7B" or "32"
in "32768", does not count).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch

# Digits like 2 or 7 appear in any text (a model name, "2 tensors"), so a bare small int is no
# evidence. For ints below SMALL only the form that prints a count is looked for: the digit
# followed by a word ("6 blocks", "2 tiles").
SMALL = 10


def _int_forms(v: int) -> list[str]:
    if abs(v) < SMALL:
        return []  # handled as a count, see _patterns
    return [str(v), f"{v:,}"]


def _float_forms(v: float) -> list[str]:
    forms = [f"{v:.{n}g}" for n in range(2, 7)]
    forms += [f"{v:.1%}", f"{v:.0%}", f"{v:.2f}", f"{v:.1f}"]
    kept = []
    for form in forms:
        digits = form.rstrip("%").lstrip("-")
        if not digits.strip("0.") or "nan" in digits or "inf" in digits:
            continue  # "0", "0.00": a tiny value rounds to something every text may hold
        if "." not in digits and "e" not in digits and abs(int(digits)) < SMALL:
            continue  # "7" from 7.0: as ambiguous as a small int
        kept.append(form)
    return kept


def _runs(values: list[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive ints, 3 or more long, as (first, last)."""
    runs, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[i - 1] + 1:
            if i - start >= 3:
                runs.append((values[start], values[i - 1]))
            start = i
    return runs


def _sequence_forms(seq: list) -> list[str]:
    forms = [str(list(seq)), str(tuple(seq)), ", ".join(repr(x) for x in seq)]
    if seq and all(isinstance(x, int) and not isinstance(x, bool) for x in seq):
        for a, b in _runs(seq):  # a list of indices printed as a range: "72..99", "72-99"
            forms += [f"{a}..{b}", f"{a}-{b}", f"{a} to {b}", f"range({a}, {b + 1})"]
    return [f for f in forms if f not in ("[]", "()", "")]


def _patterns(value: object) -> list[str]:
    """Regexes that find `value` printed as a whole number (or list) in a text."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, bool) or value is None:
        raise TypeError(f"{value!r} cannot be told apart from ordinary text")
    if isinstance(value, int):
        if abs(value) < SMALL:
            return [rf"(?<![\w.,]){value} [A-Za-z]"]  # a count: "6 blocks"
        forms = _int_forms(value)
    elif isinstance(value, float):
        forms = _float_forms(value)
    elif isinstance(value, (list, tuple)):
        forms = _sequence_forms(list(value))
    else:
        raise TypeError(f"no printed forms known for {type(value).__name__}")
    # Not part of a longer number or word: "32" is not in "32768" nor "1.32", "7" not in "7B".
    return [rf"(?<![\w.]){re.escape(f)}(?![\w%]|[.,]\d)" for f in dict.fromkeys(forms)]


def revealed(text: str, value: object) -> list[str]:
    """The printed forms of `value` found in `text` (empty when none)."""
    found = []
    for pattern in _patterns(value):
        found += [m.group(0) for m in re.finditer(pattern, text)]
    return found


def assert_not_revealed(text: str, *values: object) -> None:
    """`text` (a check's output or hint) shows none of `values` in any natural printed form."""
    for value in values:
        found = revealed(text, value)
        assert not found, f"the expected answer {value!r} shows as {found} in: {text!r}"


def assert_hints_hide(messages: Iterable[str], *values: object) -> None:
    """Every hint in `messages` hides `values`."""
    for message in messages:
        assert_not_revealed(message, *values)


def failures(*calls: Callable[[], object]) -> list[str]:
    """The hints of `calls` (wrong answers), each of which must fail its check."""
    messages = []
    for call in calls:
        try:
            call()
        except AssertionError as error:
            messages.append(str(error))
        else:
            raise AssertionError(f"{call} passed its check; expected a wrong answer")
    return messages
