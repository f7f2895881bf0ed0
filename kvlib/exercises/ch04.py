"""Checks for chapter 4 (variable-length batching)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from kvlib.exercises import correct, expect


def check_position_ids(positions: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """`positions(attention_mask)` -> (B, T) RoPE positions of a left-padded prompt."""
    from kvlib.generate import pad_prompts
    from kvlib.transformer import pad_lengths, position_ids

    cases = [[4, 4], [1, 5, 3], [2], [7, 1, 1, 6]]
    for lengths in cases:
        _, mask = pad_prompts([[1] * n for n in lengths])
        expected = position_ids(pad_lengths(mask), 0, mask.shape[1])
        got = positions(mask)
        expect(isinstance(got, torch.Tensor), f"return a tensor, got {type(got).__name__}")
        expect(
            tuple(got.shape) == tuple(mask.shape),
            f"for lengths {lengths} the positions should have the mask's shape "
            f"{tuple(mask.shape)}, got {tuple(got.shape)}",
        )
        real = mask.bool()
        differ = [
            b
            for b in range(len(lengths))
            if not torch.equal(got[b][real[b]].long(), expected[b][real[b]])
        ]
        expect(
            not differ,
            f"for lengths {lengths} the real tokens should be numbered from 0 in each row; "
            f"your positions {got.tolist()} are wrong in row {differ[0] if differ else 0} "
            "(padding slots may hold anything)",
        )
    correct(
        f"your positions number each row's real tokens 0, 1, ... whatever its padding, in all "
        f"{len(cases)} batches tried"
    )


def check_padding_waste(waste: float, lengths: Sequence[int]) -> None:
    """Fraction of a left-padded batch's prompt slots that hold padding."""
    from kvlib.generate import pad_prompts

    _, mask = pad_prompts([[1] * n for n in lengths])
    expected = 1.0 - mask.double().mean().item()
    expect(isinstance(waste, float), f"waste should be a float, got {type(waste).__name__}")
    expect(
        abs(waste - (1 - expected)) > 1e-9 or abs(expected - 0.5) < 1e-9,
        "that is the fraction of real tokens; the question asks for padding",
    )
    expect(
        abs(waste - expected) < 1e-9,
        "the batch is B rows of max(lengths) slots; padding = slots - sum(lengths)",
    )
    correct(
        f"your padding fraction for lengths {list(lengths)} matches: every row is padded to the "
        "longest prompt"
    )
