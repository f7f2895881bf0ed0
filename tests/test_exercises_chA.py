"""Chapter A exercise checks: each accepts a right answer and rejects wrong ones with a hint."""

from __future__ import annotations

import pytest

from kvlib.engine.blocks import block_hash
from kvlib.exercises.chA import check_block_keys, check_victims


def right_keys(tokens, P, salt):
    keys, parent = [], None
    for i in range(len(tokens) // P):
        parent = block_hash(parent, tuple(tokens[i * P : (i + 1) * P]), salt)
        keys.append(parent)
    return keys


def unchained(tokens, P, salt):
    return [
        block_hash(None, tuple(tokens[i * P : (i + 1) * P]), salt) for i in range(len(tokens) // P)
    ]


def with_partial(tokens, P, salt):
    keys = right_keys(tokens, P, salt)
    if len(tokens) % P:
        keys.append(block_hash(keys[-1] if keys else None, tuple(tokens[len(keys) * P :]), salt))
    return keys


def no_salt(tokens, P, salt):
    return right_keys(tokens, P, None)


def test_block_keys_accepts_the_chain(capsys):
    check_block_keys(right_keys)
    assert capsys.readouterr().out.startswith("Correct")


@pytest.mark.parametrize(
    ("wrong", "match"),
    [
        (unchained, "ignores its parent"),
        (with_partial, "only full blocks"),
        (no_salt, "salt"),
        (lambda t, P, s: tuple(right_keys(t, P, s)), "a list"),
    ],
)
def test_block_keys_rejects(wrong, match):
    with pytest.raises(AssertionError, match=match):
        check_block_keys(wrong)


def right_victims(running, free, need):
    out = []
    for name, held in reversed(running):
        if free >= need:
            break
        out.append(name)
        free += held
    return out


def oldest_first(running, free, need):
    out = []
    for name, held in running:
        if free >= need:
            break
        out.append(name)
        free += held
    return out


def one_too_many(running, free, need):
    out = right_victims(running, free, need)
    rest = [name for name, _ in reversed(running) if name not in out]
    return out + rest[:1]


def test_victims_accepts_newest_first(capsys):
    check_victims(right_victims)
    assert capsys.readouterr().out.startswith("Correct")


@pytest.mark.parametrize(
    ("wrong", "match"),
    [
        (oldest_first, "newest arrival gives way"),
        (one_too_many, "more requests than needed"),
        (lambda r, f, n: [], "too early"),
    ],
)
def test_victims_rejects(wrong, match):
    with pytest.raises(AssertionError, match=match):
        check_victims(wrong)
