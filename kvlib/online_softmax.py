"""The online softmax: attention over keys that arrive a chunk at a time, in one pass.

Softmax needs the largest score before it can weigh anything; the online form keeps, per query
row, a running max m, a running sum l of exp(score - m) and a running output o (the weighted
sum of values, not yet divided by l). A new chunk of scores s (rows, n) and values (n, D):

    m' = max(m, max s)          alpha = exp(m - m')        p = exp(s - m')
    l' = l * alpha + sum p      o' = o * alpha + p @ values

and after the last chunk out = o / l: the same result as softmax over all keys at once
(Milakov and Gimelshein 2018), with only one chunk of scores alive at a time. It is how
FlashAttention tiles keys, how chunked prefill attends (`kvlib.chunked`), how the block-by-block
paged read works (`kvlib.paged_attention`) and how the quantized read walks its codes
(`kvlib.quant_attention`).

Masked scores are -inf. A row that has seen only -inf so far keeps m = -inf and is shifted by
0 instead (no NaN); a row that saw nothing at all gets a zero output and lse = -inf. Scores
are fp32 (or fp64); shapes are (..., rows, n) with any leading dims.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

State = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # m, l (..., rows, 1); o (..., rows, D)


def online_softmax_step(
    state: State | None,
    scores: torch.Tensor,
    values: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
) -> State:
    """Fold one chunk into the running (m, l, o).

    scores: (..., rows, n), masked entries -inf. values: (..., n, D), or a function that takes
    the chunk's unnormalised weights p (..., rows, n) and returns p @ values (..., rows, D)
    (for values stored in another form, such as quantized codes). state: None before the
    first chunk.
    """
    chunk_max = scores.amax(dim=-1, keepdim=True)  # (..., rows, 1)
    m = chunk_max if state is None else torch.maximum(state[0], chunk_max)  # (..., rows, 1)
    shift = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # -inf rows: shift by 0
    p = torch.exp(scores - shift)  # (..., rows, n) unnormalised weights
    chunk_sum = p.sum(dim=-1, keepdim=True)  # (..., rows, 1)
    chunk_out = values(p) if callable(values) else p @ values  # (..., rows, D)
    if state is None:
        return m, chunk_sum, chunk_out
    alpha = torch.exp(state[0] - shift)  # (..., rows, 1) rescales what was summed before
    return m, state[1] * alpha + chunk_sum, state[2] * alpha + chunk_out


def online_softmax_result(state: State) -> torch.Tensor:
    """o / l (..., rows, D): the attention output; a row that saw nothing gets zeros."""
    _, l, o = state
    return o / torch.where(l > 0, l, torch.ones_like(l))


def online_softmax_lse(state: State) -> torch.Tensor:
    """log sum exp of each row's scores (..., rows): what merging two partial results needs;
    -inf for a row that saw nothing."""
    m, l, _ = state
    return (m + torch.log(l)).squeeze(-1)
