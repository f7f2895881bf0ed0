"""Checks for chapter 1's exercises (the KV cache data structure)."""

from __future__ import annotations

import torch

from kvlib.exercises import correct, expect
from kvlib.kv_cache import ConcatKVCache, KVCache
from kvlib.memory import get_model


def check_bytes_per_token(
    answer: int, model: str = "Llama-3-8B", dtype: torch.dtype = torch.bfloat16
) -> None:
    """The KV cache bytes one token costs in `model` at `dtype`, over all layers."""
    config = get_model(model)
    expected = config.kv_bytes_per_token(dtype)
    expect(
        isinstance(answer, int), f"answer with an int number of bytes, not {type(answer).__name__}"
    )
    expect(
        answer != expected // 2,
        "your answer is half the right one: K and V are both cached, count 2 tensors per layer",
    )
    expect(
        answer != expected * config.group_size,
        f"your answer is {config.group_size}x too large: {model} uses GQA, the cache holds "
        f"n_kv_heads={config.n_kv_heads} heads, not n_heads",
    )
    expect(
        answer == expected, f"{answer:,} bytes is not right: use 2 * L * K * D * bytes per element"
    )
    correct(f"your bytes per token for {model} in {dtype} match kvlib.memory")


def check_concat_copies(answer: int, n_steps: int, elements_per_token: int) -> None:
    """Elements a torch.cat cache writes over n_steps one-token appends (one tensor, one layer)."""
    cache = ConcatKVCache(1, 1, 1, elements_per_token)
    one = torch.zeros(1, 1, 1, elements_per_token)
    for _ in range(n_steps):
        cache.update(0, one, one)
    expected = cache.elements_copied // 2  # the cache counts K and V; the question asks one tensor
    expect(
        answer != n_steps * elements_per_token,
        "that is what the preallocated cache writes; torch.cat copies the history every step",
    )
    expect(answer == expected, f"{answer:,} is not right: step i copies i tokens")
    correct(
        f"your count matches what torch.cat copies over {n_steps} steps; a preallocated cache "
        "writes each element once"
    )


def check_rollback(cache: KVCache, accepted_len: int, reference: KVCache) -> None:
    """`cache` was rolled back to the `accepted_len` tokens that `reference` holds."""
    expect(
        cache.seq_len <= accepted_len,
        f"the cache still holds {cache.seq_len} tokens, too many: keep the prompt and the "
        "accepted draft tokens, crop the rejected ones",
    )
    expect(
        cache.seq_len == accepted_len,
        f"the cache holds {cache.seq_len} tokens, too few: the prompt and the accepted draft "
        "tokens should stay",
    )
    for layer in range(cache.n_layers):
        n = accepted_len
        same = torch.equal(cache.keys[layer][:, :, :n], reference.keys[layer][:, :, :n])
        expect(same, f"layer {layer}: the kept tokens changed; crop should not touch them")
    correct("your cache holds exactly the prompt and the accepted tokens, unchanged")
