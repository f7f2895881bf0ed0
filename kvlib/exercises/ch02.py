"""Checks for chapter 2 (cached attention): causal masks, padding, a GQA decode step.

Masks are (T, S) bool, True = may attend; query t sits at slot S - T + t.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvlib.attention import attention, causal_mask, padding_mask
from kvlib.exercises import correct, expect

# (T, S) pairs the mask check tries: prefill (T == S), decode (T == 1) and in between.
MASK_SIZES = [(1, 1), (4, 4), (1, 6), (3, 7), (5, 8), (0, 3)]


def check_causal_mask(fn: Callable[[int, int], torch.Tensor]) -> None:
    """`fn(T, S)` must return the (T, S) bottom-right causal mask for every size tried."""
    expect(callable(fn), f"pass your function itself (my_causal_mask), got {type(fn).__name__}")
    for T, S in MASK_SIZES:
        got = fn(T, S)
        want = causal_mask(T, S)
        expect(isinstance(got, torch.Tensor), f"fn({T}, {S}) returned {type(got).__name__}")
        expect(
            got.dtype == torch.bool,
            f"fn({T}, {S}) has dtype {got.dtype}; masks are bool (True = may attend)",
        )
        expect(
            tuple(got.shape) == (T, S),
            f"fn({T}, {S}) has shape {tuple(got.shape)}, expected ({T}, {S})",
        )
        if not torch.equal(got.cpu(), want):
            if T and torch.equal(got.cpu(), torch.ones(T, S, dtype=torch.bool).tril()):
                expect(False, f"fn({T}, {S}) is top-left aligned: query t sits at slot S - T + t")
            bad = (got.cpu() != want).nonzero()[0].tolist()
            expect(False, f"fn({T}, {S}) is wrong at (query, key) = {tuple(bad)}")
    correct(f"bottom-right causal masks for {len(MASK_SIZES)} (T, S) sizes, decode included")


def check_padded_causal_mask(mask: torch.Tensor, n_pad: torch.Tensor, T: int, S: int) -> None:
    """`mask` must broadcast to (B, 1, T, S): causal, and blind to row b's first n_pad[b] slots."""
    n_pad = torch.as_tensor(n_pad)
    B = n_pad.shape[0]
    valid = torch.arange(S)[None, :] >= n_pad[:, None]  # (B, S) real key slots
    causal = causal_mask(T, S).expand(B, 1, T, S)  # (B, 1, T, S)
    keys_only = padding_mask(valid).expand(B, 1, T, S)  # (B, 1, T, S)
    want = causal & keys_only  # (B, 1, T, S)
    expect(
        isinstance(mask, torch.Tensor), f"mask should be a torch.Tensor, got {type(mask).__name__}"
    )
    expect(mask.dtype == torch.bool, f"mask has dtype {mask.dtype}; masks are bool (True = attend)")
    try:
        got = torch.broadcast_to(mask.cpu(), (B, 1, T, S))  # (B, 1, T, S)
    except RuntimeError:
        got = None
    expect(
        got is not None, f"mask of shape {tuple(mask.shape)} does not broadcast to {(B, 1, T, S)}"
    )
    if not torch.equal(got, want):
        expect(not torch.equal(got, causal), "padding slots are still visible: mask them out too")
        expect(not torch.equal(got, keys_only), "future keys are visible: combine with causal")
        expect(
            False,
            "mask differs: True only where key s is not in query t's future AND slot s is real",
        )
    correct(f"causal and padding combined for {B} rows of {S} slots")


def check_decode_step(
    out: torch.Tensor, q_new: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
) -> None:
    """`out` (B, H, 1, D) must be the newest token's attention over the whole cache (GQA)."""
    want = attention(q_new, k_cache, v_cache)  # (B, H, 1, D); one query sees every cached key
    expect(isinstance(out, torch.Tensor), f"out should be a torch.Tensor, got {type(out).__name__}")
    expect(
        tuple(out.shape) == tuple(want.shape),
        f"out has shape {tuple(out.shape)}, expected (B, H, 1, D) = {tuple(want.shape)}",
    )
    tol = 1e-10 if want.dtype == torch.float64 else 1e-4

    def close(x: torch.Tensor) -> bool:
        return (out.double() - x.double()).abs().max().item() < tol

    if not close(want):
        G = q_new.shape[1] // k_cache.shape[1]
        interleaved = k_cache.repeat(1, G, 1, 1), v_cache.repeat(1, G, 1, 1)  # head h -> h % K
        expect(
            not close(attention(q_new, *interleaved)),
            "query head h reads kv head h // G (groups of G neighbours), not h % K",
        )
        expect(
            not close(attention(q_new, k_cache, v_cache, scale=1.0)),
            "scale the scores by 1 / sqrt(D) before the softmax",
        )
        expect(False, "out differs from attention of the new query over all cached keys/values")
    correct(f"the new token's output for all {want.shape[1]} query heads")
