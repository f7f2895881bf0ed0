"""Checks for chapter A's exercises (a serving engine): each computes its answer with kvlib."""

from __future__ import annotations

import random
from collections.abc import Callable

from kvlib.engine.blocks import BlockPool, block_hash
from kvlib.exercises import correct, expect


def check_block_keys(fn: Callable, block_size: int = 4) -> None:
    """fn(token_ids, block_size, salt) -> the keys of the full blocks, chained (`block_hash`)."""
    rng = random.Random(0)
    cases = [([1, 2, 3, 4, 5, 6, 7, 8, 9], None), ([1, 2, 3, 4], "tenant-a"), ([7, 7, 7], None)]
    cases += [([rng.randrange(64) for _ in range(rng.randrange(1, 30))], None) for _ in range(5)]
    for tokens, salt in cases:
        pool = BlockPool(64, block_size, "hash")
        table = pool.allocate(pool.blocks_for(len(tokens)))
        expected: list = []
        pool.register(tokens, len(tokens), table, expected, salt)
        got = fn(list(tokens), block_size, salt)
        expect(isinstance(got, list), f"return a list of keys, not {type(got).__name__}")
        n_full = len(tokens) // block_size
        expect(
            len(got) == n_full,
            f"{len(tokens)} tokens in blocks of {block_size} give {n_full} full block(s); "
            f"you returned {len(got)} keys (only full blocks are cached)",
        )
        if got and expected and got[0] != expected[0]:
            unchained = block_hash(None, tuple(tokens[:block_size]), None)
            expect(salt is None or got[0] != unchained, "the salt goes into every block's hash")
            expect(False, "the first key is wrong: hash(None, the first block's tokens, salt)")
        for i in range(1, len(got)):
            if got[i] != expected[i]:
                alone = block_hash(None, tuple(tokens[i * block_size : (i + 1) * block_size]), salt)
                expect(got[i] != alone, f"key {i} ignores its parent: chain it to key {i - 1}")
                expect(False, f"key {i} is wrong: hash(key {i - 1}, block {i}'s tokens, salt)")
    correct("your keys are the pool's: each names its block's tokens and every token before them")


def _victims(running: list[tuple[str, int]], free: int, need: int) -> list[str]:
    """The engine's rule: the newest running request gives way, until enough blocks are free."""
    out, queue = [], list(running)
    while free < need and queue:
        name, held = queue.pop()
        out.append(name)
        free += held
    return out


def check_victims(fn: Callable) -> None:
    """fn(running, free, need) -> names preempted; running: (name, blocks held), oldest first."""
    rng = random.Random(1)
    cases = [([("a", 3), ("b", 2), ("c", 4)], 1, 3), ([("a", 1), ("b", 1)], 2, 1)]
    for _ in range(20):
        n = rng.randrange(1, 6)
        running = [(chr(ord("a") + i), rng.randrange(1, 5)) for i in range(n)]
        cases.append((running, rng.randrange(0, 3), rng.randrange(1, 8)))
    for running, free, need in cases:
        got = fn(list(running), free, need)
        expected = _victims(running, free, need)
        expect(isinstance(got, list), f"return a list of names, not {type(got).__name__}")
        if got == expected:
            continue
        expect(
            not (got and got == [name for name, _ in running[: len(got)]]),
            "you preempt the oldest requests: the newest arrival gives way (it has waited least)",
        )
        expect(
            len(got) >= len(expected),
            f"with {free} free and {need} needed you stop too early: keep preempting until the "
            "free blocks cover the need",
        )
        expect(
            len(got) <= len(expected),
            "you preempt more requests than needed: stop as soon as enough blocks are free",
        )
        expect(False, "wrong victims: take them newest first")
    correct("your victims are the scheduler's: newest first, and only as many as needed")
