"""Checks for chapter 5's exercises (paged attention): each computes its answer with kvlib."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from kvlib.exercises import correct, expect
from kvlib.paged import BlockAllocator, PagedKVCache, gather_kv


def _int(answer: object, what: str) -> None:
    expect(
        isinstance(answer, int) and not isinstance(answer, bool),
        f"answer with an int number of {what}, not {type(answer).__name__}",
    )


def check_wasted_slots(
    answer: int, lengths: Sequence[int] = (5, 17, 32, 40), block_size: int = 16
) -> None:
    """Slots allocated but empty when sequences of `lengths` tokens live in blocks of block_size."""
    _int(answer, "slots")
    pool = BlockAllocator(1, 64, block_size, 1, 2)
    cache = PagedKVCache(pool, batch_size=1)
    for n in lengths:
        cache.set_active([cache.add_sequence()])
        kv = torch.zeros(1, 1, n, 2)  # (B, K, T, D)
        cache.update(0, kv, kv)
    token_bytes = cache._token_bytes()
    expected = (cache.nbytes_allocated - cache.nbytes_used) // token_bytes
    full = sum(-(-n // block_size) for n in lengths) * block_size
    expect(answer >= 0, "a count of empty slots cannot be negative")
    expect(answer != full, f"{answer} is every allocated slot; subtract the slots holding tokens")
    expect(
        answer == expected,
        f"{answer} is not right: each sequence wastes only the empty part of its last block",
    )
    correct(
        "your count of empty slots matches the paged cache's: only the last block of each "
        "sequence has any"
    )


def check_blocks_after_fork(
    answer: int, prompt_len: int = 21, block_size: int = 8, n_samples: int = 4
) -> None:
    """Blocks in use after a prompt is forked into n_samples and each appends one token."""
    _int(answer, "blocks")
    pool = BlockAllocator(1, 64, block_size, 1, 2)
    cache = PagedKVCache(pool, batch_size=1)
    kv = torch.zeros(1, 1, prompt_len, 2)  # (B, K, T, D)
    cache.update(0, kv, kv)
    seqs = [0] + [cache.fork(0) for _ in range(n_samples - 1)]
    cache.set_active(seqs)
    one = torch.zeros(n_samples, 1, 1, 2)  # (B, K, 1, D)
    cache.update(0, one, one)
    expected = pool.num_used
    prompt_blocks = -(-prompt_len // block_size)
    partial = prompt_len % block_size != 0
    expect(
        answer != prompt_blocks * n_samples,
        "too many: the samples share the prompt's blocks, forking copies no K/V",
    )
    if partial:
        expect(
            answer != prompt_blocks + n_samples,
            "one block too many: the last sample to write finds itself the only holder of the "
            "shared block, it writes in place instead of copying",
        )
    expect(
        answer == expected,
        f"{answer} is not right: count the prompt's blocks, then the copies made on write",
    )
    correct(
        "your block count matches the paged cache's: the prompt's blocks, plus the copies made "
        "on write"
    )


def check_gather(fn: Callable) -> None:
    """`fn(pool, table, n, layer)` returns one sequence's keys as (K, n, D) from the pool."""
    expect(callable(fn), "pass your function itself, not its result")
    gen = torch.Generator().manual_seed(5)
    pool = BlockAllocator(2, 12, 4, 2, 3)
    for t in pool.k_pool:
        t.copy_(torch.randn(t.shape, generator=gen))
    for table, n in (([7, 2, 9], 10), ([3], 4), ([11, 0], 5)):
        for layer in (0, 1):
            got = fn(pool, table, n, layer)
            expect(
                isinstance(got, torch.Tensor),
                f"return a torch.Tensor, got {type(got).__name__}",
            )
            tables = torch.tensor([table])  # (1, M)
            k, _, _ = gather_kv(pool, tables, torch.tensor([n]), layer)  # (1, K, n, D)
            want = k[0]
            expect(
                tuple(got.shape) == tuple(want.shape),
                f"table {table}, n={n}: expected shape (K, n, D) = {tuple(want.shape)}, "
                f"got {tuple(got.shape)}",
            )
            expect(
                torch.equal(got, want),
                f"table {table}, n={n}, layer {layer}: wrong keys; token i is in block "
                "table[i // block_size], slot i % block_size",
            )
    correct("your gather reads every token through the block table")
