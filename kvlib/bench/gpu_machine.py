"""The GPU at hand: is there one the kernels can run on, which datasheet entry is it, and
what does a GPU result record about it (name, compute capability, SMs, L2, memory, driver,
CUDA runtime, CuPy and the other versions)."""

from __future__ import annotations

import platform
import re

import torch

from kvlib.bench.gpu_timing import l2_bytes
from kvlib.bench.report import machine_info, versions
from kvlib.errors import BenchError, KVLibTypeError, check_int
from kvlib.registry import GPUS


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
    """The `kvlib.registry.GPUS` entry a CUDA device is, or None when none matches.

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
        raise KVLibTypeError(f"device_name must be a str, got {type(device_name).__name__}")
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
        "l2_bytes": l2_bytes(props),
        "memory_bytes": props.total_memory,
        "platform": platform.platform(),
        "host": machine_info(device, torch.get_num_threads()),
        "versions": vers,
    }
