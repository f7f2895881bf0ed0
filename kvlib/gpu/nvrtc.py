"""Compile the CUDA kernels without a GPU: NVRTC to PTX, then `ptxas` to machine code.

Everything here runs on a machine with no GPU and no driver. NVRTC (the runtime compiler,
`libnvrtc` from the `nvidia-cuda-nvrtc-cu12` wheel) turns CUDA C++ into PTX, the virtual
instruction set; we call it through CuPy's low-level binding `cupy.cuda.nvrtc`, which never
touches a device (CuPy's high-level `RawModule` asks the driver for the architecture and
fails without one). `ptxas` (from `nvidia-cuda-nvcc-cu12`) assembles PTX for a real
architecture, sm_75 (T4) ... sm_90 (H100), and reports registers per thread, the number that
limits how many warps fit on a multiprocessor. Headers: `cuda_fp16.h` and `mma.h` come from
`nvidia-cuda-runtime-cu12`, `crt/*.h` from `nvidia-cuda-nvcc-cu12`.

Sources are package data: `kvlib/kernels/*.cu`. Kernels are the `extern "C" __global__`
functions of a source (unmangled names, so `RawModule.get_function` finds them).
"""

from __future__ import annotations

import functools
import importlib
import re
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from kvlib.errors import KVLibValueError, ToolchainError, check_int

ARCHS: tuple[int, ...] = (75, 80, 89, 90)  # T4, A100, L4/RTX 40, H100
KERNEL_FILES: tuple[str, ...] = ("gemm.cu", "paged_attention.cu")
TENSOR_CORE_KERNELS: tuple[str, ...] = ("gemm_wmma", "paged_attention_wmma")
COMPILE_OPTIONS: tuple[str, ...] = ("--std=c++17", "-ftz=true")  # what CuPy 14 passes

