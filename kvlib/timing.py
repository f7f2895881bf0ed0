"""Measuring side by side: the timing both benchmarks and the chapters use.

`python -m kvlib.bench` (CPU) and `python -m kvlib.bench --gpu` time their contenders the same
way: each one warmed up, then the contenders take turns (`interleaved`), and the median counts,
so a busy machine slows them all alike; `compare` is that in one call (name -> median seconds),
what the chapters' timing cells use. `copy_bandwidth` measures the memory bandwidth a copy
sees, the yardstick of every bandwidth figure. What a result reports (targets, machine,
versions) is `kvlib.bench.report`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable

import torch

from kvlib.errors import BenchError, KVLibTypeError, check_int


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU raises BenchError."""
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise KVLibTypeError(f"device must be a str or torch.device, got {type(device).__name__}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"device {device!r} asked for, but torch sees no CUDA GPU (use 'cpu')")
    if dev.type not in ("cpu", "cuda"):
        raise BenchError(f"device must be 'cpu', 'cuda' or 'auto', got {device!r}")
    return dev


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device | str) -> float:
    """Seconds one call of fn takes (the device synchronized before and after on CUDA)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def check_reps(reps: object) -> int:
    """reps, checked: BenchError unless it is an int >= 1."""
    return check_int("reps", reps, error=BenchError)


def interleaved(
    fns: dict[str, Callable[[], object]],
    reps: int,
    device: torch.device | str,
    warmup: int = 1,
    timer: Callable[[Callable[[], object], torch.device | str], float] = time_call,
) -> dict[str, list[float]]:
    """Time each contender `reps` times, taking turns (order rotated each round).

    Returns name -> list of seconds. Interleaving spreads slow phases of a busy machine over
    every contender instead of penalizing whichever ran during them. timer(fn, device) times
    one call (default `time_call`; the GPU bench passes CUDA events).
    """
    check_reps(reps)
    if not fns:
        raise BenchError("interleaved needs at least one contender")
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            times[name].append(timer(fns[name], device))
    return times


def median(xs: Iterable[float]) -> float:
    """The median of some timings."""
    xs = list(xs)
    if not xs:
        raise BenchError("median of no timings")
    return statistics.median(xs)


def compare(
    fns: dict[str, Callable[[], object]],
    reps: int = 5,
    device: torch.device | str = "cpu",
    warmup: int = 1,
    timer: Callable[[Callable[[], object], torch.device | str], float] = time_call,
) -> dict[str, float]:
    """name -> median seconds of one call, the contenders taking turns (`interleaved`).

    The one-line timing a notebook cell needs: `compare({"cached": f, "uncached": g}, reps=5)`.
    """
    return {name: median(ts) for name, ts in interleaved(fns, reps, device, warmup, timer).items()}


def copy_bandwidth(
    device: torch.device | str,
    nbytes: int,
    reps: int = 5,
    time_fns: Callable[..., dict[str, list[float]]] = interleaved,
) -> dict:
    """The memory bandwidth a copy sees: `dst.copy_(src)` of an nbytes byte buffer moves
    2 * nbytes (each byte read once and written once); bytes_per_s = 2 * nbytes / median time.

    time_fns(fns, reps, device) times the copy (`interleaved` by default; the GPU bench passes
    its CUDA-event timing).
    """
    check_int("nbytes", nbytes, error=BenchError)
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)  # (nbytes,)
    dst = torch.empty_like(src)
    times = time_fns({"copy": lambda: dst.copy_(src)}, reps, device)["copy"]
    t = median(times)
    return {
        "nbytes": nbytes,
        "bytes_moved": 2 * nbytes,
        "median_s": t,
        "bytes_per_s": 2 * nbytes / t,
        "times_s": times,
        "convention": "bytes read + bytes written (a copy of n bytes moves 2 n)",
    }
