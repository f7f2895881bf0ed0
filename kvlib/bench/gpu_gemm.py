"""The fp16 GEMM figure: kvlib's GEMM kernels against cuBLAS on the same data.

fp16 (n, n) @ (n, n) with each `kvlib.gpu.kernels.gemm` method and with cuBLAS
(`cupy.matmul`): TFLOP/s = 2 n^3 / t, the speed ratio to cuBLAS, and each method's max
relative error against cuBLAS (within REL_TOL for a correct kernel).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from kvlib.bench.gpu_timing import cuda_device, time_cuda
from kvlib.bench.problems import REL_TOL
from kvlib.bench.report import target
from kvlib.errors import BenchError, check_int
from kvlib.gpu import kernels as gk
from kvlib.timing import median

GEMM_TARGET = 0.5  # gemm_wmma at >= half of cuBLAS's speed ...
GEMM_TARGET_N = 4096  # ... at 4096^3


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

    dev = cuda_device(device)
    g = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=dev, dtype=torch.float16)  # (m, k)
    b = torch.randn(n, n, generator=g, device=dev, dtype=torch.float16)  # (k, n)
    a_cp, b_cp = cupy.from_dlpack(a), cupy.from_dlpack(b)  # the same memory
    outs: dict[str, object] = {}

    def cublas() -> None:
        with cupy.cuda.Device(dev.index):
            with cupy.cuda.ExternalStream(torch.cuda.current_stream(dev).cuda_stream):
                outs["cublas"] = cupy.matmul(a_cp, b_cp)  # (m, n) fp16

    def kvlib_gemm(method: str) -> Callable[[], None]:
        return lambda: outs.__setitem__(method, gk.gemm(a, b, method=method))  # (m, n) fp32

    fns = {"cublas": cublas} | {m: kvlib_gemm(m) for m in methods}
    times = time_cuda(fns, reps, dev)
    ref = torch.from_dlpack(outs["cublas"]).float()  # (m, n)
    scale = ref.abs().max().item()
    t_ref = median(times["cublas"])
    rows = {"cublas": gemm_row(times["cublas"], n, t_ref, 0.0)}
    for m in methods:
        err = (outs[m] - ref).abs().max().item() / scale
        rows[m] = gemm_row(times[m], n, t_ref, err)
    if progress:
        progress()
    return {"n": n, "dtype": "float16", "flops": 2 * n**3, "rows": rows}


def gemm_target(figure: dict) -> list[dict]:
    """wmma at >= GEMM_TARGET of cuBLAS's speed at GEMM_TARGET_N ([] without a wmma row)."""
    if "wmma" not in figure["rows"]:
        return []
    n = figure["n"]
    notes = [] if n == GEMM_TARGET_N else [f"target is set for n = {GEMM_TARGET_N}"]
    if not figure["rows"]["wmma"]["ok"]:
        notes.append("OUTPUT WRONG")
    return [
        target(
            "fp16 GEMM",
            f"wmma speed / cuBLAS at n={n}",
            figure["rows"]["wmma"]["ratio_to_cublas"],
            ">=",
            GEMM_TARGET,
            ", ".join(notes),
        )
    ]
