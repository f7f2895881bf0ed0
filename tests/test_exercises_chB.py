"""Chapter B exercise checks: each accepts a right answer and rejects wrong ones with a hint."""

from __future__ import annotations

import pytest

from kvlib.exercises.chB import check_num_blocks, check_prefix_hits


def _common(p, q):
    n = 0
    while n < min(len(p), len(q)) and p[n] == q[n]:
        n += 1
    return n


def right_hits(prompts, P):
    total = 0
    for i, p in enumerate(prompts):
        best = max((_common(p, q) for q in prompts[:i]), default=0)
        total += min(best, len(p) - 1) // P * P
    return total


def previous_only(prompts, P):
    total = 0
    for i, p in enumerate(prompts[1:], 1):
        total += min(_common(p, prompts[i - 1]), len(p) - 1) // P * P
    return total


def tokens_not_blocks(prompts, P):
    return right_hits(prompts, 1)


def last_token_too(prompts, P):
    total = 0
    for i, p in enumerate(prompts):
        total += max((_common(p, q) for q in prompts[:i]), default=0) // P * P
    return total


def test_prefix_hits_accepts_the_pool_count(capsys):
    check_prefix_hits(right_hits)
    assert capsys.readouterr().out.startswith("Correct")


@pytest.mark.parametrize(
    ("wrong", "match"),
    [
        (previous_only, "any earlier prompt"),
        (tokens_not_blocks, "more hits"),
        (last_token_too, "last token"),
        (lambda ps, P: float(right_hits(ps, P)), "an int"),
    ],
)
def test_prefix_hits_rejects(wrong, match):
    with pytest.raises(AssertionError, match=match):
        check_prefix_hits(wrong)


def right_blocks(config, P, kv_bytes, dtype):
    per_token = 2 * config.n_layers * config.n_kv_heads * config.head_dim * dtype.itemsize
    return kv_bytes // (P * per_token)


def test_num_blocks_accepts_whole_blocks(capsys):
    check_num_blocks(right_blocks)
    assert capsys.readouterr().out.startswith("Correct")


@pytest.mark.parametrize(
    ("wrong", "match"),
    [
        (lambda c, P, b, d: 2 * right_blocks(c, P, b, d), "a key AND a value"),
        (
            lambda c, P, b, d: b // (P * 2 * c.n_layers * c.n_heads * c.head_dim * d.itemsize),
            "query heads",
        ),
        (lambda c, P, b, d: b // (P * 2 * c.n_layers * c.n_kv_heads * c.head_dim), "bytes"),
        (lambda c, P, b, d: right_blocks(c, P, b, d) + 1, "round down"),
        (lambda c, P, b, d: float(right_blocks(c, P, b, d)), "an int"),
    ],
)
def test_num_blocks_rejects(wrong, match):
    with pytest.raises(AssertionError, match=match):
        check_num_blocks(wrong)
