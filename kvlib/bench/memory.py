"""Section "memory": bytes per token and sequences that fit a memory budget, per cache.

Each sequence of a workload is written into a fresh cache and measured with the cache's own
accounting (`nbytes_allocated`, `nbytes_used`): contiguous reserves max_seq_len slots per
sequence, paged holds whole blocks, quantized caches hold their codes, scales and residuals.
No timing: the figure is the same on every machine.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from kvlib.bench.problems import generation_config, model_125m
from kvlib.bench.report import config_dict, fmt
from kvlib.config import ModelConfig
from kvlib.errors import BenchError
from kvlib.kv_cache import KVCache
from kvlib.paged import PagedKVCache

BUDGET_BYTES = 2**30


def _fill(cache, n_tokens: int, K: int, D: int, dtype: torch.dtype, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for layer in range(cache.n_layers):
        k = torch.randn(1, K, n_tokens, D, generator=g).to(dtype)  # (B=1, K, T, D)
        v = torch.randn(1, K, n_tokens, D, generator=g).to(dtype)  # (B=1, K, T, D)
        cache.update(layer, k, v)


def bench_memory(
    config: ModelConfig,
    budget_bytes: int,
    lengths: list[int],
    block_size: int = 16,
    dtype: torch.dtype = torch.float16,
    progress: Callable[[], None] | None = None,
) -> dict:
    """Bytes per token and sequences fitting `budget_bytes` for each cache strategy.

    Each sequence of the workload (`lengths`, tokens each) is written into a fresh cache and
    measured with the cache's own accounting. Contiguous reserves config.max_seq_len slots per
    sequence (nbytes_allocated); paged holds whole blocks (nbytes_allocated); quantized caches
    count what their codes, scales and residuals take (nbytes_used), as a pool of quantized
    blocks would hold them.
    """
    if not lengths or max(lengths) > config.max_seq_len or min(lengths) < 1:
        raise BenchError(
            f"lengths must be in [1, {config.max_seq_len}] (config.max_seq_len), got "
            f"{min(lengths, default=None)}..{max(lengths, default=None)}"
        )
    K, D, S_max = config.n_kv_heads, config.head_dim, config.max_seq_len

    def contiguous(n: int) -> tuple[int, int]:
        c = KVCache.from_config(config, 1, S_max, dtype=dtype)
        _fill(c, n, K, D, dtype, n)
        return c.nbytes_allocated, c.nbytes_used

    def paged(n: int) -> tuple[int, int]:
        c = PagedKVCache.from_config(
            config, 1, num_blocks=-(-n // block_size), block_size=block_size, dtype=dtype
        )
        _fill(c, n, K, D, dtype, n)
        return c.nbytes_allocated, c.nbytes_used

    strategies: dict[str, Callable[[int], tuple[int, int]]] = {
        "contiguous (max-length reservation)": contiguous,
        f"paged (block {block_size})": paged,
    }
    try:
        from kvlib import quant
    except ImportError:  # the quantized cache is optional
        quant = None
    if quant is not None:
        R = 32 if S_max % 32 == 0 else 0
        schemes = {"int8": quant.SCHEMES["int8 per-token"], "int4": quant.SCHEMES["int4 per-token"]}
        if R:
            schemes["KIVI-4"] = quant.kivi(4, residual=R)
            schemes["KIVI-2"] = quant.kivi(2, residual=R)

        def quantized(scheme) -> Callable[[int], tuple[int, int]]:
            def measure(n: int) -> tuple[int, int]:
                c = quant.QuantizedKVCache.from_config(config, 1, S_max, scheme, dtype=dtype)
                _fill(c, n, K, D, dtype, n)
                return c.nbytes_used, c.nbytes_used

            return measure

        for name, scheme in schemes.items():
            strategies[f"{name} ({scheme.label()})"] = quantized(scheme)

    rows = []
    total_tokens = sum(lengths)
    for name, measure in strategies.items():
        held = [measure(n) for n in lengths]  # (bytes held, bytes used) per sequence
        per_seq = sum(h for h, _ in held) / len(lengths)
        rows.append(
            {
                "strategy": name,
                "bytes_per_token": sum(h for h, _ in held) / total_tokens,
                "bytes_per_token_used": sum(u for _, u in held) / total_tokens,
                "bytes_per_sequence": per_seq,
                "sequences_in_budget": int(budget_bytes // per_seq),
            }
        )
        if progress:
            progress()
    base = rows[0]["sequences_in_budget"]
    for row in rows:
        row["vs_contiguous"] = row["sequences_in_budget"] / base if base else math.inf
    return {
        "config": config_dict(config),
        "dtype": str(dtype),
        "budget_bytes": budget_bytes,
        "lengths": {"n": len(lengths), "mean": total_tokens / len(lengths), "max": max(lengths)},
        "rows": rows,
    }


def run(quick: bool) -> dict:
    """The section: 16 sequences of a small model quick, 64 of the 125M-class model full,
    lengths drawn uniformly from 32 to the model's max_seq_len, in a 1 GiB budget."""
    if quick:
        config = generation_config(1008, 16).replace(name="bench-memory")
        n = 16
    else:
        config, n = model_125m(max_seq_len=2048), 64
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(32, config.max_seq_len + 1, (n,), generator=g).tolist()
    return bench_memory(config, BUDGET_BYTES, lengths)


def format(figure: dict) -> list[str]:
    mem = figure
    lines = [
        f"\nmemory ({mem['dtype']}, {mem['lengths']['n']} sequences, mean "
        f"{mem['lengths']['mean']:.0f} tokens, budget {mem['budget_bytes'] / 2**30:.1f} GiB)"
    ]
    lines.append(f"{'strategy':<48} {'bytes/token':>12} {'seqs':>6} {'vs contig':>9}")
    for r in mem["rows"]:
        lines.append(
            f"{r['strategy']:<48} {fmt(r['bytes_per_token']):>12} "
            f"{r['sequences_in_budget']:>6} {fmt(r['vs_contiguous']):>9}"
        )
    return lines
