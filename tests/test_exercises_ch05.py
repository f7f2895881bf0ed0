"""Chapter 5 exercise checks: each accepts a right answer and rejects wrong ones with a hint."""

from __future__ import annotations

import pytest
import torch

from kvlib.exercises.ch05 import check_blocks_after_fork, check_gather, check_wasted_slots


def test_wasted_slots_accepts_the_right_count(capsys):
    lengths, P = (5, 17, 32, 40), 16
    right = sum(-(-n // P) * P - n for n in lengths)
    check_wasted_slots(right, lengths, P)
    assert capsys.readouterr().out.startswith("Correct")


@pytest.mark.parametrize(
    ("wrong", "match"),
    [(128, "every allocated slot"), (3, "not right"), (-1, "negative"), (1.5, "int number")],
)
def test_wasted_slots_rejects(wrong, match):
    with pytest.raises(AssertionError, match=match):
        check_wasted_slots(wrong)


def test_blocks_after_fork_accepts_the_right_count(capsys):
    # 21 tokens in blocks of 8: 3 blocks, the last one partly filled and shared by 4 samples;
    # 3 samples copy it before writing, the 4th writes in place.
    check_blocks_after_fork(3 + 3)
    assert capsys.readouterr().out.startswith("Correct")


@pytest.mark.parametrize(
    ("wrong", "match"),
    [(12, "share the prompt's blocks"), (7, "only holder"), (3, "not right"), ("6", "int")],
)
def test_blocks_after_fork_rejects(wrong, match):
    with pytest.raises(AssertionError, match=match):
        check_blocks_after_fork(wrong)


def right_gather(pool, table, n, layer):
    P = pool.block_size
    r = torch.arange(n)
    blocks = torch.tensor(table)[r // P]
    return pool.k_pool[layer][blocks, :, r % P].transpose(0, 1)  # (n, K, D) -> (K, n, D)


def test_gather_accepts_a_right_function(capsys):
    check_gather(right_gather)
    assert capsys.readouterr().out.startswith("Correct")


def physical_order(pool, table, n, layer):  # ignores the table: reads blocks 0, 1, 2, ...
    P = pool.block_size
    r = torch.arange(n)
    return pool.k_pool[layer][r // P, :, r % P].transpose(0, 1)


@pytest.mark.parametrize(
    ("wrong", "match"),
    [
        (physical_order, "wrong keys"),
        (lambda pool, table, n, layer: right_gather(pool, table, n, layer)[:, :-1], "shape"),
        (lambda pool, table, n, layer: right_gather(pool, table, n, layer).numpy(), "Tensor"),
        (3, "function itself"),
    ],
)
def test_gather_rejects(wrong, match):
    with pytest.raises(AssertionError, match=match):
        check_gather(wrong)
