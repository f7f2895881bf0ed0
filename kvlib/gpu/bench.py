"""Chapter 10's kernels measured on a GPU: `python -m kvlib.bench --gpu`.

What is measured, on one CUDA GPU:

    copy              device-to-device `dst.copy_(src)` of a buffer much larger than L2: the
                      bandwidth the memory system really delivers (bytes read + bytes written)
    gemm              fp16 (n, n) @ (n, n) with each `kvlib.gpu.kernels.gemm` method and with
                      cuBLAS (`cupy.matmul`) on the same data: TFLOP/s = 2 n^3 / t, the ratio to
                      cuBLAS, and each method's max relative error against cuBLAS
    decode_attention  one decode step (T = 1) over S cached tokens, for S from 1k to 64k:
                      `paged_decode_attention` for each method x split setting, and torch's
                      `scaled_dot_product_attention` (enable_gqa=True) on the same K/V laid out
                      contiguously; achieved bandwidth, as a fraction of the measured copy
                      bandwidth and of the datasheet bandwidth (`kvlib.memory.GPUS`)

How: every contender is called once to warm up (NVRTC compiles the kernels then), then the
contenders take turns (interleaved repetitions, the order rotated each round as in
`kvlib.bench.interleaved`) and the median wins. Each call is timed on the GPU with CUDA events
recorded on torch's current stream, the stream every kernel here launches on. Before each
timed call, untimed, a buffer of twice the device's L2 size
(`torch.cuda.get_device_properties(dev).L2_cache_size`) is overwritten, so no contender finds
the previous one's data in L2, and the GPU spins for about 50 us so that the host's launch
work overlaps GPU work instead of showing up as idle time inside the measurement.

Bandwidth convention. Every figure counts the bytes that must cross the memory interface,
reads and writes alike: a copy of n bytes moves 2 n (read n, write n); one decode step moves

    bytes = 2 B K S D b  (read K and V of every cached token)  +  2 B H T D b  (read q, write out)

(`kvlib.gpu.roofline.decode_attention_bytes` summed over rows and kv heads, b bytes per
element). Traffic that is the kernels' own overhead (block tables, split-KV partials) is not
counted: every contender is credited with the same bytes, so fractions compare times.
fraction_of_copy = (bytes / t) / copy bandwidth; fraction_of_spec = (bytes / t) / datasheet
bandwidth of the `GPUS` entry `match_gpu` finds for the device (None when there is none).

Correctness: each output is compared with a reference on the same inputs (attention: the fp32
`reference_decode`; GEMM: cuBLAS); the result records max |out - ref| and the scale-free
max |out - ref| / max |ref|, which must stay within REL_TOL = 1e-2 (a zero output scores 1).

Two timings of the paged kernels: "kernels" calls the function `paged_decode_launcher`
returns (the attention and split-KV reduction kernels, inputs checked once beforehand; checked
to give bit-identical output); "call" times the public `paged_decode_attention`, whose input
checks copy seq_lens and block_tables to the host on every call. Targets use "kernels".

Tensor layout of the attention inputs, as everywhere in kvlib:
    q: (B, H, T, D)   k, v: (B, K, S, D)   k_pool, v_pool: (num_blocks, K, P, D)
    block_tables: (B, M) int32   seq_lens: (B,) int32

Results are data: one JSON per GPU run in `RESULTS_DIR` (package data), read back with
`load_results`, checked with `validate_result`, condensed with `summary_rows`.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import math
import platform
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from kvlib.config import check_int
from kvlib.gpu import kernels as gk
from kvlib.gpu.roofline import decode_attention_bytes
from kvlib.memory import GPUS
from kvlib.timing import (
    BenchError,
    check_reps,
    format_targets,
    interleaved,
    machine_info,
    median,
    target,
    versions,
)
from kvlib.timing import copy_bandwidth as measure_copy

SCHEMA = "kvlib.gpu.bench/1"
RESULTS_DIR = Path(__file__).parent / "results"
LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
QUICK_LENGTHS = (1024, 2048, 4096, 8192, 16384)
GEMM_TARGET = 0.5  # gemm_wmma at >= half of cuBLAS's speed ...
GEMM_TARGET_N = 4096  # ... at 4096^3
ATTENTION_TARGET = 0.7  # Tensor Core split-KV decode attention >= 70% of the copy bandwidth ...
ATTENTION_TARGET_S = 16384  # ... at S >= 16k
REL_TOL = 1e-2  # max |out - ref| / max |ref| allowed against the fp32 reference
BLOCKS_PER_SM = 2  # "auto" split-KV: at least this many thread blocks per SM
SPIN_S = 50e-6  # GPU spin before each timed call, so the launch overlaps it
VERSION_FIELDS = ("driver", "cuda_runtime", "cupy", "torch", "kvlib")


# ---- the GPU at hand ---------------------------------------------------------------------------


def require_gpu() -> torch.device:
    """The CUDA device to measure; BenchError when torch sees no GPU or CuPy cannot run."""
    if not torch.cuda.is_available():
        raise BenchError(
            f"the GPU benchmark needs a CUDA GPU, and torch {torch.__version__} sees none; "
            "run it where there is one (Colab: Runtime > Change runtime type > T4 GPU), with "
            "a CUDA build of torch and `pip install 'kvlib[gpu]'` (CuPy)"
        )
    try:
        import cupy
    except ImportError as e:
        raise BenchError(
            "the GPU benchmark needs CuPy, which is not installed: `pip install 'kvlib[gpu]'` "
            "(cupy-cuda12x and the CUDA compiler wheels), then run it again"
        ) from e
    if not cupy.is_available():
        raise BenchError(
            "CuPy is installed but finds no usable CUDA GPU (driver or CUDA version mismatch?); "
            "check `python -c 'import cupy; cupy.show_config()'`"
        )
    return torch.device("cuda", torch.cuda.current_device())


def match_gpu(device_name: str, total_memory: int) -> str | None:
    """The `kvlib.memory.GPUS` entry a CUDA device is, or None when none matches.

    Rule: an entry named MODEL or MODEL-SIZE matches when MODEL is a whole word of the device
    name (case-insensitive; words are split at anything but letters and digits, so "A10" is
    not "A100" and "A10G" is not "A10"), the device's total memory is 90-102% of the entry's
    (so the 40 GB and 80 GB A100 are told apart; a T4 shows 15 of its 16 GiB), and, for an
    entry whose note says SXM, the name does not say PCIe or NVL (those boards have less
    bandwidth than the datasheet figure kept here). Examples: "Tesla T4" -> "T4",
    "NVIDIA A100-SXM4-80GB" -> "A100-80", "NVIDIA H100 80GB HBM3" -> "H100-80",
    "NVIDIA H100 PCIe" -> None.
    """
    if not isinstance(device_name, str):
        raise TypeError(f"device_name must be a str, got {type(device_name).__name__}")
    check_int("total_memory", total_memory)
    words = set(re.split(r"[^A-Z0-9]+", device_name.upper()))
    found = []
    for key, gpu in GPUS.items():
        model = key.split("-")[0].upper()
        if model not in words:
            continue
        if not 0.9 * gpu.memory_bytes <= total_memory <= 1.02 * gpu.memory_bytes:
            continue
        if gpu.note.startswith("SXM") and words & {"PCIE", "NVL"}:
            continue
        found.append(key)
    return found[0] if len(found) == 1 else None


def cuda_version(code: int) -> str:
    """'12.4' from CUDA's integer version 12040 (1000 * major + 10 * minor)."""
    check_int("code", code)
    return f"{code // 1000}.{code % 1000 // 10}"


