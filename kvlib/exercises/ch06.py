"""Checks for chapter 6's exercises (the quantized cache): each computes its answer with kvlib."""

from __future__ import annotations

import math

import torch

from kvlib.exercises import correct, expect
from kvlib.memory import get_model
from kvlib.quant import QuantizedKVCache, QuantScheme, kivi, quantize


def check_int4_bytes_per_token(
    answer: int, model: str = "Llama-2-7B", group_size: int = 32
) -> None:
    """KV bytes per token of `model` in int4, asymmetric, groups of `group_size` channels,
    an fp32 scale and an fp32 zero point per group."""
    expect(
        isinstance(answer, int) and not isinstance(answer, bool),
        f"answer with an int number of bytes, not {type(answer).__name__}",
    )
    config = get_model(model)
    scheme = QuantScheme(4, "group", "group", group_size=group_size, symmetric=False)
    S = 8
    kv = torch.zeros(1, config.n_kv_heads, S, config.head_dim)  # (B, K, S, D)
    cache = QuantizedKVCache.from_config(config, 1, S, scheme)
    for layer in range(config.n_layers):
        cache.update(layer, kv, kv)
    expected = cache.nbytes_used // S
    codes_only = config.kv_elements_per_token // 2
    expect(
        answer != codes_only,
        "too small: that counts only the 4-bit codes, add each group's scale and zero point",
    )
    expect(
        answer != codes_only + config.kv_elements_per_token // group_size * 4,
        "too small: each group stores a zero point as well as a scale (asymmetric), 8 bytes per "
        "group",
    )
    expect(answer == expected, f"{answer:,} bytes is not right: codes + 8 bytes per group")
    correct(
        f"your int4 bytes per token for {model} (groups of {group_size} channels, fp32 scale and "
        "zero point) match the quantized cache's"
    )


def check_max_error(answer: float, x: torch.Tensor, bits: int = 4) -> None:
    """The largest error a symmetric per-token round trip of x (S, D) at `bits` can make."""
    expect(isinstance(answer, (int, float, torch.Tensor)), "answer with a number")
    answer = float(answer)
    step = quantize(x.float(), bits, granularity="token", symmetric=True).step()
    expected = float(step.max()) / 2
    expect(
        not math.isclose(answer, 2 * expected, rel_tol=1e-4),
        "your answer is twice the right one: that is a whole step, rounding to the nearest "
        "level errs by at most half of it",
    )
    expect(
        math.isclose(answer, expected, rel_tol=1e-4),
        f"{answer:.6g} is not right: step = max|x| / (2**(bits-1) - 1) for the row with the "
        "largest max|x|; the bound is half a step",
    )
    correct("your bound matches half the largest quantization step of x: no element errs more")


def check_kivi_full_precision(answer: tuple[int, int], S: int = 100, R: int = 32) -> None:
    """(keys, values) a KIVI cache with residual R holds in full precision after S tokens."""
    expect(
        isinstance(answer, tuple) and len(answer) == 2,
        "answer with a tuple (keys, values) of two ints",
    )
    cache = QuantizedKVCache(1, 1, 1, 8, R * (S // R + 1), kivi(2, residual=R))
    kv = torch.zeros(1, 1, 1, 8)  # (B, K, T, D)
    for _ in range(S):
        cache.update(0, kv, kv)
    expected = cache.n_full_precision(0)
    expect(answer[0] != R, "keys wait only until their block of R fills, then leave together")
    expect(
        answer[1] != S % R or expected[1] == S % R,
        "values slide: the R most recent stay in full precision",
    )
    expect(
        tuple(answer) == expected,
        f"{answer} is not right: keys are quantized a whole block of R at a time, values leave "
        "one by one once more than R have come",
    )
    correct(f"your (keys, values) counts match the KIVI cache's after {S} tokens")
