"""Chapter 5 exercise checks: each accepts a right answer and rejects wrong ones with a hint."""

from __future__ import annotations

import pytest
import torch

from kvlib.exercises.ch05 import check_blocks_after_fork, check_gather, check_wasted_slots
from kvlib.paged import BlockAllocator, gather_kv
from tests.answers import assert_hints_hide, assert_not_revealed, failures


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


# ---- the checks never print the expected answer ------------------------------------------------
def test_wasted_slots_hides_the_answer(capsys):
    lengths, P = (5, 17, 32, 40), 16
    right = sum(-(-n // P) * P - n for n in lengths)
    check_wasted_slots(right, lengths, P)
    assert_not_revealed(capsys.readouterr().out, right)
    hints = failures(*(lambda w=w: check_wasted_slots(w) for w in (128, 3, -1, 1.5)))
    assert_hints_hide(hints, right)


def test_blocks_after_fork_hides_the_answer(capsys):
    right = 3 + 3  # the prompt's 3 blocks, 3 copies of the shared last one
    check_blocks_after_fork(right)
    out = capsys.readouterr().out
    assert_not_revealed(out, right)
    assert "blocks: the prompt's 3" not in out  # the parts the answer is the sum of
    hints = failures(*(lambda w=w: check_blocks_after_fork(w) for w in (12, 7, 3, "6")))
    assert_hints_hide(hints, right)


def test_gather_hides_the_answer(capsys):
    check_gather(right_gather)
    out = capsys.readouterr().out
    gen = torch.Generator().manual_seed(5)  # the check's own pool, to know its expected keys
    pool = BlockAllocator(2, 12, 4, 2, 3)
    for t in pool.k_pool:
        t.copy_(torch.randn(t.shape, generator=gen))
    want = gather_kv(pool, torch.tensor([[7, 2, 9]]), torch.tensor([10]), 0)[0][0]  # (K, n, D)
    values = [want, want[0, 0], want[0, 0, 0].item()]
    assert_not_revealed(out, *values)
    hints = failures(
        lambda: check_gather(physical_order),
        lambda: check_gather(
            lambda pool, table, n, layer: right_gather(pool, table, n, layer)[:, 1:]
        ),
    )
    assert_hints_hide(hints, *values)