def gpu_machine(device: torch.device) -> dict:
    """GPU name, compute capability, SMs, L2, memory, versions (driver, CUDA, CuPy, ...)."""
    import cupy

    props = torch.cuda.get_device_properties(device)
    name = torch.cuda.get_device_name(device)
    vers = versions()  # python, torch, kvlib, transformers, numpy
    vers |= {
        "driver": cuda_version(cupy.cuda.runtime.driverGetVersion()),
        "cuda_runtime": cuda_version(cupy.cuda.runtime.runtimeGetVersion()),
        "torch_cuda": torch.version.cuda,
        "cupy": cupy.__version__,
    }
    return {
        "gpu_name": name,
        "gpu_spec": match_gpu(name, props.total_memory),
        "compute_capability": f"{props.major}.{props.minor}",
        "sm_count": props.multi_processor_count,
        "l2_bytes": _l2_bytes(props),
        "memory_bytes": props.total_memory,
        "platform": platform.platform(),
        "host": machine_info(device, torch.get_num_threads()),
        "versions": vers,
    }


def _l2_bytes(props) -> int:
    return int(getattr(props, "L2_cache_size", 0) or 0)


def flush_bytes(l2_bytes: int) -> int:
    """Bytes written to flush L2: twice its size (256 MiB when the size is unknown, i.e. 0)."""
    check_int("l2_bytes", l2_bytes, low=0)
    return 2 * l2_bytes if l2_bytes > 0 else 256 * 2**20


# ---- timing ------------------------------------------------------------------------------------


