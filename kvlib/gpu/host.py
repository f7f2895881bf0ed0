"""Run the CUDA kernels on the CPU, from their exact source, with the host C++ compiler.

`kvlib/kernels/host/cuda_host.h` supplies CUDA's execution model (thread indices, shared
memory, barriers, warp shuffles, half, WMMA) and enforces the rules a GPU enforces by faulting
or hanging: WMMA alignment and ldm, the dynamic shared-memory size, barriers every thread
reaches, shuffle masks. The unmodified `.cu` file is compiled by g++ into a small executable
(one per source and build: plain, or under AddressSanitizer and UBSan), cached by the hash of
everything that goes into it; a launch writes its arguments to a file, runs the executable and
reads the buffers back. A separate process keeps the sanitizers out of Python, and turns a
kernel's fault into a clear KernelFaultError instead of a crash.

    gemm(a, b, method, order, sanitize)                  A: (m, k) fp16, B: (k, n) fp16
    paged_decode_attention(q, k_pool, ..., method, num_splits, order, sanitize)
    launch(file, kernel, grid, block, args, shared_mem, order, sanitize, source)

`gemm` and `paged_decode_attention` take CPU torch tensors and go through the same checks and
the same launch plan (grid, block, shared memory, arguments) as `kvlib.gpu.kernels` uses for
CuPy, so the launch code is tested too. `order` picks the interleaving: "forward" runs the
threads of a block (and the blocks) in index order between two synchronization points,
"reverse" in the opposite order; a correct kernel gives the same bytes both ways. `source`
replaces the file's text (a deliberately broken copy, in the tests).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from kvlib.errors import KernelFaultError, KVLibValueError, ToolchainError
from kvlib.gpu import kernels as gk
from kvlib.gpu.nvrtc import kernel_source

ORDERS = ("forward", "reverse")
HEADERS = ("cuda_host.h", "kvhost_main.h", "cuda_fp16.h", "mma.h")
PLAIN_FLAGS = ("-std=c++17", "-O2", "-g0")
SANITIZE_FLAGS = (
    "-std=c++17",
    "-O1",
    "-g",
    "-fno-omit-frame-pointer",
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=all",
)
TIMEOUT_S = 300  # a kernel that loops forever is reported, not waited on
_SCALAR_KINDS = {
    "int": ("i", np.int32),
    "unsigned": ("i", np.uint32),
    "unsigned int": ("i", np.uint32),
    "float": ("f", np.float32),
    "long long": ("l", np.int64),
}
_POINTER_DTYPES = {
    "half": np.float16,
    "__half": np.float16,
    "float": np.float32,
    "int": np.int32,
    "long long": np.int64,
}
_KERNEL_RE = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)')
_DYNAMIC_RE = re.compile(
    r"extern\s+__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s*)?([\w\s]+?)\s+"
    r"(\w+)\s*\[\s*\]"
)


@dataclass(frozen=True)
class Param:
    """One parameter of a kernel: a buffer (with its element dtype) or a scalar."""

    name: str
    ctype: str  # as declared, without __restrict__
    kind: str  # p (buffer), i (int32), f (float32), l (int64)
    dtype: type


def kernel_params(source: str) -> dict[str, list[Param]]:
    """The `extern "C" __global__` kernels of a source and their parameters, in order."""
    out = {}
    for name, params in _KERNEL_RE.findall(source):
        plist = []
        for text in params.split(","):
            text = " ".join(text.replace("__restrict__", " ").split())
            m = re.fullmatch(r"(.*?)\s*(\w+)", text)
            ctype, pname = m.group(1).strip(), m.group(2)
            if "*" in ctype:
                base = " ".join(w for w in ctype.replace("*", " ").split() if w != "const")
                if base not in _POINTER_DTYPES:
                    raise ToolchainError(f"{name}: buffer parameter {text!r} of unknown type")
                plist.append(Param(pname, ctype, "p", _POINTER_DTYPES[base]))
            elif ctype in _SCALAR_KINDS:
                plist.append(Param(pname, ctype, *_SCALAR_KINDS[ctype]))
            else:
                raise ToolchainError(f"{name}: scalar parameter {text!r} of unknown type")
        out[name] = plist
    return out


def _dispatch_source(source: str, path: Path) -> str:
    """The C++ translation unit: the header, the .cu file as it is, and a dispatcher."""
    lines = ['#include "cuda_host.h"']
    names = []
    for ctype, name in _DYNAMIC_RE.findall(source):  # extern __shared__ arrays are defined here
        if name not in names:
            names.append(name)
            lines.append(
                f"thread_local __attribute__((aligned(256))) {ctype} "
                f"{name}[kvhost::MAX_DYNAMIC_SMEM / sizeof({ctype})];"
            )
    lines += [
        f'#include "{path.name}"',
        '#include "kvhost_main.h"',
        "",
        "bool kvhost_dispatch(const kvhost::Args& a) {",
    ]
    for name in names:
        lines.append(f"    kvhost::register_dynamic((unsigned char*){name}, sizeof({name}));")
    for kernel, params in kernel_params(source).items():
        call = []
        for i, p in enumerate(params):
            if p.kind == "p":
                call.append(f"({p.ctype})a.ptr({i})")
            else:
                call.append(f"({p.ctype})a.{ {'i': 'i32', 'f': 'f32', 'l': 'i64'}[p.kind] }({i})")
        kinds = "".join(p.kind for p in params)
        lines += [
            f'    if (a.name == "{kernel}") {{',
            f'        a.expect("{kinds}");',
            f'        kvhost::launch("{kernel}", a.grid, a.block, a.smem, a.order, [&] {{',
            f"            {kernel}({', '.join(call)});",
            "        });",
            "        return true;",
            "    }",
        ]
    lines += ["    return false;", "}", ""]
    return "\n".join(lines)


def compiler() -> str:
    """The host C++ compiler: $CXX if set, else g++ on the PATH."""
    cxx = os.environ.get("CXX") or shutil.which("g++")
    if not cxx or not shutil.which(cxx):
        raise ToolchainError(
            "no host C++ compiler: running the CUDA kernels on the CPU needs g++ (for example "
            "apt-get install g++) or $CXX naming a compiler that accepts GCC's flags"
        )
    return cxx


@functools.cache
def _compiler_version(cxx: str) -> str:
    proc = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False)
    return proc.stdout


def cache_dir() -> Path:
    """Where built kernel executables are kept: $KVLIB_CACHE or the temp dir, per user.

    The folder is created private (mode 700); one owned by another user is refused, since
    the executables in it are run.
    """
    root = Path(
        os.environ.get("KVLIB_CACHE") or Path(tempfile.gettempdir()) / f"kvlib-{os.getuid()}"
    )
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    if root.stat().st_uid != os.getuid():
        raise ToolchainError(
            f"{root} belongs to another user; set KVLIB_CACHE to a folder of yours"
        )
    return root / "host-kernels"


def build(file: str, *, sanitize: bool = False, source: str | None = None) -> Path:
    """The executable of one kernel source (built once, then taken from the cache)."""
    source = kernel_source(file) if source is None else source
    flags = SANITIZE_FLAGS if sanitize else PLAIN_FLAGS
    cxx = compiler()
    headers = resources.files("kvlib").joinpath("kernels", "host")
    texts = {h: headers.joinpath(h).read_text() for h in HEADERS}
    key = hashlib.sha256(
        "\0".join(
            [
                _compiler_version(cxx),
                *flags,
                source,
                *texts.values(),
                _dispatch_source(source, Path(file)),
            ]
        ).encode()
    ).hexdigest()[:20]
    out = cache_dir() / f"{Path(file).stem}-{'asan' if sanitize else 'plain'}-{key}"
    exe = out / "kernel"
    if exe.is_file():
        return exe
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp = Path(tmp)
        for h, text in texts.items():
            (tmp / h).write_text(text)
        (tmp / file).write_text(source)
        (tmp / "main.cpp").write_text(_dispatch_source(source, tmp / file))
        cmd = [cxx, *flags, "-I", str(tmp), str(tmp / "main.cpp"), "-o", str(tmp / "kernel")]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode:
            raise ToolchainError(f"{cxx} failed on {file}:\n{proc.stderr[-4000:]}")
        os.replace(tmp / "kernel", exe)  # atomic: a concurrent build of the same key is fine
    return exe


def _dim3(name: str, dims) -> tuple[int, int, int]:
    dims = tuple(int(d) for d in dims)
    if not 1 <= len(dims) <= 3:
        raise KVLibValueError(f"{name} must have 1 to 3 dimensions, got {dims}")
    return (*dims, *(1,) * (3 - len(dims)))


def launch(
    file: str,
    kernel: str,
    grid,
    block,
    args: list,
    shared_mem: int = 0,
    *,
    order: str = "forward",
    sanitize: bool = False,
    source: str | None = None,
) -> dict[str, np.ndarray]:
    """Run `kernel` of `file` on the CPU; return its buffers after the run, by parameter name.

    `args` follow the kernel's parameters: a NumPy array or CPU torch tensor of the right
    dtype for each buffer (copied in, never changed), a number for each scalar.
    """
    if order not in ORDERS:
        raise KVLibValueError(f"order must be one of {ORDERS}, got {order!r}")
    params = kernel_params(kernel_source(file) if source is None else source)
    if kernel not in params:
        raise KVLibValueError(f"{file} has no kernel {kernel!r}; it has {list(params)}")
    params = params[kernel]
    if len(args) != len(params):
        raise KVLibValueError(
            f"{kernel} takes {len(params)} arguments ({', '.join(p.name for p in params)}), "
            f"got {len(args)}"
        )
    chunks = [b"KVH1", np.uint32(len(kernel)).tobytes(), kernel.encode()]
    chunks += [np.array([*_dim3("grid", grid), *_dim3("block", block)], np.uint32).tobytes()]
    chunks += [np.uint64(shared_mem).tobytes(), np.uint32(ORDERS.index(order)).tobytes()]
    chunks += [np.uint32(len(args)).tobytes()]
    buffers = []
    for p, x in zip(params, args, strict=True):
        if p.kind == "p":
            arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
            if arr.dtype != p.dtype:
                raise KVLibValueError(
                    f"{kernel}: {p.name} must be {np.dtype(p.dtype)}, got {arr.dtype}"
                )
            arr = np.ascontiguousarray(arr)
            buffers.append((p.name, arr))
            chunks += [b"\0", np.uint64(arr.nbytes).tobytes(), arr.tobytes()]
        else:
            value = np.zeros(1, np.uint64)
            value.view(p.dtype)[0] = x  # the scalar in the low bytes
            chunks += ["pifl".index(p.kind).to_bytes(1, "little"), value.tobytes()]
    exe = build(file, sanitize=sanitize, source=source)
    with tempfile.TemporaryDirectory() as tmp:
        inp, outp = Path(tmp) / "launch", Path(tmp) / "out"
        inp.write_bytes(b"".join(chunks))
        env = dict(
            os.environ,
            ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:exitcode=4",
            UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=5",
        )
        try:
            proc = subprocess.run(
                [str(exe), str(inp), str(outp)],
                capture_output=True,
                text=True,
                env=env,
                timeout=TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise KernelFaultError(
                f"{kernel} ran past {TIMEOUT_S} s (a loop that never ends?)"
            ) from e
        if proc.returncode or "Sanitizer" in proc.stderr:  # an error, or a sanitizer warning
            raise KernelFaultError(
                f"{kernel} failed on the CPU (exit {proc.returncode}):\n{proc.stderr[-6000:]}"
            )
        data = outp.read_bytes()
    out, pos = {}, 0
    for name, arr in buffers:
        out[name] = np.frombuffer(data[pos : pos + arr.nbytes], arr.dtype).reshape(arr.shape)
        pos += arr.nbytes
    return out


def run(launches: list[gk.Launch], **options) -> None:
    """Run a launch list of `kvlib.gpu.kernels` on the CPU, writing results into its tensors."""
    for ln in launches:
        source = options.get("source")
        params = kernel_params(kernel_source(ln.file) if source is None else source)[ln.kernel]
        results = launch(
            ln.file, ln.kernel, ln.grid, ln.block, list(ln.args), ln.shared_mem, **options
        )
        for p, arg in zip(params, ln.args, strict=True):
            if p.kind == "p" and not p.ctype.startswith("const"):  # an output buffer
                arg.copy_(torch.from_numpy(results[p.name].copy()))


def _check_cpu(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.device.type != "cpu":
            raise KVLibValueError(
                f"{name} is on {t.device}; the CPU run takes CPU tensors "
                "(kvlib.gpu.kernels runs them on the GPU)"
            )


def gemm(a: torch.Tensor, b: torch.Tensor, *, method: str = "wmma", **options) -> torch.Tensor:
    """`kvlib.gpu.kernels.gemm` on the CPU: (m, k) @ (k, n) fp16 -> (m, n) fp32."""
    c, launches = gk.gemm_launches(a, b, method)
    _check_cpu(a=a, b=b)
    run(launches, **options)
    return c


def paged_decode_attention(
    q, k_pool, v_pool, block_tables, seq_lens, *, method="wmma", num_splits=1, scale=None, **options
) -> torch.Tensor:
    """`kvlib.gpu.kernels.paged_decode_attention` on the CPU: (B, H, T, D) fp16."""
    out, launches = gk.paged_decode_launches(
        q, k_pool, v_pool, block_tables, seq_lens, method=method, num_splits=num_splits, scale=scale
    )
    _check_cpu(q=q, k_pool=k_pool, v_pool=v_pool, block_tables=block_tables, seq_lens=seq_lens)
    run(launches, **options)
    return out
