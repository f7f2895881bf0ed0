"""Timing on a GPU: CUDA events on torch's stream, L2 flushed and the GPU kept busy in between.

`time_cuda` is `kvlib.timing.interleaved` with `cuda_timer`: every contender is called once to
warm up (NVRTC compiles the kernels then), then the contenders take turns and each call is
timed on the GPU with CUDA events recorded on torch's current stream, the stream every kernel
here launches on. Before each timed call, untimed, a buffer of twice the device's L2 size
(`torch.cuda.get_device_properties(dev).L2_cache_size`) is overwritten, so no contender finds
the previous one's data in L2, and the GPU spins for about 50 us so that the host's launch
work overlaps GPU work instead of showing up as idle time inside the measurement.

`copy_bandwidth` is `kvlib.timing.copy_bandwidth` timed this way, on a buffer L2 cannot hold.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvlib.errors import BenchError, check_int
from kvlib.timing import check_reps, interleaved
from kvlib.timing import copy_bandwidth as measure_copy

SPIN_S = 50e-6  # GPU spin before each timed call, so the launch overlaps it


def l2_bytes(props) -> int:
    """The L2 cache size of a device's properties (0 when torch does not report it)."""
    return int(getattr(props, "L2_cache_size", 0) or 0)


def flush_bytes(l2: int) -> int:
    """Bytes written to flush an L2 of `l2` bytes: twice its size (256 MiB when unknown, 0)."""
    check_int("l2_bytes", l2, low=0)
    return 2 * l2 if l2 > 0 else 256 * 2**20


def cuda_device(device: torch.device | str) -> torch.device:
    """`device` as a CUDA device with its index; BenchError for any other device."""
    dev = torch.device(device)
    if dev.type != "cuda":
        raise BenchError(f"the GPU timings need a CUDA device, got {str(dev)!r}")
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def cuda_timer(device: torch.device, flush: bool = True) -> Callable[..., float]:
    """A `kvlib.timing.interleaved` timer: seconds of one call by CUDA events on torch's stream.

    Before each call, untimed: overwrite 2x L2 (flush=True), then spin the GPU ~SPIN_S so the
    host's launch work overlaps GPU work instead of showing up as idle time in the interval.
    """
    props = torch.cuda.get_device_properties(device)
    buffer = torch.empty(
        flush_bytes(l2_bytes(props)) if flush else 0, dtype=torch.uint8, device=device
    )
    cycles = int(getattr(props, "clock_rate", 0) * 1e3 * SPIN_S) or 100_000  # clock_rate: kHz
    spin = getattr(torch.cuda, "_sleep", None)
    stream = torch.cuda.current_stream(device)

    def timed(fn: Callable[[], object], _device: object = None) -> float:
        if flush:
            buffer.zero_()
        if spin is not None:
            spin(cycles)
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        start.record(stream)
        fn()
        stop.record(stream)
        stop.synchronize()
        return start.elapsed_time(stop) / 1e3

    return timed


def time_cuda(
    fns: dict[str, Callable[[], object]],
    reps: int,
    device: torch.device | str,
    flush: bool = True,
) -> dict[str, list[float]]:
    """Seconds of each call of each contender: `kvlib.timing.interleaved` with `cuda_timer`.

    One warm-up call each, then `reps` rounds in rotated order; L2 flushed before each timed
    call (flush=True). Returns name -> list of seconds in the order they were measured.
    """
    check_reps(reps)  # before anything touches a GPU
    if not fns:
        raise BenchError("time_cuda needs at least one contender")
    dev = cuda_device(device)
    with torch.cuda.device(dev):
        return interleaved(fns, reps, dev, timer=cuda_timer(dev, flush))


def copy_bandwidth(device: torch.device | str, nbytes: int | None = None, reps: int = 10) -> dict:
    """Measured device-to-device copy bandwidth: bytes read + bytes written per second.

    `dst.copy_(src)` of an nbytes uint8 buffer moves 2 * nbytes (each byte read once and
    written once); bytes_per_s = 2 * nbytes / median time. nbytes defaults to the larger of
    256 MiB and 8x the L2 size, so L2 cannot hold the data.
    """
    dev = cuda_device(device)
    if nbytes is None:
        l2 = l2_bytes(torch.cuda.get_device_properties(dev))
        nbytes = max(256 * 2**20, 8 * l2)
    check_int("nbytes", nbytes)
    return measure_copy(dev, nbytes, reps, time_fns=time_cuda)