def _cuda_device(device: torch.device | str) -> torch.device:
    dev = torch.device(device)
    if dev.type != "cuda":
        raise BenchError(f"the GPU timings need a CUDA device, got {str(dev)!r}")
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def cuda_timer(device: torch.device, flush: bool = True) -> Callable[..., float]:
    """A `kvlib.bench.interleaved` timer: seconds of one call by CUDA events on torch's stream.

    Before each call, untimed: overwrite 2x L2 (flush=True), then spin the GPU ~SPIN_S so the
    host's launch work overlaps GPU work instead of showing up as idle time in the interval.
    """
    props = torch.cuda.get_device_properties(device)
    buffer = torch.empty(
        flush_bytes(_l2_bytes(props)) if flush else 0, dtype=torch.uint8, device=device
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
    """Seconds of each call of each contender: `kvlib.bench.interleaved` with `cuda_timer`.

    One warm-up call each, then `reps` rounds in rotated order; L2 flushed before each timed
    call (flush=True). Returns name -> list of seconds in the order they were measured.
    """
    check_reps(reps)  # before anything touches a GPU
    if not fns:
        raise BenchError("time_cuda needs at least one contender")
    dev = _cuda_device(device)
    with torch.cuda.device(dev):
        return interleaved(fns, reps, dev, timer=cuda_timer(dev, flush))


def copy_bandwidth(device: torch.device | str, nbytes: int | None = None, reps: int = 10) -> dict:
    """Measured device-to-device copy bandwidth: bytes read + bytes written per second.

    `dst.copy_(src)` of an nbytes uint8 buffer moves 2 * nbytes (each byte read once and
    written once); bytes_per_s = 2 * nbytes / median time. nbytes defaults to the larger of
    256 MiB and 8x the L2 size, so L2 cannot hold the data.
    """
    dev = _cuda_device(device)
    if nbytes is None:
        l2 = _l2_bytes(torch.cuda.get_device_properties(dev))
        nbytes = max(256 * 2**20, 8 * l2)
    check_int("nbytes", nbytes)
    return measure_copy(dev, nbytes, reps, time_fns=time_cuda)


# ---- GEMM ---------------------------------------------------------------------------------------


def gemm_row(times: list[float], n: int, cublas_median_s: float, max_rel_err: float) -> dict:
    """One GEMM contender: median time, TFLOP/s = 2 n^3 / t, ratio to cuBLAS, error."""
    check_int("n", n)
    t = median(times)
    if not t > 0 or not cublas_median_s > 0:
        raise BenchError(f"GEMM times must be positive, got {t!r} and cuBLAS {cublas_median_s!r}")
    return {
        "median_s": t,
        "tflops": 2 * n**3 / t / 1e12,
        "ratio_to_cublas": cublas_median_s / t,
        "max_rel_err": float(max_rel_err),
        "ok": bool(max_rel_err <= REL_TOL),
        "times_s": list(times),
    }


def bench_gemm(
    device: torch.device | str,
    n: int = 4096,
    reps: int = 10,
    methods: Iterable[str] = gk.GEMM_METHODS,
    progress: Callable[[], None] | None = None,
) -> dict:
    """fp16 (n, n) @ (n, n) with kvlib's GEMM methods and cuBLAS (`cupy.matmul`), same inputs.

    max_rel_err = max |C - C_cublas| / max |C_cublas|: about 1e-3 for a correct kernel (cuBLAS
    rounds C to fp16), order 1 for a wrong one. The naive kernel is slow at n = 4096: leave it
    out with `methods`.
    """
    check_int("n", n)
    methods = list(methods)
    unknown = sorted(set(methods) - set(gk.GEMM_METHODS))
    if unknown or not methods:
        raise BenchError(f"methods must be a non-empty subset of {gk.GEMM_METHODS}, got {methods}")
    import cupy

    dev = _cuda_device(device)
    g = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=dev, dtype=torch.float16)  # (M, R)
    b = torch.randn(n, n, generator=g, device=dev, dtype=torch.float16)  # (R, N)
    a_cp, b_cp = cupy.from_dlpack(a), cupy.from_dlpack(b)  # the same memory
    outs: dict[str, object] = {}

    def cublas() -> None:
        with cupy.cuda.Device(dev.index):
            with cupy.cuda.ExternalStream(torch.cuda.current_stream(dev).cuda_stream):
                outs["cublas"] = cupy.matmul(a_cp, b_cp)  # (M, N) fp16

    def kvlib_gemm(method: str) -> Callable[[], None]:
        return lambda: outs.__setitem__(method, gk.gemm(a, b, method=method))  # (M, N) fp32

    fns = {"cublas": cublas} | {m: kvlib_gemm(m) for m in methods}
    times = time_cuda(fns, reps, dev)
    ref = torch.from_dlpack(outs["cublas"]).float()  # (M, N)
    scale = ref.abs().max().item()
    t_ref = median(times["cublas"])
    rows = {"cublas": gemm_row(times["cublas"], n, t_ref, 0.0)}
    for m in methods:
        err = (outs[m] - ref).abs().max().item() / scale
        rows[m] = gemm_row(times[m], n, t_ref, err)
    if progress:
        progress()
    return {"n": n, "dtype": "float16", "flops": 2 * n**3, "rows": rows}


