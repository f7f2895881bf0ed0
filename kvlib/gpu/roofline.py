"""The roofline model: is a kernel limited by memory bandwidth or by arithmetic?

A kernel doing F floating-point operations while moving Q bytes to and from memory has
arithmetic intensity I = F / Q (FLOP/byte). A GPU with peak P FLOP/s and bandwidth W bytes/s
reaches at most min(P, I * W) (Williams et al. 2009): below the ridge point I* = P / W the
kernel waits on memory, above it on arithmetic.

Decode attention, per sequence and kv head (letters as in kvlib: G = H / K query heads share
one kv head, T query tokens, S cached keys, D head dim, b bytes per element):

    FLOPs  = 2 * G*T*S*D  (scores q k^T)  +  2 * G*T*S*D  (weights @ v)  = 4 G T S D
    bytes  = 2 * S*D*b  (read K and V)   +  2 * G*T*D*b  (read q, write the output)
    I      = 4 G T S D / (2 S D b + 2 G T D b)  ~  2 G T / b  for S >> G T

In fp16 (b = 2) that is about G * T FLOP/byte: 1 for MHA decode (G = T = 1), 8 for a model
with 8 query heads per kv head. Every GPU in `kvlib.memory.GPUS` has a Tensor Core ridge point
in the hundreds, so generating a token is memory bound: its speed is set by how fast the cache
is read. A kernel on the CUDA cores (no Tensor Cores) meets a lower roof: the fp32 peak of
`CUDA_CORE_FP32_FLOPS`, whose ridge point is tens of FLOP/byte (about 25 on a T4).
"""

from __future__ import annotations

import torch

from kvlib.config import ModelConfig, dtype_bytes
from kvlib.errors import KVLibTypeError, KVLibValueError, UnknownNameError, check_int
from kvlib.memory import GPU, get_gpu, get_model

# Datasheet peak fp32 FLOP/s of the CUDA cores (no Tensor Cores), dense, per GPU of
# kvlib.memory.GPUS (the same datasheets; SXM parts; MI300X: vector fp32).
CUDA_CORE_FP32_FLOPS: dict[str, float] = {
    "T4": 8.1e12,
    "L4": 30.3e12,
    "A10": 31.2e12,
    "V100-32": 15.7e12,
    "A100-40": 19.5e12,
    "A100-80": 19.5e12,
    "H100-80": 67e12,
    "H200-141": 67e12,
    "MI300X": 163.4e12,
}


def decode_attention_flops(G: int, S: int, D: int, T: int = 1) -> int:
    """FLOPs of attention for one sequence and one kv head: 4 * G * T * S * D."""
    for name, v in (("G", G), ("S", S), ("D", D), ("T", T)):
        check_int(name, v)
    return 4 * G * T * S * D


def decode_attention_bytes(
    G: int, S: int, D: int, T: int = 1, dtype: torch.dtype = torch.float16
) -> int:
    """Bytes moved for one sequence and one kv head: K and V read once, q read, output written."""
    for name, v in (("G", G), ("S", S), ("D", D), ("T", T)):
        check_int(name, v)
    b = dtype_bytes(dtype)
    return 2 * S * D * b + 2 * G * T * D * b


def decode_attention_intensity(
    G: int, S: int, D: int, T: int = 1, dtype: torch.dtype = torch.float16
) -> float:
    """Arithmetic intensity (FLOP/byte) of attention of T queries per head over S cached keys."""
    return decode_attention_flops(G, S, D, T) / decode_attention_bytes(G, S, D, T, dtype)


def model_attention_intensity(
    model: ModelConfig | str, S: int, T: int = 1, dtype: torch.dtype = torch.float16
) -> float:
    """`decode_attention_intensity` with the G and D of a model (a ModelConfig or a name)."""
    config = get_model(model) if isinstance(model, str) else model
    if not isinstance(config, ModelConfig):
        raise KVLibTypeError(f"model must be a ModelConfig or a name, got {type(model).__name__}")
    return decode_attention_intensity(config.group_size, S, config.head_dim, T, dtype)


def matmul_intensity(M: int, N: int, R: int, dtype: torch.dtype = torch.float16) -> float:
    """Intensity of (m, k) @ (k, n): 2 m n k FLOPs over (m k + k n + m n) elements moved."""
    for name, v in (("M", M), ("N", N), ("R", R)):
        check_int(name, v)
    return 2 * M * N * R / ((M * R + R * N + M * N) * dtype_bytes(dtype))


def _gpu(gpu: GPU | str) -> GPU:
    if isinstance(gpu, str):
        return get_gpu(gpu)
    if not isinstance(gpu, GPU):
        raise KVLibTypeError(f"expected a kvlib.memory.GPU or a GPU name, got {type(gpu).__name__}")
    return gpu


def ridge_point(gpu: GPU | str) -> float:
    """FLOP/byte where the roofline bends: peak FLOP/s divided by bandwidth (bytes/s)."""
    g = _gpu(gpu)
    return g.peak_flops / g.bandwidth


def cuda_core_ridge_point(gpu: GPU | str) -> float:
    """FLOP/byte where the CUDA-core (fp32, no Tensor Core) roofline bends: about 25 on a T4."""
    g = _gpu(gpu)
    if g.name not in CUDA_CORE_FP32_FLOPS:
        known = list(CUDA_CORE_FP32_FLOPS)
        raise UnknownNameError(f"no fp32 CUDA-core peak for {g.name}; known: {known}")
    return CUDA_CORE_FP32_FLOPS[g.name] / g.bandwidth


def attainable_flops(intensity: float, gpu: GPU | str) -> float:
    """The roofline: min(peak FLOP/s, intensity * bandwidth)."""
    if not intensity > 0:
        raise KVLibValueError(f"intensity must be a positive FLOP/byte, got {intensity!r}")
    g = _gpu(gpu)
    return min(g.peak_flops, intensity * g.bandwidth)


def tile_utilization(G: int, T: int = 1, tile_rows: int = 16) -> float:
    """Share of a Tensor Core tile's rows holding real queries when G*T rows fill 16-row tiles.

    MHA decode (G = T = 1) uses 1 row of 16; a GQA group of 8 heads uses half a tile.
    """
    for name, v in (("G", G), ("T", T), ("tile_rows", tile_rows)):
        check_int(name, v)
    rows = G * T
    return rows / (-(-rows // tile_rows) * tile_rows)
