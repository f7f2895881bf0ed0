"""Section "bandwidth": decode attention's achieved bandwidth as a fraction of a copy's.

A decode step must read every cached key and value once, so its speed limit is the memory
bandwidth. The figure: K/V bytes read per second by `kvlib.attention.attention` over a large
cache, against `kvlib.timing.copy_bandwidth` (bytes read + written per second) on the same
device. Target: at least half the copy bandwidth.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvlib.attention import attention
from kvlib.bench.problems import decode_problem
from kvlib.bench.report import target
from kvlib.bench.section import Settings
from kvlib.timing import copy_bandwidth, interleaved, median

FRACTION_TARGET = 0.5  # attention's K/V bytes per second >= this x the copy's


def bench_bandwidth(
    device: torch.device,
    kv_bytes: int,
    B: int = 4,
    H: int = 32,
    K: int = 8,
    D: int = 128,
    reps: int = 5,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[], None] | None = None,
) -> dict:
    """Decode attention's achieved bandwidth (K/V bytes read / s) as a fraction of copy's."""
    el = torch.empty((), dtype=dtype).element_size()
    S = max(kv_bytes // (2 * B * K * D * el), 1)
    q, k, v = decode_problem(B, H, K, S, D, dtype, device, seed=2)
    t_attn = median(interleaved({"attn": lambda: attention(q, k, v)}, reps, device)["attn"])
    read = 2 * B * K * S * D * el  # every key and value read once
    copy = copy_bandwidth(device, read, reps)
    attn_bw = read / t_attn
    if progress:
        progress()
    return {
        "shape": {"B": B, "H": H, "K": K, "S": S, "D": D},
        "dtype": str(dtype),
        "kv_bytes_read": read,
        "attention_s": t_attn,
        "attention_bytes_per_s": attn_bw,
        "copy": copy,
        "fraction_of_copy": attn_bw / copy["bytes_per_s"],
        "note": "copy bandwidth counts bytes read + written; attention counts K/V bytes read",
    }


def run(quick: bool, settings: Settings) -> dict:
    """The section: 32 MiB of K/V quick, 256 MiB full."""
    kv_bytes = (32 if quick else 256) * 2**20
    figure = bench_bandwidth(settings.device, kv_bytes, reps=settings.reps)
    figure["targets"] = [
        target(
            "decode attention bandwidth",
            "fraction of copy bandwidth",
            figure["fraction_of_copy"],
            ">=",
            FRACTION_TARGET,
        )
    ]
    return figure


def format(figure: dict) -> list[str]:
    b = figure
    return [
        f"\nbandwidth: attention reads {b['kv_bytes_read'] / 2**20:.0f} MiB of K/V at "
        f"{b['attention_bytes_per_s'] / 1e9:.2f} GB/s; copy moves "
        f"{b['copy']['bytes_per_s'] / 1e9:.2f} GB/s; fraction {b['fraction_of_copy']:.2f}"
    ]
