"""Python wrappers of the CUDA kernels: validate, hand torch tensors to CuPy, launch.

The sources are package data (`kvlib/kernels/*.cu`), compiled at first use by
`cupy.RawModule` (NVRTC, jitify off) for the GPU at hand. Tensors cross between torch and CuPy
through DLPack: no copies, and the launch goes on torch's current stream.

    gemm(a, b, method)                A: (m, k) fp16, B: (k, n) fp16 -> C: (m, n) fp32
        method: "naive" | "tiled" | "wmma" (Tensor Cores, sm_75+)
    paged_decode_attention(q, k_pool, v_pool, block_tables, seq_lens, method, num_splits)
        q: (B, H, T, D) fp16; k_pool, v_pool: (num_blocks, K, P, D) fp16 (one layer's pool);
        block_tables: (B, M) int32; seq_lens: (B,) int32 -> (B, H, T, D) fp16
        method: "cuda_core" | "wmma" (Tensor Cores: the G*T rows of a GQA group per tile)
    paged_decode_launcher(...)        the same arguments, checked once: returns a function
        that launches the kernels (for timing and decode loops); launch_plan gives its grid

The launch plan (which kernel, grid, block, dynamic shared memory, arguments) is built once,
by `gemm_launches` and `paged_decode_launches`, for any device: CuPy runs it here, and
`kvlib.gpu.host` runs the same plan on the CPU from the same source.

Every check runs before CuPy is imported, so misuse (a CPU tensor, a wrong dtype, a strided
view) raises a clear error on any machine. The reference paths: `a.float() @ b.float()` and
`kvlib.paged.paged_attention`; `kvlib.gpu.emulate` reproduces the kernels' arithmetic on CPU.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from kvlib.errors import (
    GPUUnavailableError,
    KVLibIndexError,
    KVLibTypeError,
    KVLibValueError,
    check_int,
)
from kvlib.gpu.nvrtc import ToolchainError, include_dirs, kernel_source

GEMM_METHODS = ("naive", "tiled", "wmma")
ATTENTION_METHODS = ("cuda_core", "wmma")
MAX_HEAD_DIM = 256  # MAX_D of paged_attention.cu
MIN_TENSOR_CORE_CC = (7, 5)  # the book's target: sm_75 (T4) and newer


def _check_tensor(name: str, x: object, ndim: int, dtype: torch.dtype, layout: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise KVLibTypeError(f"{name} must be a torch.Tensor {layout}, got {type(x).__name__}")
    if x.ndim != ndim:
        raise KVLibValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(x.shape)}")
    if x.dtype != dtype:
        raise KVLibTypeError(f"{name} must be {dtype}, got {x.dtype} (convert with .to({dtype}))")
    if not x.is_contiguous():
        raise KVLibValueError(
            f"{name} {tuple(x.shape)} is not contiguous; the kernel indexes it as dense "
            "row-major memory (call .contiguous())"
        )
    return x


@dataclass(frozen=True)
class Launch:
    """One kernel launch: source file, kernel, grid, block, dynamic shared bytes, arguments.

    `args` are torch tensors (the buffers) and NumPy scalars, in the kernel's parameter order.
    """

    file: str
    kernel: str
    grid: tuple[int, ...]
    block: tuple[int, ...]
    shared_mem: int
    args: tuple


def _check_devices(**tensors: torch.Tensor) -> torch.device:
    devices = {n: t.device for n, t in tensors.items()}
    for n, d in devices.items():
        if d.type != "cuda":
            raise KVLibValueError(
                f"{n} is on {d}; the CUDA kernels take tensors on a CUDA device (move them "
                "with .cuda()), or use kvlib.gpu.emulate on the CPU"
            )
    if len(set(devices.values())) > 1:
        raise KVLibValueError(f"tensors are on different devices: {devices}; put them on one GPU")
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


def _cupy_args(launch: Launch) -> tuple:
    """The launch's arguments for CuPy: tensors as CuPy arrays (DLPack, no copy)."""
    return tuple(_as_cupy(a) if isinstance(a, torch.Tensor) else a for a in launch.args)


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