# ---- decode attention ---------------------------------------------------------------------------


def auto_splits(
    n_blocks_per_split1: int, sm_count: int, n_kv_blocks: int, blocks_per_sm: int = BLOCKS_PER_SM
) -> int:
    """Split-KV partitions so the grid gives every SM at least `blocks_per_sm` thread blocks.

    n_blocks_per_split1: thread blocks of the grid with one partition (rows x kv heads x tiles
    for the Tensor Core kernel). The answer, ceil(blocks_per_sm * sm_count /
    n_blocks_per_split1), is at least 1 and at most n_kv_blocks (a partition holds whole
    blocks of the cache; more would be empty).
    """
    for name, v in (
        ("n_blocks_per_split1", n_blocks_per_split1),
        ("sm_count", sm_count),
        ("n_kv_blocks", n_kv_blocks),
        ("blocks_per_sm", blocks_per_sm),
    ):
        check_int(name, v)
    want = -(-blocks_per_sm * sm_count // n_blocks_per_split1)
    return max(1, min(want, n_kv_blocks))


def decode_inputs(
    B: int,
    S: int,
    H: int,
    K: int,
    D: int,
    block_size: int,
    device: torch.device | str,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
) -> dict[str, torch.Tensor]:
    """One decode step's inputs made on `device`: the same K/V contiguous and paged.

    Returns q (B, H, 1, D); k, v (B, K, S, D); k_pool, v_pool (B*M, K, P, D) holding the
    M = ceil(S / P) blocks of every row in a random order (zeros past S); block_tables (B, M)
    int32 with token s of row b in block block_tables[b, s // P], slot s % P; seq_lens (B,)
    int32, all S.
    """
    for name, v in (("B", B), ("S", S), ("H", H), ("K", K), ("D", D), ("block_size", block_size)):
        check_int(name, v)
    if H % K:
        raise ValueError(f"H={H} must be a multiple of K={K}")
    device = torch.device(device)
    P = block_size
    M = -(-S // P)
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, H, 1, D, generator=g, device=device, dtype=dtype)  # (B, H, T=1, D)
    k = torch.randn(B, K, S, D, generator=g, device=device, dtype=dtype)  # (B, K, S, D)
    v = torch.randn(B, K, S, D, generator=g, device=device, dtype=dtype)  # (B, K, S, D)
    slot = torch.randperm(B * M, generator=g, device=device)  # (B*M,) pool block of block b*M+m

    def paged(x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.pad(x, (0, 0, 0, M * P - S))  # (B, K, M*P, D)
        x = x.reshape(B, K, M, P, D).permute(0, 2, 1, 3, 4)  # (B, M, K, P, D)
        x = x.reshape(B * M, K, P, D)  # (B*M, K, P, D)
        pool = torch.empty_like(x)
        pool[slot] = x
        return pool

    return {
        "q": q,
        "k": k,
        "v": v,
        "k_pool": paged(k),
        "v_pool": paged(v),
        "block_tables": slot.reshape(B, M).to(torch.int32),  # (B, M)
        "seq_lens": torch.full((B,), S, dtype=torch.int32, device=device),  # (B,)
    }


def reference_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Decode attention in fp32, row by row: q (B, H, 1, D), k, v (B, K, S, D) -> (B, H, 1, D).

    Query head h reads kv head h // G. One row at a time keeps the fp32 copy of K/V small.
    """
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(
            f"expected q (B, H, 1, D) and k, v (B, K, S, D), got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, H, T, D = q.shape
    K = k.shape[1]
    if T != 1 or k.shape[0] != B or k.shape[3] != D or H % K:
        raise ValueError(
            f"q {tuple(q.shape)} does not match k {tuple(k.shape)}: expected T = 1, equal B "
            "and D, and H a multiple of K"
        )
    G = H // K
    out = torch.empty(B, H, 1, D, dtype=torch.float32, device=q.device)  # (B, H, 1, D)
    for b in range(B):
        qb = q[b].float().reshape(K, G, D)  # (K, G, D): head h = kvh * G + g
        kb, vb = k[b].float(), v[b].float()  # (K, S, D)
        scores = qb @ kb.transpose(1, 2) / math.sqrt(D)  # (K, G, S) fp32
        out[b] = (torch.softmax(scores, dim=-1) @ vb).reshape(H, 1, D)  # (K, G, D) -> (H, 1, D)
    return out


def output_error(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """max |out - ref|, and that over max |ref| (scale-free: a zero output scores 1)."""
    if out.shape != ref.shape:
        raise ValueError(f"output {tuple(out.shape)} and reference {tuple(ref.shape)} differ")
    diff = (out.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    rel = diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
    return {"max_abs_diff": diff, "rel_err": rel, "ok": bool(rel <= REL_TOL)}


def attention_row(
    times: list[float],
    nbytes: int,
    copy_bytes_per_s: float,
    spec_bytes_per_s: float | None,
    error: dict,
    **info: object,
) -> dict:
    """One decode attention contender at one S: bandwidth and its fractions of copy and spec."""
    t = median(times)
    if not t > 0 or not copy_bytes_per_s > 0:
        raise BenchError(
            f"times and copy bandwidth must be positive, got {t!r}, {copy_bytes_per_s!r}"
        )
    bw = nbytes / t
    return {
        **info,
        "median_s": t,
        "bytes_per_s": bw,
        "fraction_of_copy": bw / copy_bytes_per_s,
        "fraction_of_spec": None if spec_bytes_per_s is None else bw / spec_bytes_per_s,
        **error,
        "times_s": list(times),
    }


def attention_bytes(
    B: int, H: int, K: int, S: int, D: int, T: int = 1, dtype: torch.dtype = torch.float16
) -> int:
    """Bytes one decode step must move: K, V of every cached token read, q read, out written."""
    check_int("B", B)
    check_int("K", K)
    if H % K:
        raise ValueError(f"H={H} must be a multiple of K={K}")
    return B * K * decode_attention_bytes(H // K, S, D, T, dtype)


def _splits_list(splits: Iterable[int | str]) -> list[int | str]:
    out = list(splits)
    for s in out:
        if s != "auto" and (not isinstance(s, int) or isinstance(s, bool) or s < 1):
            raise BenchError(f"splits must be ints >= 1 or 'auto', got {s!r}")
    if not out:
        raise BenchError("splits must name at least one setting, e.g. (1, 'auto')")
    return out


def _bench_one_length(
    dev: torch.device,
    S: int,
    *,
    B: int,
    H: int,
    K: int,
    D: int,
    block_size: int,
    methods: list[str],
    splits: list[int | str],
    reps: int,
    sm_count: int,
    copy_bytes_per_s: float,
    spec_bytes_per_s: float | None,
) -> dict:
    """One row of `bench_decode_attention`: every contender at cache length S."""
    inp = decode_inputs(B, S, H, K, D, block_size, dev, seed=S)
    q, k, v = inp["q"], inp["k"], inp["v"]
    paged = {n: inp[n] for n in ("q", "k_pool", "v_pool", "block_tables", "seq_lens")}
    ref = reference_decode(q, k, v)  # (B, H, 1, D) fp32
    nbytes = attention_bytes(B, H, K, S, D)
    n_kv_blocks = -(-S // block_size)
    makers: dict[str, Callable[[], torch.Tensor]] = {}
    info: dict[str, dict] = {}
    for method in methods:
        per_split1 = gk.launch_plan(method, B, H, K, 1, D, 1)["blocks_per_split"]
        for setting in splits:
            ns = auto_splits(per_split1, sm_count, n_kv_blocks) if setting == "auto" else setting
            name = f"{method}/{setting}"
            # the public call first: its warm-up checks the inputs before the bare launches run
            makers[f"{name}/call"] = functools.partial(
                gk.paged_decode_attention, **paged, method=method, num_splits=ns
            )
            makers[name] = gk.paged_decode_launcher(**paged, method=method, num_splits=ns)
            for key, timing in ((f"{name}/call", "call"), (name, "kernels")):
                info[key] = {
                    "method": method,
                    "splits": setting,
                    "num_splits": ns,
                    "timing": timing,
                }
    makers["sdpa"] = functools.partial(
        torch.nn.functional.scaled_dot_product_attention, q, k, v, enable_gqa=True
    )
    info["sdpa"] = {"method": "sdpa", "splits": None, "num_splits": None, "timing": "torch"}
    outs: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Callable[[], None]:
        return lambda: outs.__setitem__(name, makers[name]())

    times = time_cuda({name: keep(name) for name in makers}, reps, dev)
    contenders = {}
    for name in makers:
        row = attention_row(
            times[name],
            nbytes,
            copy_bytes_per_s,
            spec_bytes_per_s,
            output_error(outs[name], ref),
            **info[name],
        )
        if f"{name}/call" in outs:  # the kernels-only launch must reproduce the public call
            row["equals_call"] = bool(torch.equal(outs[name], outs[f"{name}/call"]))
        contenders[name] = row
    return {"S": S, "bytes": nbytes, "n_kv_blocks": n_kv_blocks, "contenders": contenders}


def bench_decode_attention(
    device: torch.device | str,
    lengths: Iterable[int] = LENGTHS,
    B: int = 4,
    H: int = 32,
    K: int = 8,
    D: int = 128,
    block_size: int = 16,
    splits: Iterable[int | str] = (1, "auto"),
    reps: int = 10,
    methods: Iterable[str] = gk.ATTENTION_METHODS,
    copy: dict | None = None,
    spec_bytes_per_s: float | None = None,
    progress: Callable[[], None] | None = None,
) -> dict:
    """Decode attention bandwidth per cache length S: kvlib's kernels and torch SDPA.

    For each S: random fp16 K/V (B rows of S tokens, K heads of D dims), contiguous for SDPA
    and in a pool of shuffled blocks for the paged kernels; every output is checked against
    `reference_decode` (fp32). copy: a `copy_bandwidth` result (measured when None);
    spec_bytes_per_s: the datasheet bandwidth (fraction_of_spec is None without it).
    """
    lengths = list(lengths)
    for S in lengths:
        check_int("S", S)
    methods = list(methods)
    if not methods or set(methods) - set(gk.ATTENTION_METHODS):
        raise BenchError(
            f"methods must be a non-empty subset of {gk.ATTENTION_METHODS}, got {methods}"
        )
    splits = _splits_list(splits)
    reps = check_reps(reps)
    dev = _cuda_device(device)
    copy = copy_bandwidth(dev, reps=reps) if copy is None else copy
    sm_count = torch.cuda.get_device_properties(dev).multi_processor_count
    common = dict(
        B=B, H=H, K=K, D=D, block_size=block_size, methods=methods, splits=splits, reps=reps,
        sm_count=sm_count, copy_bytes_per_s=copy["bytes_per_s"], spec_bytes_per_s=spec_bytes_per_s,
    )  # fmt: skip
    rows = []
    for S in lengths:
        rows.append(_bench_one_length(dev, S, **common))
        torch.cuda.empty_cache()  # this length's K/V are gone: give the memory back
        if progress:
            progress()
    return {
        "shape": {"B": B, "H": H, "K": K, "D": D, "T": 1, "block_size": block_size},
        "dtype": "float16",
        "sm_count": sm_count,
        "splits": splits,
        "rel_tol": REL_TOL,
        "copy_bytes_per_s": copy["bytes_per_s"],
        "spec_bytes_per_s": spec_bytes_per_s,
        "rows": rows,
    }


# ---- targets and the run ------------------------------------------------------------------------


def targets(result: dict) -> list[dict]:
    """GEMM wmma >= 50% of cuBLAS at 4096^3; split-KV wmma >= 70% of copy at each S >= 16k.

    The attention target takes, at each S >= 16384, the best kernels-only wmma row whose
    split setting is not 1 (the split-KV ones). Same dicts as `kvlib.bench._target`.
    """
    figs = result["figures"]
    out = []
    gemm = figs.get("gemm")
    if gemm and "wmma" in gemm["rows"]:
        n = gemm["n"]
        notes = [] if n == GEMM_TARGET_N else [f"target is set for n = {GEMM_TARGET_N}"]
        if not gemm["rows"]["wmma"]["ok"]:
            notes.append("OUTPUT WRONG")
        note = ", ".join(notes)
        out.append(
            target(
                "fp16 GEMM",
                f"wmma speed / cuBLAS at n={n}",
                gemm["rows"]["wmma"]["ratio_to_cublas"],
                ">=",
                GEMM_TARGET,
                note,
            )
        )
    att = figs.get("decode_attention")
    for row in att["rows"] if att else []:
        if row["S"] < ATTENTION_TARGET_S:
            continue
        split_kv = {
            name: c
            for name, c in row["contenders"].items()
            if c["method"] == "wmma" and c["timing"] == "kernels" and c["splits"] != 1
        }
        if not split_kv:
            continue
        name, best = max(split_kv.items(), key=lambda kv: kv[1]["fraction_of_copy"])
        note = f"{name}: {best['num_splits']} splits"
        if not best["ok"]:
            note += ", OUTPUT WRONG"
        out.append(
            target(
                "Tensor Core decode attention",
                f"fraction of copy bandwidth at S={row['S']}",
                best["fraction_of_copy"],
                ">=",
                ATTENTION_TARGET,
                note,
            )
        )
    return out


def new_result(machine: dict, command: str, settings: dict) -> dict:
    """An empty result of this schema: machine, date (UTC), command, settings, no figures yet."""
    return {
        "schema": SCHEMA,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": command,
        "machine": machine,
        "settings": settings,
        "figures": {},
        "targets": [],
    }


def _plan(quick: bool) -> dict:
    """Sizes: quick (under a minute: GEMM 1024, S up to 16k, 3 reps) or full."""
    if quick:
        return {"reps": 3, "gemm_n": 1024, "lengths": QUICK_LENGTHS}
    return {"reps": 10, "gemm_n": 4096, "lengths": LENGTHS}


def run_gpu(
    quick: bool = False,
    reps: int | None = None,
    command: str | None = None,
    quiet: bool = True,
    gemm_methods: Iterable[str] = gk.GEMM_METHODS,
) -> dict:
    """Measure copy, GEMM and decode attention on this machine's GPU; return the result dict.

    BenchError without a CUDA GPU and CuPy. reps: timed repetitions per contender (default 3
    quick, 10 full). command: what to record as the command that ran.
    """
    dev = require_gpu()
    plan = _plan(quick)
    reps = check_reps(plan["reps"] if reps is None else reps)
    gemm_methods = list(gemm_methods)
    attention_methods = list(gk.ATTENTION_METHODS)
    if torch.cuda.get_device_capability(dev) < gk.MIN_TENSOR_CORE_CC:  # no WMMA before sm_75
        gemm_methods = [m for m in gemm_methods if m != "wmma"]
        attention_methods.remove("wmma")
    machine = gpu_machine(dev)
    spec = GPUS[machine["gpu_spec"]].bandwidth if machine["gpu_spec"] else None
    settings = {
        "quick": quick,
        "reps": reps,
        "gemm_n": plan["gemm_n"],
        "gemm_methods": gemm_methods,
        "attention_methods": attention_methods,
        "lengths": list(plan["lengths"]),
    }
    result = new_result(
        machine,
        command or f"kvlib.gpu.bench.run_gpu(quick={quick}, reps={reps})",
        settings,
    )
    from tqdm.auto import tqdm

    bar = tqdm(total=2 + len(plan["lengths"]), disable=quiet, desc="kvlib.gpu.bench")
    figs = result["figures"]
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            bar.set_postfix_str("copy")
            figs["copy"] = copy_bandwidth(dev, reps=reps)
            bar.update()
            bar.set_postfix_str("GEMM")
            figs["gemm"] = bench_gemm(dev, plan["gemm_n"], reps, gemm_methods, bar.update)
            bar.set_postfix_str("decode attention")
            figs["decode_attention"] = bench_decode_attention(
                dev,
                plan["lengths"],
                reps=reps,
                methods=attention_methods,
                copy=figs["copy"],
                spec_bytes_per_s=spec,
                progress=bar.update,
            )
    finally:
        bar.close()
    result["targets"] = targets(result)
    result["elapsed_s"] = time.perf_counter() - t0
    return result


# ---- report -------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def format_gpu(result: dict) -> str:
    """The printed tables: GEMM TFLOP/s, decode attention GB/s per S, targets PASS/MISS."""
    m, s, figs = result["machine"], result["settings"], result["figures"]
    v = m["versions"]
    lines = [
        f"kvlib.gpu.bench on {m['gpu_name']} (sm_{m['compute_capability'].replace('.', '')}, "
        f"{m['sm_count']} SMs, L2 {m['l2_bytes'] / 2**20:.0f} MiB, "
        f"{m['memory_bytes'] / 2**30:.1f} GiB; datasheet entry {m.get('gpu_spec')})",
        f"driver {v['driver']}, CUDA runtime {v['cuda_runtime']}, CuPy {v['cupy']}, "
        f"torch {v['torch']}, kvlib {v['kvlib']}; {result['date']}; reps={s['reps']}, "
        f"quick={s['quick']}",
    ]
    if "copy" in figs:
        c = figs["copy"]
        lines.append(
            f"\ncopy: {c['nbytes'] / 2**20:.0f} MiB buffer, {c['bytes_per_s'] / 1e9:.0f} GB/s "
            "(bytes read + written)"
        )
    if "gemm" in figs:
        g = figs["gemm"]
        lines.append(f"\nfp16 GEMM {g['n']}^3")
        lines.append(f"{'method':>10} {'TFLOP/s':>9} {'vs cuBLAS':>10} {'rel err':>9}")
        for name, r in g["rows"].items():
            flag = "" if r["ok"] else "  WRONG"
            lines.append(
                f"{name:>10} {r['tflops']:9.2f} {_pct(r['ratio_to_cublas']):>10} "
                f"{r['max_rel_err']:9.1e}{flag}"
            )
    if "decode_attention" in figs:
        a = figs["decode_attention"]
        sh = a["shape"]
        lines.append(
            f"\ndecode attention, B={sh['B']} H={sh['H']} K={sh['K']} D={sh['D']} "
            f"block {sh['block_size']} (bytes: K/V read + q read + out written)"
        )
        lines.append(
            f"{'S':>6} {'contender':<22} {'splits':>6} {'GB/s':>7} {'% copy':>7} "
            f"{'% spec':>7} {'rel err':>8}"
        )
        for row in a["rows"]:
            for name, c in row["contenders"].items():
                flag = "" if c["ok"] else "  WRONG"
                if c.get("equals_call") is False:
                    flag += "  differs from the call"
                ns = "-" if c["num_splits"] is None else str(c["num_splits"])
                lines.append(
                    f"{row['S']:>6} {name:<22} {ns:>6} {c['bytes_per_s'] / 1e9:7.0f} "
                    f"{_pct(c['fraction_of_copy']):>7} {_pct(c['fraction_of_spec']):>7} "
                    f"{c['rel_err']:8.1e}{flag}"
                )
    lines += format_targets(result["targets"])
    if "elapsed_s" in result:
        lines.append(f"\nelapsed {result['elapsed_s']:.1f} s")
    return "\n".join(lines)


# ---- results as data ----------------------------------------------------------------------------


def _positive(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _field(data: dict, path: str):
    node: object = data
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ValueError(f"result field {path!r} is missing")
        node = node[part]
    return node


def validate_result(data: object) -> None:
    """Raise ValueError naming the first missing or invalid field of a GPU bench result."""
    if not isinstance(data, dict):
        raise ValueError(f"a GPU bench result must be a JSON object, got {type(data).__name__}")
    if _field(data, "schema") != SCHEMA:
        raise ValueError(f"result field 'schema' is {data['schema']!r}, expected {SCHEMA!r}")
    name = _field(data, "machine.gpu_name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"result field 'machine.gpu_name' must be the GPU's name, got {name!r}")
    for key in VERSION_FIELDS:
        value = _field(data, f"machine.versions.{key}")
        if not isinstance(value, str) or not value:
            raise ValueError(
                f"result field 'machine.versions.{key}' must be a version string, got {value!r}"
            )
    date = _field(data, "date")
    try:
        _dt.datetime.fromisoformat(date)
    except (TypeError, ValueError):
        raise ValueError(f"result field 'date' must be an ISO date, got {date!r}") from None
    command = _field(data, "command")
    if not isinstance(command, str) or not command:
        raise ValueError(f"result field 'command' must name what ran, got {command!r}")
    figs = _field(data, "figures")
    if not isinstance(figs, dict) or not figs:
        raise ValueError("result field 'figures' must be a non-empty object of measurements")
    timed = []
    if "copy" in figs:
        timed.append(("figures.copy", figs["copy"]))
    if "gemm" in figs:
        for name, r in _field(data, "figures.gemm.rows").items():
            timed.append((f"figures.gemm.rows.{name}", r))
    if "decode_attention" in figs:
        for i, row in enumerate(_field(data, "figures.decode_attention.rows")):
            for name, c in row.get("contenders", {}).items():
                timed.append((f"figures.decode_attention.rows[{i}].{name}", c))
    if not timed:
        raise ValueError("result field 'figures' holds none of copy, gemm, decode_attention")
    for path, r in timed:
        if not isinstance(r, dict) or not _positive(r.get("median_s")):
            got = r.get("median_s") if isinstance(r, dict) else r
            raise ValueError(
                f"result field '{path}.median_s' must be positive seconds, got {got!r}"
            )
    tlist = _field(data, "targets")
    if not isinstance(tlist, list) or any(
        not isinstance(t, dict) or t.get("status") not in ("PASS", "MISS") for t in tlist
    ):
        raise ValueError("result field 'targets' must be a list of targets with PASS or MISS")


def load_results(folder: str | Path = RESULTS_DIR) -> list[dict]:
    """Every `*.json` result in folder, sorted by file name, each validated ([] when none)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no results folder {folder}")
    out = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
            validate_result(data)
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            raise ValueError(f"{path.name}: {e}") from e
        out.append(data)
    return out


def summary_rows(result: dict) -> list[dict]:
    """Compact rows for printing: GEMM per method, decode attention per S and contender.

    Each row: gpu, figure, size, contender, value, unit, fraction (of cuBLAS for GEMM, of the
    copy bandwidth for attention), fraction_of_spec (attention only, None when unknown).
    Decode attention rows are the kernels-only timings and SDPA.
    """
    gpu = result["machine"]["gpu_name"]
    figs = result["figures"]
    rows = []
    if "gemm" in figs:
        n = figs["gemm"]["n"]
        for name, r in figs["gemm"]["rows"].items():
            rows.append(
                {
                    "gpu": gpu,
                    "figure": "gemm",
                    "size": f"n={n}",
                    "contender": name,
                    "value": r["tflops"],
                    "unit": "TFLOP/s",
                    "fraction": r["ratio_to_cublas"],
                    "fraction_of_spec": None,
                }
            )
    if "decode_attention" in figs:
        for row in figs["decode_attention"]["rows"]:
            for name, c in row["contenders"].items():
                if c["timing"] == "call":
                    continue
                rows.append(
                    {
                        "gpu": gpu,
                        "figure": "decode attention",
                        "size": f"S={row['S']}",
                        "contender": name,
                        "value": c["bytes_per_s"] / 1e9,
                        "unit": "GB/s",
                        "fraction": c["fraction_of_copy"],
                        "fraction_of_spec": c["fraction_of_spec"],
                    }
                )
    return rows
