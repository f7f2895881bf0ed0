"""Checks for chapter 10 (GPU kernels); expected answers come from kvlib.gpu."""

from __future__ import annotations

import math
import re

import numpy as np

from kvlib.errors import KernelFaultError, ToolchainError
from kvlib.exercises import correct, expect
from kvlib.gpu import host
from kvlib.gpu.emulate import split_ranges
from kvlib.gpu.roofline import model_attention_intensity, ridge_point, tile_utilization
from kvlib.memory import get_model


def check_intensity(intensity: float, memory_bound: bool) -> None:
    """Decode attention of Qwen2.5-7B in fp16 over 32768 cached tokens, and the T4 verdict."""
    want = model_attention_intensity("Qwen2.5-7B", 32768)
    G = get_model("Qwen2.5-7B").group_size
    expect(
        isinstance(intensity, int | float) and not isinstance(intensity, bool),
        f"intensity should be a number of FLOP/byte, got {intensity!r}",
    )
    expect(
        not math.isclose(intensity, want / G, rel_tol=1e-2),
        f"that is the MHA value: each K/V row read serves G = {G} query heads, so count G times "
        "the FLOPs for the same bytes",
    )
    expect(
        not math.isclose(intensity, want / 2, rel_tol=1e-2),
        "your answer is half the right one: fp16 is 2 bytes per number, not 4",
    )
    expect(
        math.isclose(intensity, want, rel_tol=1e-3),
        f"{intensity:.4g} FLOP/byte is not right: FLOPs = 4*G*S*D per kv head, bytes = 2*S*D*2 "
        "(K and V) plus the small q and output",
    )
    expect(
        isinstance(memory_bound, bool),
        f"memory_bound should be True or False, not {memory_bound!r}",
    )
    expect(
        memory_bound == (want < ridge_point("T4")),
        "compare the intensity with the T4's ridge point, peak FLOP/s / bandwidth",
    )
    correct(
        "your intensity for Qwen2.5-7B over 32768 cached tokens and your verdict against the "
        "T4's ridge point both match kvlib.gpu.roofline"
    )


def check_tiles(n_tiles: int, utilization: float) -> None:
    """Llama-3-70B verifying T = 3 draft tokens: 16-row tiles per kv head and their use."""
    G, T = get_model("Llama-3-70B").group_size, 3
    rows = G * T
    want_tiles = -(-rows // 16)
    want_util = tile_utilization(G, T)
    expect(
        isinstance(n_tiles, int) and not isinstance(n_tiles, bool),
        f"n_tiles should be an int, got {n_tiles!r}",
    )
    expect(
        n_tiles != rows // 16 or rows % 16 == 0,
        "one tile short: the G*T rows need a partial tile too, round up",
    )
    expect(
        n_tiles == want_tiles,
        f"{n_tiles} tiles is not right: count G*T rows, 16 per tile, rounded up",
    )
    expect(
        not math.isclose(utilization, G / 16),
        "each of the T query tokens adds G rows: count G*T rows, not G",
    )
    expect(
        math.isclose(utilization, want_util, rel_tol=1e-9),
        f"{utilization} is not right: real rows / (tiles * 16)",
    )
    correct(
        "your tile count and utilization for Llama-3-70B verifying 3 draft tokens match "
        "kvlib.gpu.roofline"
    )


def check_split_ranges(ranges: list[tuple[int, int]]) -> None:
    """Split-KV partitions of a 1000-token sequence, block_size 16, 4 splits."""
    want = split_ranges(1000, 16, 4)
    got = [tuple(r) for r in ranges] if isinstance(ranges, list | tuple) else ranges
    expect(isinstance(got, list) and len(got) == 4, "give a list of 4 (begin, end) pairs")
    expect(
        got != [(0, 250), (250, 500), (500, 750), (750, 1000)],
        "partitions hold whole blocks of 16 tokens, so a block is never read by two of them",
    )
    expect(got[-1][1] == 1000, "the last partition must end at the sequence length, 1000")
    expect(
        got == want,
        "not quite: count the blocks of 16 that 1000 tokens fill (the last one partial); "
        "each partition takes ceil(blocks / 4) of them",
    )
    correct("your 4 partitions match split_range in paged_attention.cu")


WARP_SUM_ROWS = 6  # warps (blocks) the check launches, one per row of x


def _run_warp_sum(source: str, x: np.ndarray, order: str) -> np.ndarray:
    out = np.full(len(x), np.nan, np.float32)  # (rows,) NaN: a row never written shows
    try:
        return host.launch(
            "warp_sum.cu",
            "warp_sum",
            (len(x),),
            (32,),
            [x, out],
            order=order,
            sanitize=True,
            source=source,
        )["out"]
    except ToolchainError as err:
        errors = [
            re.sub(r"\S*warp_sum\.cu:", "line ", ln)
            for ln in str(err).splitlines()
            if "error" in ln
        ][:3]
        expect(False, "your kernel does not compile:\n" + "\n".join(errors))
    except KernelFaultError as err:
        lines = [ln for ln in str(err).splitlines() if "kvhost:" in ln or "ERROR" in ln][:1]
        expect(
            False,
            "the CPU run stopped your kernel, as a GPU would fault or hang:\n" + "\n".join(lines),
        )
    raise AssertionError("unreachable")


def check_warp_sum(source: str) -> None:
    """A CUDA kernel warp_sum(const float* x, float* out): one warp per row of x (rows, 32)
    adds the row with warp shuffles; lane 0 writes out[row]. Run on the CPU in both thread
    orders, under AddressSanitizer and UBSan."""
    expect(
        isinstance(source, str),
        f"source should be the kernel's CUDA text, a str, got {type(source).__name__}",
    )
    expect(
        "__shfl" in source,
        "add the 32 numbers with warp shuffles (__shfl_xor_sync or "
        "__shfl_down_sync), not a loop over memory",
    )
    expect(
        "__shared__" not in source,
        "no shared memory is needed: the shuffles move the numbers between the lanes' registers",
    )
    params = host.kernel_params(source)
    expect("warp_sum" in params, 'declare the kernel as extern "C" __global__ void warp_sum(...)')
    kinds = [(p.kind, p.dtype) for p in params["warp_sum"]]
    expect(kinds == [("p", np.float32)] * 2, "warp_sum takes (const float* x, float* out)")
    rng = np.random.default_rng(10)
    x = rng.integers(-100, 100, (WARP_SUM_ROWS, 32)).astype(np.float32)  # (rows, 32), exact sums
    want = x.sum(axis=1)  # (rows,)
    for order in host.ORDERS:
        got = _run_warp_sum(source, x, order)
        expect(
            not np.isnan(got).any(),
            "some rows of out were never written: lane 0 of each warp writes out[blockIdx.x]",
        )
        bad = int((got != want).sum())
        expect(
            bad == 0,
            f"the sums are wrong in {bad} of {WARP_SUM_ROWS} rows with the threads "
            f"run {order}: does every lane add in the value of every other?",
        )
    correct("your warp_sum adds every row with warp shuffles, with the threads in either order")
