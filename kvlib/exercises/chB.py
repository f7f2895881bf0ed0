"""Checks for chapter B's exercises (from kvlib to vLLM): each computes its answer with kvlib."""

from __future__ import annotations

import random
from collections.abc import Callable

import torch

from kvlib.config import ModelConfig
from kvlib.engine.blocks import BlockPool
from kvlib.exercises import correct, expect
from kvlib.memory import kv_bytes_per_token


def _prefix_hits(prompts: list[list[int]], block_size: int) -> int:
    """Prompt tokens a prefix cache finds when the prompts arrive one after another, each
    finished before the next: kvlib's BlockPool with room for all of them."""
    total = sum(len(p) for p in prompts)
    pool = BlockPool(total // block_size + len(prompts) + 1, block_size, "hash")
    hits = 0
    for p in prompts:
        table, keys = pool.match_prefix(p, None, len(p) - 1)
        hits += len(table) * block_size
        table = table + pool.allocate(pool.blocks_for(len(p)) - len(table))
        pool.register(p, len(p), table, keys, None)
        pool.free(table)
    return hits


def check_prefix_hits(fn: Callable) -> None:
    """fn(prompts, block_size) -> prompt tokens found in the prefix cache, one prompt after
    another (each finished before the next arrives)."""
    rng = random.Random(2)
    system = [rng.randrange(1000) for _ in range(100)]
    shared = [system + [rng.randrange(1000) for _ in range(rng.randrange(1, 60))] for _ in range(5)]
    cases = [(shared, 16), (shared, 128), (shared, 25), ([system[:32], system[:32]], 16)]
    cases += [([[1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]], 4)]
    for _ in range(6):
        base = [rng.randrange(8) for _ in range(rng.randrange(1, 40))]
        prompts = [base[: rng.randrange(1, len(base) + 1)] + [rng.randrange(8)] for _ in range(4)]
        cases.append((prompts, rng.choice([2, 4, 8])))
    for prompts, block_size in cases:
        got = fn([list(p) for p in prompts], block_size)
        expected = _prefix_hits(prompts, block_size)
        expect(
            isinstance(got, int), f"return a number of tokens (an int), not {type(got).__name__}"
        )
        if got == expected:
            continue
        expect(got % block_size == 0, "a prefix cache finds whole blocks only: a multiple of P")
        expect(
            got >= 0 and got <= sum(len(p) - 1 for p in prompts[1:]),
            "the first prompt finds nothing, and each later one at most all but its last token",
        )
        expect(
            got < expected,
            f"with blocks of {block_size} you count more hits than the cache finds: a block is "
            "found only if every token of it and before it matches, and a prompt's last token "
            "is never taken from the cache",
        )
        expect(
            False,
            f"with blocks of {block_size} you count fewer hits than the cache finds: a prompt "
            "matches any earlier prompt, not only the one just before it",
        )
    correct(
        "your counts are the block pool's: whole blocks of a common prefix, never the last token"
    )


def _num_blocks(config: ModelConfig, block_size: int, kv_bytes: int, dtype: torch.dtype) -> int:
    return kv_bytes // (block_size * kv_bytes_per_token(config, dtype))


def check_num_blocks(fn: Callable) -> None:
    """fn(config, block_size, kv_bytes, dtype) -> how many whole blocks fit in kv_bytes."""
    rng = random.Random(3)
    book = ModelConfig(
        vocab_size=1024, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=256
    )
    mha = ModelConfig(vocab_size=1024, dim=256, n_layers=6, n_heads=8, n_kv_heads=8)
    cases = [(book, 128, 2**30, torch.float32), (book, 16, 2**30, torch.float32)]
    cases += [(mha, 16, 10**9, torch.float16), (mha, 32, 3 * 2**20 - 1, torch.bfloat16)]
    for _ in range(6):
        config = rng.choice([book, mha])
        dtype = rng.choice([torch.float32, torch.float16])
        cases.append((config, rng.choice([16, 32, 128]), rng.randrange(1, 2**31), dtype))
    for config, P, kv_bytes, dtype in cases:
        got = fn(config, P, kv_bytes, dtype)
        expected = _num_blocks(config, P, kv_bytes, dtype)
        expect(
            isinstance(got, int), f"return a number of blocks (an int), not {type(got).__name__}"
        )
        if got == expected:
            continue
        L, K, D = config.n_layers, config.n_kv_heads, config.head_dim
        per_token = kv_bytes_per_token(config, dtype)
        expect(
            got != kv_bytes // (P * per_token // 2),
            "a token stores a key AND a value in every layer: 2 * L * K * D elements",
        )
        expect(
            got != kv_bytes // (P * 2 * L * config.n_heads * D * dtype.itemsize)
            or K == config.n_heads,
            "the cache holds the K key/value heads, not the H query heads (grouped attention)",
        )
        expect(
            got != kv_bytes // (P * 2 * L * K * D),
            f"count bytes, not elements: {dtype} has {dtype.itemsize} bytes per element",
        )
        expect(got <= expected, "only whole blocks fit: round down")
        expect(False, "wrong number of blocks: kv_bytes // (P * bytes of one token's K and V)")
    correct(
        "your pool sizes are right: whole blocks of P tokens, each token 2 * L * K * D elements"
    )
