"""Checks for chapter 7's exercises (chunked prefill and online softmax)."""

from __future__ import annotations

import torch

from kvlib.chunked import (
    allocation_profile,
    chunk_bounds,
    chunked_prefill,
    online_softmax_attention,
)
from kvlib.config import ModelConfig
from kvlib.exercises import correct, expect
from kvlib.kv_cache import KVCache
from kvlib.notebook import within
from kvlib.transformer import Transformer


def check_merge(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
) -> None:
    """`out`, `lse` merge attention over k[:, :, :half] and k[:, :, half:] into attention over k."""
    want_out, want_lse = online_softmax_attention(q, k, v, block_size=k.shape[2], return_lse=True)
    for name, x, want in (("out", out, want_out), ("lse", lse, want_lse)):
        expect(isinstance(x, torch.Tensor), f"{name} must be a torch.Tensor")
        expect(
            tuple(x.shape) == tuple(want.shape),
            f"{name} has shape {tuple(x.shape)}, expected {tuple(want.shape)}",
        )
    half = k.shape[2] // 2
    a = online_softmax_attention(q, k[:, :, :half], v[:, :, :half], block_size=half)
    b = online_softmax_attention(q, k[:, :, half:], v[:, :, half:], block_size=half)
    expect(
        not torch.allclose(out.double(), (a.double() + b.double()) / 2),
        "a plain average weighs both halves equally; weigh each by its share of the softmax "
        "mass, exp(lse_part - lse)",
    )
    lse_diff = (lse.double() - want_lse.double()).abs().max().item()
    expect(
        lse_diff < 1e-6,
        f"lse is off by up to {lse_diff:.3g}: the total mass is exp(lse_a) + exp(lse_b), so "
        "lse = m + log(exp(lse_a - m) + exp(lse_b - m)) with m = max(lse_a, lse_b)",
    )
    diff = (out.double() - want_out.double()).abs().max().item()
    expect(diff < 1e-6, f"out differs from attention over all keys by up to {diff:.3g}")
    correct(f"the two halves merge into full attention: max difference {within(diff, 1e-6)}")


def check_largest_allocation(answer: int, config: ModelConfig, n_tokens: int, chunk: int) -> None:
    """Bytes of the largest tensor `chunked_prefill` allocates (fp32, batch 1), measured."""
    expect(
        isinstance(answer, int) and not isinstance(answer, bool),
        f"answer with an int number of bytes, not {type(answer).__name__}",
    )
    torch.manual_seed(0)
    model = Transformer(config).eval()
    tokens = torch.zeros(1, n_tokens, dtype=torch.long)
    cache = KVCache.from_config(config, 1, n_tokens, dtype=torch.float32)
    measured = allocation_profile(lambda: chunked_prefill(model, tokens, cache, chunk))
    H, bytes_fp32 = config.n_heads, 4
    last_start, last_end = chunk_bounds(n_tokens, chunk)[-1]
    if answer != measured.largest_bytes:
        expect(
            answer != H * n_tokens * n_tokens * bytes_fp32,
            "that is the full prefill's (T, T) score matrix; a chunk has only `chunk` query rows",
        )
        expect(
            answer != H * (last_end - last_start) * n_tokens * bytes_fp32,
            "the last chunk sees every key, but it is short here: which chunk has the most "
            "(queries x keys)?",
        )
        expect(
            False,
            f"{answer:,} bytes is not what was measured: count H x (chunk queries) x (keys so "
            "far) x 4 bytes for every chunk and take the largest",
        )
    correct(
        f"your bytes match the largest tensor chunked_prefill allocated (by {measured.largest_op})"
    )
