"""Section "paged": one decode attention step over S cached tokens, contiguous vs paged.

Contenders on the same K/V: `kvlib.attention.attention` over contiguous k, v (B, K, S, D), and
`kvlib.paged.paged_attention` over the same tokens in a pool of shuffled blocks, with each
method: gather (copy the blocks into a contiguous tensor first), blocks (visit the blocks in
place), blocks grouped (several blocks per step) and, on the CPU in float32, fused (the
Numba kernel of `kvlib.paged_kernel`). Target: the fused path at most 1.3x contiguous, on one
thread, for kvlib's default block (16 tokens) and a large one (128).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvlib.attention import attention
from kvlib.bench.problems import decode_problem, paged_copy
from kvlib.bench.report import fmt, target
from kvlib.bench.section import Settings
from kvlib.paged_attention import paged_attention
from kvlib.timing import interleaved, median

BLOCK_SIZES = (16, 128)  # kvlib's default block, and a large one (fewer, longer visits)
PAGED_TARGET = "paged_fused"  # the path the target is for: reads blocks in place (CPU)
PAGED_RATIO_TARGET = 1.3  # paged decode attention time <= this x contiguous
GROUPED_TOKENS = 512  # "blocks" with blocks_per_step: visit this many tokens' blocks per step


def bench_paged(
    device: torch.device,
    S: int,
    B: int = 4,
    H: int = 8,
    K: int = 2,
    D: int = 64,
    block_size: int = 16,
    reps: int = 5,
    dtype: torch.dtype = torch.float32,
    threads: int | None = None,
    progress: Callable[[], None] | None = None,
) -> dict:
    """Time of one decode attention (T=1) over S cached tokens: contiguous vs paged paths.

    paged_fused (kvlib.paged_kernel) runs only on the CPU in float32. threads: torch CPU
    threads for this figure (default: as set); restored afterwards.
    """
    q, k, v = decode_problem(B, H, K, S, D, dtype, device, seed=0)
    pool, tables, seq_lens = paged_copy(k, v, block_size, seed=1)
    per_step = max(GROUPED_TOKENS // block_size, 1)  # blocks visited per step when grouped
    methods = {
        "paged_gather": {"method": "gather"},
        "paged_blocks": {"method": "blocks"},
        "paged_blocks_grouped": {"method": "blocks", "blocks_per_step": per_step},
    }
    if device.type == "cpu" and dtype == torch.float32:
        methods["paged_fused"] = {"method": "fused"}
    outs: dict[str, torch.Tensor] = {}

    def contender(name: str) -> Callable[[], None]:
        if name == "contiguous":
            return lambda: outs.__setitem__(name, attention(q, k, v))
        kw = methods[name]
        return lambda: outs.__setitem__(name, paged_attention(q, pool, tables, seq_lens, 0, **kw))

    previous = torch.get_num_threads()
    torch.set_num_threads(previous if threads is None else threads)
    try:
        fns = {name: contender(name) for name in ("contiguous", *methods)}
        times = interleaved(fns, reps, device)
    finally:
        torch.set_num_threads(previous)
    med = {name: median(ts) for name, ts in times.items()}
    max_diff = {
        name: float((outs[name].float() - outs["contiguous"].float()).abs().max())
        for name in methods
    }
    if progress:
        progress()
    return {
        "shape": {"B": B, "H": H, "K": K, "S": S, "D": D, "block_size": block_size},
        "dtype": str(dtype),
        "threads": torch.get_num_threads() if threads is None else threads,
        "median_s": med,
        "ratio": {name: med[name] / med["contiguous"] for name in methods},
        "blocks_per_step_grouped": per_step,
        "max_abs_diff": max_diff,
        "times_s": times,
    }


def paged_target(block_size: int, figure: dict) -> dict:
    """The fused path's time / contiguous (the gather path's where there is no fused one)."""
    name = PAGED_TARGET if PAGED_TARGET in figure["ratio"] else "paged_gather"
    return target(
        "paged vs contiguous decode attention",
        f"{name} (block {block_size}, 1 thread) time / contiguous",
        figure["ratio"][name],
        "<=",
        PAGED_RATIO_TARGET,
        "" if name == PAGED_TARGET else "no fused paged path on this device",
    )


def run(quick: bool, settings: Settings) -> dict:
    """The section: S = 512 quick, 2048 full; each block size on one thread (the target), and
    on the run's threads too when it has more than one."""
    S = 512 if quick else 2048
    figure: dict = {"targets": []}
    for P in BLOCK_SIZES:
        # one thread: torch's OpenMP pool and Numba's are separate pools, and on few cores
        # they contend; the figure is about the layout, not the pools
        p = figure[str(P)] = bench_paged(
            settings.device, S, block_size=P, reps=settings.reps, threads=1
        )
        figure["targets"].append(paged_target(P, p))
        if settings.threads > 1:
            figure[f"{P}, {settings.threads} threads"] = bench_paged(
                settings.device, S, block_size=P, reps=settings.reps, threads=settings.threads
            )
    return figure


def format(figure: dict) -> list[str]:
    lines = []
    for p in figure.values():
        lines.append(f"\ndecode attention, {p['shape']}, {p['threads']} thread(s)")
        for name, t in p["median_s"].items():
            ratio = p["ratio"].get(name)
            lines.append(
                f"{name:>20} {t * 1e6:10.1f} us  {'' if ratio is None else 'x' + fmt(ratio)}"
            )
    return lines