_KERNEL_RE = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(')


def kernel_source(name: str) -> str:
    """The CUDA source of one kernel file shipped in `kvlib/kernels` (e.g. 'gemm.cu')."""
    if name not in KERNEL_FILES:
        raise KVLibValueError(f"unknown kernel file {name!r}; expected one of {KERNEL_FILES}")
    return resources.files("kvlib").joinpath("kernels", name).read_text()


def kernel_names(source: str) -> list[str]:
    """Names of the `extern "C" __global__` kernels in a CUDA source, in order."""
    return _KERNEL_RE.findall(source)


def _wheel_dir(module: str) -> Path:
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ToolchainError(
            f"{module} is not installed; install the gpu extra (pip install 'kvlib[gpu]')"
        ) from e
    return Path(next(iter(mod.__path__)))


def include_dirs() -> list[Path]:
    """Header folders of the CUDA wheels: cuda_fp16.h and mma.h, then crt/."""
    dirs = [_wheel_dir(m) / "include" for m in ("nvidia.cuda_runtime", "nvidia.cuda_nvcc")]
    for d in dirs:
        if not d.is_dir():
            raise ToolchainError(f"expected CUDA headers in {d}; reinstall the gpu extra")
    return dirs


def ptxas_path() -> Path:
    """The `ptxas` assembler shipped in the nvidia-cuda-nvcc-cu12 wheel."""
    path = _wheel_dir("nvidia.cuda_nvcc") / "bin" / "ptxas"
    if not path.is_file():
        raise ToolchainError(f"ptxas not found at {path}; reinstall nvidia-cuda-nvcc-cu12")
    return path


def _check_arch(arch: int) -> None:
    check_int("arch", arch, low=None)  # 80 for sm_80
    if arch < 75:
        raise KVLibValueError(f"arch {arch} is below 75: the kernels target sm_75 (T4) and newer")


@functools.lru_cache(maxsize=64)
def compile_ptx(source: str, arch: int = 80, name: str = "kernel.cu") -> str:
    """PTX text of `source` for compute_{arch}, compiled by NVRTC (no GPU needed).

    Raises ToolchainError with NVRTC's log when the source does not compile.
    """
    _check_arch(arch)
    try:
        from cupy.cuda import nvrtc
    except ImportError as e:
        raise ToolchainError("CuPy is not installed; install the gpu extra") from e
    options = [f"--gpu-architecture=compute_{arch}", *COMPILE_OPTIONS]
    options += [f"-I{d}" for d in include_dirs()]
    prog = nvrtc.createProgram(source, name, [], [])
    try:
        try:
            nvrtc.compileProgram(prog, options)
        except nvrtc.NVRTCError as e:
            log = nvrtc.getProgramLog(prog)
            raise ToolchainError(f"NVRTC failed on {name} for compute_{arch}:\n{log}") from e
        ptx = nvrtc.getPTX(prog)
    finally:
        nvrtc.destroyProgram(prog)
    return ptx.decode() if isinstance(ptx, bytes) else ptx


def ptx_entry(ptx: str, kernel: str) -> str:
    """The PTX of one kernel: from its `.entry` line to the next `.entry` (or the end)."""
    start = re.search(rf"\.entry\s+{re.escape(kernel)}\s*\(", ptx)
    if start is None:
        found = re.findall(r"\.entry\s+(\w+)", ptx)
        raise KVLibValueError(f"kernel {kernel!r} is not in this PTX; it has {found}")
    nxt = ptx.find(".entry", start.end())
    return ptx[start.start() : nxt if nxt >= 0 else len(ptx)]


@dataclass(frozen=True)
class KernelResources:
    """What `ptxas -v` reports for one kernel on one architecture."""

    kernel: str
    arch: int
    registers: int  # per thread
    shared_bytes: int  # static shared memory per block
    spill_bytes: int  # stores + loads spilled to local memory


_PTXAS_FUNC = re.compile(r"Compiling entry function '(\w+)' for 'sm_(\d+)'")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas_log(log: str) -> list[KernelResources]:
    """The per-kernel lines of a `ptxas -v` log, as KernelResources."""
    out, kernel, arch, spill = [], None, 0, 0
    for line in log.splitlines():
        if m := _PTXAS_FUNC.search(line):
            kernel, arch, spill = m.group(1), int(m.group(2)), 0
        elif (m := _PTXAS_SPILL.search(line)) and kernel:
            spill = int(m.group(1)) + int(m.group(2))
        elif (m := _PTXAS_REGS.search(line)) and kernel:
            smem = _PTXAS_SMEM.search(line)
            out.append(
                KernelResources(kernel, arch, int(m.group(1)), int(smem.group(1)) if smem else 0,
                                spill)
            )  # fmt: skip
            kernel = None
    return out


@functools.lru_cache(maxsize=64)
def assemble(ptx: str, arch: int = 80) -> tuple[KernelResources, ...]:
    """Assemble PTX for sm_{arch} with the wheel's ptxas; one KernelResources per kernel."""
    _check_arch(arch)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        cmd = [str(ptxas_path()), f"-arch=sm_{arch}", "-v", str(src), "-o", str(Path(tmp) / "k")]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise ToolchainError(f"ptxas failed for sm_{arch}:\n{proc.stderr}")
    found = parse_ptxas_log(proc.stderr + proc.stdout)
    if not found:
        raise ToolchainError(f"ptxas reported no kernels for sm_{arch}:\n{proc.stderr}")
    return tuple(found)


def register_table(
    files: tuple[str, ...] = KERNEL_FILES, archs: tuple[int, ...] = ARCHS
) -> dict[str, dict[int, int]]:
    """Registers per thread: {kernel: {arch: registers}} for every kernel of `files`."""
    table: dict[str, dict[int, int]] = {}
    for name in files:
        source = kernel_source(name)
        for kernel in kernel_names(source):  # rows in source order
            table[kernel] = {}
        for arch in archs:
            for res in assemble(compile_ptx(source, arch, name), arch):
                table[res.kernel][arch] = res.registers
    return table
