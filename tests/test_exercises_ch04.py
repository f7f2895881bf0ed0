"""Chapter 4 exercise checks never print the expected answer.

(Their verdicts, right accepted and wrong rejected, are tested in tests/test_batching.py.)"""

from __future__ import annotations

import pytest
import torch

from kvlib.exercises.ch04 import check_padding_waste, check_position_ids
from kvlib.generate import pad_prompts
from tests.answers import assert_hints_hide, assert_not_revealed, failures

CASES = [[4, 4], [1, 5, 3], [2], [7, 1, 1, 6]]  # the batches check_position_ids tries


def right_positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(1) - 1).clamp(min=0)  # (B, T)


def expected_positions() -> list[torch.Tensor]:
    return [right_positions(pad_prompts([[1] * n for n in lengths])[1]) for lengths in CASES]


def test_position_ids_hides_the_answer(capsys):
    want = expected_positions()
    check_position_ids(right_positions)
    assert_not_revealed(capsys.readouterr().out, *want)
    hints = failures(
        lambda: check_position_ids(lambda mask: torch.arange(mask.shape[1]).expand(mask.shape)),
        lambda: check_position_ids(lambda mask: right_positions(mask) + 1),
    )
    assert "your positions" in hints[0]
    # Only whole batches: a row of the student's own (wrong) positions may equal a right row.
    assert_hints_hide(hints, *want)


def test_position_ids_rejects_a_wrong_shape():
    with pytest.raises(AssertionError, match="mask's shape"):
        check_position_ids(lambda mask: right_positions(mask)[:, 1:])


def test_padding_waste_hides_the_answer(capsys):
    lengths = [12, 3, 30, 7, 18]
    right = 1 - sum(lengths) / (len(lengths) * max(lengths))
    padding = len(lengths) * max(lengths) - sum(lengths)  # slots; right follows from it
    check_padding_waste(right, lengths)
    assert_not_revealed(capsys.readouterr().out, right, padding)
    hints = failures(
        lambda: check_padding_waste(1 - right, lengths),
        lambda: check_padding_waste(right + 0.1, lengths),
        lambda: check_padding_waste(1, lengths),
    )
    assert_hints_hide(hints, right, padding)
