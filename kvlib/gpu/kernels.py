"""Python wrappers of the CUDA kernels: validate, hand torch tensors to CuPy, launch.

The sources are package data (`kvlib/kernels/*.cu`), compiled at first use by
`cupy.RawModule` (NVRTC, jitify off) for the GPU at hand. Tensors cross between torch and CuPy
through DLPack: no copies, and the launch goes on torch's current stream.

    gemm(a, b, method)                A: (M, R) fp16, B: (R, N) fp16 -> C: (M, N) fp32
        method: "naive" | "tiled" | "wmma" (Tensor Cores, sm_75+)
    paged_decode_attention(q, k_pool, v_pool, block_tables, seq_lens, method, num_splits)
        q: (B, H, T, D) fp16; k_pool, v_pool: (num_blocks, K, P, D) fp16 (one layer's pool);
        block_tables: (B, M) int32; seq_lens: (B,) int32 -> (B, H, T, D) fp16
        method: "cuda_core" | "wmma" (Tensor Cores: the G*T rows of a GQA group per tile)
    paged_decode_launcher(...)        the same arguments, checked once: returns a function
        that launches the kernels (for timing and decode loops); launch_plan gives its grid

Every check runs before CuPy is imported, so misuse (a CPU tensor, a wrong dtype, a strided
view) raises a clear error on any machine. The reference paths: `a.float() @ b.float()` and
`kvlib.paged.paged_attention`; `kvlib.gpu.emulate` reproduces the kernels' arithmetic on CPU.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import torch

from kvlib.config import check_int
from kvlib.errors import GPUUnavailableError
from kvlib.gpu.nvrtc import ToolchainError, include_dirs, kernel_source

GEMM_METHODS = ("naive", "tiled", "wmma")
ATTENTION_METHODS = ("cuda_core", "wmma")
MAX_HEAD_DIM = 256  # MAX_D of paged_attention.cu
MIN_TENSOR_CORE_CC = (7, 5)  # the book's target: sm_75 (T4) and newer


def _check_tensor(name: str, x: object, ndim: int, dtype: torch.dtype, layout: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(x.shape)}")
    if x.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {x.dtype} (convert with .to({dtype}))")
    if not x.is_contiguous():
        raise ValueError(
            f"{name} {tuple(x.shape)} is not contiguous; the kernel indexes it as dense "
            "row-major memory (call .contiguous())"
        )
    return x


def _check_devices(**tensors: torch.Tensor) -> torch.device:
    devices = {n: t.device for n, t in tensors.items()}
    for n, d in devices.items():
        if d.type != "cuda":
            raise ValueError(
                f"{n} is on {d}; the CUDA kernels take tensors on a CUDA device (move them "
                "with .cuda()), or use kvlib.gpu.emulate on the CPU"
            )
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors are on different devices: {devices}; put them on one GPU")
    return next(iter(devices.values()))


def available() -> bool:
    """Whether the kernels can run here: torch sees a CUDA GPU and CuPy is installed and works."""
    try:
        import cupy
    except ImportError:
        return False
    return torch.cuda.is_available() and cupy.is_available()


def _cupy():
    try:
        import cupy
    except ImportError as e:
        raise GPUUnavailableError("CuPy is not installed: pip install 'kvlib[gpu]'") from e
    if not cupy.is_available():
        raise GPUUnavailableError("CuPy finds no CUDA GPU on this machine")
    return cupy


@functools.cache
def load_module(name: str):
    """The `cupy.RawModule` of one kernel file (compiled by NVRTC at first use, jitify off)."""
    cupy = _cupy()
    try:
        options = tuple(f"-I{d}" for d in include_dirs())  # headers of the pip CUDA wheels
    except ToolchainError:
        options = ()  # a system CUDA toolkit, found by CuPy itself
    return cupy.RawModule(code=kernel_source(name), options=options, jitify=False)


def _launch(device: torch.device, file: str, kernel: str, grid, block, args, shared_mem=0):
    cupy = _cupy()
    with cupy.cuda.Device(device.index):
        stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream)
        fn = load_module(file).get_function(kernel)
        with stream:
            fn(grid, block, args, shared_mem=shared_mem)


def _as_cupy(x: torch.Tensor):
    return _cupy().from_dlpack(x)


def _check_tensor_cores(device: torch.device) -> None:
    cc = torch.cuda.get_device_capability(device)
    if cc < MIN_TENSOR_CORE_CC:
        raise GPUUnavailableError(
            f"the WMMA kernels target sm_75 and newer; this GPU is sm_{cc[0]}{cc[1]}"
        )


def gemm(a: torch.Tensor, b: torch.Tensor, *, method: str = "wmma") -> torch.Tensor:
    """C = A @ B with fp16 inputs and fp32 accumulation: (M, R) @ (R, N) -> (M, N) fp32."""
    if method not in GEMM_METHODS:
        raise ValueError(f"method must be one of {GEMM_METHODS}, got {method!r}")
    _check_tensor("a", a, 2, torch.float16, "(M, R)")
    _check_tensor("b", b, 2, torch.float16, "(R, N)")
    if a.shape[1] != b.shape[0]:
        raise ValueError(
            f"a {tuple(a.shape)} and b {tuple(b.shape)} do not chain: expected (M, R) @ (R, N)"
        )
    device = _check_devices(a=a, b=b)
    M, R = a.shape
    N = b.shape[1]
    c = torch.empty(M, N, dtype=torch.float32, device=device)  # (M, N)
    if M == 0 or N == 0:
        return c
    if method == "wmma":
        _check_tensor_cores(device)
        grid, block = (-(-N // 32), -(-M // 32)), (128,)  # 32 x 32 of C per block, 4 warps
    else:
        grid, block = (-(-N // 16), -(-M // 16)), (16, 16)
    args = (_as_cupy(a), _as_cupy(b), _as_cupy(c), *(np.int32(n) for n in (M, N, R)))
    _launch(device, "gemm.cu", f"gemm_{method}", grid, block, args)
    return c


def launch_plan(method: str, B: int, H: int, K: int, T: int, D: int, num_splits: int) -> dict:
    """Grid, block and dynamic shared memory of the attention kernel `method` uses.

    cuda_core: one block of 128 threads per (row, query head, token, split);
    wmma: one warp per (row, kv head, 16-row tile of the G*T rows, split), with 160 D + 1856
    bytes of dynamic shared memory (see paged_attention_wmma). `blocks_per_split` is the
    number of thread blocks with one partition.
    """
    if method not in ATTENTION_METHODS:
        raise ValueError(f"method must be one of {ATTENTION_METHODS}, got {method!r}")
    for name, n in (("B", B), ("H", H), ("K", K), ("T", T), ("D", D), ("num_splits", num_splits)):
        check_int(name, n)
    if H % K:
        raise ValueError(f"H={H} must be a multiple of K={K}")
    if method == "wmma":
        n_tiles = -(-(H // K) * T // 16)  # 16-row Tensor Core tiles of the G*T query rows
        grid, block, smem = (num_splits, K * n_tiles, B), (32,), 160 * D + 1856
    else:
        grid, block, smem = (num_splits, H * T, B), (128,), 0
    return {
        "kernel": f"paged_attention_{method}",
        "grid": grid,
        "block": block,
        "shared_mem": smem,
        "blocks_per_split": grid[1] * grid[2],
    }


def paged_decode_launcher(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    method: str = "wmma",
    num_splits: int = 1,
    scale: float | None = None,
) -> Callable[[], torch.Tensor]:
    """Validate once and prepare `paged_decode_attention`; return a function that launches it.

    Each call of the returned function runs the attention kernel and `split_kv_reduce` on the
    same inputs (read again, so new cache contents are seen) and returns the (B, H, T, D)
    output tensor, reused between calls. The checks, which read seq_lens and block_tables on
    the host, run here and not in every launch (for timing, and for a decode loop).
    """
    if method not in ATTENTION_METHODS:
        raise ValueError(f"method must be one of {ATTENTION_METHODS}, got {method!r}")
    check_int("num_splits", num_splits)
    _check_tensor("q", q, 4, torch.float16, "(B, H, T, D)")
    _check_tensor("k_pool", k_pool, 4, torch.float16, "(num_blocks, K, P, D)")
    _check_tensor("v_pool", v_pool, 4, torch.float16, "(num_blocks, K, P, D)")
    _check_tensor("block_tables", block_tables, 2, torch.int32, "(B, M)")
    _check_tensor("seq_lens", seq_lens, 1, torch.int32, "(B,)")
    B, H, T, D = q.shape
    n_blocks, K, P, Dk = k_pool.shape
    if v_pool.shape != k_pool.shape:
        raise ValueError(f"k_pool {tuple(k_pool.shape)} and v_pool {tuple(v_pool.shape)} differ")
    if Dk != D or H % K:
        raise ValueError(
            f"q has H={H}, D={D}; the pool holds K={K} kv heads of D={Dk}: expected equal D "
            "and H a multiple of K"
        )
    if block_tables.shape[0] != B or seq_lens.shape[0] != B:
        raise ValueError(
            f"q has B={B} rows, block_tables {tuple(block_tables.shape)} and seq_lens "
            f"{tuple(seq_lens.shape)}: expected (B, M) and (B,)"
        )
    if method == "wmma" and D % 16:
        raise ValueError(f"the Tensor Core kernel needs D a multiple of 16, got D={D}")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"head dim D={D} is above the kernels' limit of {MAX_HEAD_DIM}")
    device = _check_devices(
        q=q, k_pool=k_pool, v_pool=v_pool, block_tables=block_tables, seq_lens=seq_lens
    )
    lens = seq_lens.cpu()
    M = block_tables.shape[1]
    if bool((lens < T).any()) or bool((lens > M * P).any()):
        raise ValueError(
            f"seq_lens {lens.tolist()} must lie in [T={T}, M*P={M * P}]: each row holds its "
            "query tokens and fits its block table"
        )
    tables = block_tables.cpu()
    needed = torch.arange(M)[None, :] * P < lens[:, None]  # (B, M)
    ids = tables[needed]
    if bool(((ids < 0) | (ids >= n_blocks)).any()):
        raise IndexError(f"block_tables name blocks outside [0, {n_blocks}) where tokens live")
    if method == "wmma":
        _check_tensor_cores(device)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    plan = launch_plan(method, B, H, K, T, D, num_splits)

    part_m = torch.empty(B, H, T, num_splits, dtype=torch.float32, device=device)
    part_l = torch.empty_like(part_m)  # (B, H, T, NS)
    part_o = torch.empty(B, H, T, num_splits, D, dtype=torch.float32, device=device)
    out = torch.empty_like(q)  # (B, H, T, D)
    args = (
        *(_as_cupy(x) for x in (q, k_pool, v_pool, block_tables, seq_lens)),
        *(_as_cupy(x) for x in (part_m, part_l, part_o)),
        *(np.int32(n) for n in (H, K, T, D, P, M, num_splits)),
        np.float32(scale),
    )
    reduce_args = (*(_as_cupy(x) for x in (part_m, part_l, part_o, out)), np.int32(num_splits),
                   np.int32(D))  # fmt: skip
    file = "paged_attention.cu"

    def launch() -> torch.Tensor:
        _launch(device, file, plan["kernel"], plan["grid"], plan["block"], args, plan["shared_mem"])
        _launch(device, file, "split_kv_reduce", (B * H * T,), (128,), reduce_args)
        return out

    return launch


def paged_decode_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    method: str = "wmma",
    num_splits: int = 1,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of each row's last T tokens over its paged K/V: (B, H, T, D) fp16.

    Same contract as `kvlib.paged.paged_attention` (causal, bottom-right aligned; head h
    reads kv head h // G), with the keys of each row cut into `num_splits` partitions that
    run in parallel and are merged by `split_kv_reduce` (flash-decoding).
    """
    launch = paged_decode_launcher(
        q, k_pool, v_pool, block_tables, seq_lens, method=method, num_splits=num_splits,
        scale=scale,
    )  # fmt: skip
    return launch()