def gemm_plan(method: str, M: int, N: int) -> dict:
    """Kernel, grid, block and dynamic shared memory of the GEMM `method` for an (m, n) C."""
    if method not in GEMM_METHODS:
        raise KVLibValueError(f"method must be one of {GEMM_METHODS}, got {method!r}")
    if method == "wmma":
        grid, block = (-(-N // 32), -(-M // 32)), (128,)  # 32 x 32 of C per block, 4 warps
    else:
        grid, block = (-(-N // 16), -(-M // 16)), (16, 16)  # one thread per element of C
    return {"kernel": f"gemm_{method}", "grid": grid, "block": block, "shared_mem": 0}


def gemm_launches(a: torch.Tensor, b: torch.Tensor, method: str) -> tuple[torch.Tensor, list]:
    """Check a GEMM's inputs; return C (m, n) fp32, allocated on a's device, and its launches.

    No launch when M or N is 0 (C is empty). Device-agnostic: `gemm` runs the launches with
    CuPy, `kvlib.gpu.host.gemm` on the CPU.
    """
    if method not in GEMM_METHODS:
        raise KVLibValueError(f"method must be one of {GEMM_METHODS}, got {method!r}")
    _check_tensor("a", a, 2, torch.float16, "(m, k)")
    _check_tensor("b", b, 2, torch.float16, "(k, n)")
    if a.shape[1] != b.shape[0]:
        raise KVLibValueError(
            f"a {tuple(a.shape)} and b {tuple(b.shape)} do not chain: expected (m, k) @ (k, n)"
        )
    M, R = a.shape
    N = b.shape[1]
    c = torch.empty(M, N, dtype=torch.float32, device=a.device)  # (m, n)
    if M == 0 or N == 0:
        return c, []
    plan = gemm_plan(method, M, N)
    args = (a, b, c, *(np.int32(n) for n in (M, N, R)))
    return c, [Launch("gemm.cu", plan["kernel"], plan["grid"], plan["block"], 0, args)]


def gemm(a: torch.Tensor, b: torch.Tensor, *, method: str = "wmma") -> torch.Tensor:
    """C = A @ B with fp16 inputs and fp32 accumulation: (m, k) @ (k, n) -> (m, n) fp32."""
    c, launches = gemm_launches(a, b, method)
    device = _check_devices(a=a, b=b)
    if method == "wmma":
        _check_tensor_cores(device)
    for ln in launches:
        _launch(device, ln.file, ln.kernel, ln.grid, ln.block, _cupy_args(ln), ln.shared_mem)
    return c


def launch_plan(method: str, B: int, H: int, K: int, T: int, D: int, num_splits: int) -> dict:
    """Grid, block and dynamic shared memory of the attention kernel `method` uses.

    cuda_core: one block of 128 threads per (row, query head, token, split);
    wmma: one warp per (row, kv head, 16-row tile of the G*T rows, split), with 160 D + 1856
    bytes of dynamic shared memory (see paged_attention_wmma). `blocks_per_split` is the
    number of thread blocks with one partition.
    """
    if method not in ATTENTION_METHODS:
        raise KVLibValueError(f"method must be one of {ATTENTION_METHODS}, got {method!r}")
    for name, n in (("B", B), ("H", H), ("K", K), ("T", T), ("D", D), ("num_splits", num_splits)):
        check_int(name, n)
    if H % K:
        raise KVLibValueError(f"H={H} must be a multiple of K={K}")
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


def paged_decode_launches(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    method: str = "wmma",
    num_splits: int = 1,
    scale: float | None = None,
) -> tuple[torch.Tensor, list[Launch]]:
    """Check the inputs of `paged_decode_attention`; return its output and its two launches.

    The output (B, H, T, D) fp16 and the partials are allocated on q's device; the launches
    are the attention kernel (grid from `launch_plan`) and `split_kv_reduce`. Device-agnostic:
    CuPy runs them in `paged_decode_launcher`, `kvlib.gpu.host` on the CPU.
    """
    if method not in ATTENTION_METHODS:
        raise KVLibValueError(f"method must be one of {ATTENTION_METHODS}, got {method!r}")
    check_int("num_splits", num_splits)
    _check_tensor("q", q, 4, torch.float16, "(B, H, T, D)")
    _check_tensor("k_pool", k_pool, 4, torch.float16, "(num_blocks, K, P, D)")
    _check_tensor("v_pool", v_pool, 4, torch.float16, "(num_blocks, K, P, D)")
    _check_tensor("block_tables", block_tables, 2, torch.int32, "(B, M)")
    _check_tensor("seq_lens", seq_lens, 1, torch.int32, "(B,)")
    B, H, T, D = q.shape
    n_blocks, K, P, Dk = k_pool.shape
    if v_pool.shape != k_pool.shape:
        raise KVLibValueError(
            f"k_pool {tuple(k_pool.shape)} and v_pool {tuple(v_pool.shape)} differ"
        )
    if Dk != D or H % K:
        raise KVLibValueError(
            f"q has H={H}, D={D}; the pool holds K={K} kv heads of D={Dk}: expected equal D "
            "and H a multiple of K"
        )
    if block_tables.shape[0] != B or seq_lens.shape[0] != B:
        raise KVLibValueError(
            f"q has B={B} rows, block_tables {tuple(block_tables.shape)} and seq_lens "
            f"{tuple(seq_lens.shape)}: expected (B, M) and (B,)"
        )
    if method == "wmma" and D % 16:
        raise KVLibValueError(f"the Tensor Core kernel needs D a multiple of 16, got D={D}")
    if D > MAX_HEAD_DIM:
        raise KVLibValueError(f"head dim D={D} is above the kernels' limit of {MAX_HEAD_DIM}")
    lens = seq_lens.cpu()
    M = block_tables.shape[1]
    if bool((lens < T).any()) or bool((lens > M * P).any()):
        raise KVLibValueError(
            f"seq_lens {lens.tolist()} must lie in [T={T}, M*P={M * P}]: each row holds its "
            "query tokens and fits its block table"
        )
    tables = block_tables.cpu()
    needed = torch.arange(M)[None, :] * P < lens[:, None]  # (B, M)
    ids = tables[needed]
    if bool(((ids < 0) | (ids >= n_blocks)).any()):
        raise KVLibIndexError(f"block_tables name blocks outside [0, {n_blocks}) where tokens live")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    plan = launch_plan(method, B, H, K, T, D, num_splits)
    device = q.device

    part_m = torch.empty(B, H, T, num_splits, dtype=torch.float32, device=device)
    part_l = torch.empty_like(part_m)  # (B, H, T, NS)
    part_o = torch.empty(B, H, T, num_splits, D, dtype=torch.float32, device=device)
    out = torch.empty_like(q)  # (B, H, T, D)
    args = (
        q, k_pool, v_pool, block_tables, seq_lens, part_m, part_l, part_o,
        *(np.int32(n) for n in (H, K, T, D, P, M, num_splits)),
        np.float32(scale),
    )  # fmt: skip
    reduce_args = (part_m, part_l, part_o, out, np.int32(num_splits), np.int32(D))
    file = "paged_attention.cu"
    return out, [
        Launch(file, plan["kernel"], plan["grid"], plan["block"], plan["shared_mem"], args),
        Launch(file, "split_kv_reduce", (B * H * T,), (128,), 0, reduce_args),
    ]


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
    out, launches = paged_decode_launches(
        q, k_pool, v_pool, block_tables, seq_lens, method=method, num_splits=num_splits,
        scale=scale,
    )  # fmt: skip
    device = _check_devices(
        q=q, k_pool=k_pool, v_pool=v_pool, block_tables=block_tables, seq_lens=seq_lens
    )
    if method == "wmma":
        _check_tensor_cores(device)
    prepared = [(ln, _cupy_args(ln)) for ln in launches]

    def launch() -> torch.Tensor:
        for ln, args in prepared:
            _launch(device, ln.file, ln.kernel, ln.grid, ln.block, args, ln.shared_mem)
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
