"""Checks for chapter 8's exercises (every optimization side by side; eviction for long streams)."""

from __future__ import annotations

import torch

from kvlib.config import ModelConfig
from kvlib.eviction import SinkCache
from kvlib.exercises import correct, expect
from kvlib.quant import QuantizedKVCache


def _sink_history(n_tokens: int, budget: int, n_sink: int) -> list[list[int]]:
    """Stream indices a one-layer SinkCache holds after each of n_tokens one-token steps."""
    cache = SinkCache(1, 1, 1, 2, budget, n_sink=n_sink, positions="original", rope_len=n_tokens)
    k = torch.zeros(1, 1, 1, 2)  # (B, K, T, D): the values do not matter, only which slots
    history = []
    for _ in range(n_tokens):
        cache.prepare(1)
        cache.update(0, k, k)
        history.append(cache.kept_positions(0)[0, 0].tolist())
    return history


def check_kept(kept: list[int], n_tokens: int, budget: int, n_sink: int) -> None:
    """`kept`: the stream indices a SinkCache(budget, n_sink) holds after n_tokens tokens."""
    expect(
        isinstance(kept, (list, tuple)) and all(isinstance(i, int) for i in kept),
        f"kept must be a list of ints, got {type(kept).__name__}",
    )
    want = _sink_history(n_tokens, budget, n_sink)[-1]
    kept = list(kept)
    expect(
        len(kept) == len(want),
        f"kept has {len(kept)} entries; the cache holds exactly budget = {len(want)} tokens",
    )
    expect(kept == sorted(kept), "list the indices in stream order (ascending)")
    expect(
        kept[:n_sink] == want[:n_sink],
        f"the first {n_sink} entries should be the sink tokens, the very first of the stream",
    )
    expect(
        kept == want,
        "after the sinks come the budget - n_sink most recent tokens, ending with the newest "
        "one (stream indices start at 0)",
    )
    correct(
        f"your indices match the SinkCache's after {n_tokens} tokens: the sinks, then a window "
        "of the most recent tokens"
    )


def check_sink_mask(mask: torch.Tensor, n_tokens: int, budget: int, n_sink: int) -> None:
    """`mask` (N, N) bool: which tokens each token attends to when streamed through a
    SinkCache(budget, n_sink) with positions='original' (row t: the cache after step t)."""
    N = n_tokens
    expect(isinstance(mask, torch.Tensor), f"mask must be a torch.Tensor, not {type(mask)}")
    expect(mask.dtype == torch.bool, f"mask must be a bool tensor, got {mask.dtype}")
    expect(tuple(mask.shape) == (N, N), f"mask must have shape ({N}, {N}), got {tuple(mask.shape)}")
    want = torch.zeros(N, N, dtype=torch.bool)
    for t, kept in enumerate(_sink_history(N, budget, n_sink)):
        want[t, kept] = True
    above = torch.triu(torch.ones(N, N, dtype=torch.bool), diagonal=1)
    expect(not bool((mask & above).any()), "a token never sees later tokens: keep it causal")
    expect(
        bool(mask[:, :n_sink].eq(want[:, :n_sink]).all()),
        f"every token (from token {n_sink - 1} on) sees the {n_sink} sink tokens",
    )
    rows = torch.nonzero((mask != want).any(1)).flatten().tolist()
    expect(
        not rows,
        f"rows {rows[:5]} differ: token t sees itself and the {budget - n_sink - 1} tokens "
        "before it, besides the sinks",
    )
    correct(f"each token sees at most {budget} tokens: {n_sink} sinks and a sliding window")


def check_fit(
    answer: int, config: ModelConfig, scheme: str, n_tokens: int, budget_bytes: int
) -> None:
    """`answer`: sequences of n_tokens that fit budget_bytes in a QuantizedKVCache of `scheme`."""
    expect(
        isinstance(answer, int) and not isinstance(answer, bool),
        f"answer with an int number of sequences, not {type(answer).__name__}",
    )
    cache = QuantizedKVCache.from_config(config, 1, n_tokens, scheme)
    g = torch.Generator().manual_seed(0)
    for layer in range(config.n_layers):
        kv = torch.randn(1, config.n_kv_heads, n_tokens, config.head_dim, generator=g)
        cache.update(layer, kv, kv)  # (B, K, S, D)
    per_seq = cache.nbytes_used
    want = budget_bytes // per_seq
    fp32 = budget_bytes // (n_tokens * config.kv_bytes_per_token(torch.float32))
    expect(
        answer != fp32 or want == fp32,
        "too few: that is the fp32 count, use the quantized cache's bytes",
    )
    expect(
        answer != budget_bytes // (n_tokens * config.kv_elements_per_token // 2),
        "too many: half a byte per number is not all, each token's scale and zero point take "
        "bytes too",
    )
    expect(
        answer == want,
        f"{answer} sequences is not right: read one {n_tokens}-token sequence's bytes from the "
        "cache's nbytes_used, then divide the budget by it, rounding down",
    )
    correct(
        f"your count of {n_tokens}-token sequences that fit the budget matches the {scheme!r} "
        "cache's nbytes_used"
    )
