"""KV cache memory at scale: weights, bytes per token, cache size, and what fits on a GPU.

What one token costs, per layer, by attention kind (C model dim, H query heads, K kv heads,
D head dim, L layers, d_c MLA latent width, d_r MLA decoupled-RoPE key width):

    MHA / GQA / MQA   K and V rows: 2 * K * D numbers     (MHA: K = H; MQA: K = 1)
    MLA               one latent c_kv and one RoPE key: d_c + d_r numbers, shared by all heads

A cache of S tokens for B sequences holds B * S * L * (numbers per token per layer) elements,
laid out (B, K, S, D) per layer for K and for V in `kvlib.kv_cache.KVCache`; the formulas here
count exactly what that layout allocates (a test compares them). Variants:

    sliding window W    the cache keeps the last W tokens: S is capped at W
    quantized cache     `KVQuant(bits, group_size, overhead_bytes)`: bits/8 bytes per number plus
                        `overhead_bytes` (scale, zero point) per group of `group_size` numbers
    tensor parallel tp  per GPU: K / tp kv heads; when tp > K each GPU keeps one kv head, so the
                        heads are replicated tp / K times; an MLA latent is replicated on every GPU

Published models and GPUs (`MODELS`, `GPUS`, `get_model`, `get_gpu`) live in `kvlib.registry`;
every function here takes a `ModelConfig` or a registered name. Units: every function returns
bytes or tokens, never GB (GB = 1e9 bytes, GiB = 2**30 bytes, as `kvlib.registry` defines them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from kvlib.config import ModelConfig, dtype_bytes
from kvlib.errors import DoesNotFitError, KVLibTypeError, KVLibValueError, check_int
from kvlib.registry import (
    EXTRAS,
    GB,
    GPU,
    GPUS,
    KB,
    MB,
    MODELS,
    SOURCES,
    TB,
    GiB,
    KiB,
    MiB,
    as_config,
    as_gpu,
    attention_kind,
    extras,
    get_gpu,
    get_model,
)

# The registry's names stay importable from here: chapters write `memory.get_model`, `memory.GPUS`.
__all__ = [
    "EXTRAS", "GB", "GPU", "GPUS", "KB", "MB", "MODELS", "SOURCES", "TB", "GiB", "KiB", "MiB",
    "attention_kind", "extras", "get_gpu", "get_model",
    "KVQuant", "MemoryBudget", "cached_tokens", "format_bytes", "kv_bytes_per_token",
    "kv_cache_bytes", "kv_elements_per_token_per_layer", "kv_heads_per_gpu", "max_batch",
    "max_context", "memory_budget", "n_params", "sliding_window", "weight_bytes",
]  # fmt: skip


# ---- weights -----------------------------------------------------------------------------


def n_params(model: ModelConfig | str) -> int:
    """Parameter count: the published/GPT formula from EXTRAS, else the Llama formula."""
    config = as_config(model)
    published = extras(config).n_params
    return published if published is not None else config.n_params


def weight_bytes(
    model: ModelConfig | str, dtype: torch.dtype = torch.float16, *, tp: int = 1
) -> int:
    """Bytes of weights per GPU: n_params * bytes(dtype) / tp (rounded up).

    Tensor parallelism splits every matrix over tp GPUs; the small norms replicate, which this
    ignores (under 0.01% of a 7B model).
    """
    check_int("tp", tp)
    return -(-n_params(model) * dtype_bytes(dtype) // tp)


# ---- KV cache ----------------------------------------------------------------------------


@dataclass(frozen=True)
class KVQuant:
    """A quantized cache format: `bits` per number, plus `overhead_bytes` per group.

    Each group of `group_size` consecutive numbers of one token's row shares a scale (and a
    zero point): fp16 scale + fp16 zero point is 4 bytes, the default. Bytes per number are
    bits / 8 + overhead_bytes / group_size.

    This counts the bytes of any published format, including ones kvlib does not implement
    (6-bit codes, fp16 scales). kvlib's own quantizer is `kvlib.quant_scheme.QuantScheme`, which
    counts its bytes with `QuantScheme.bytes_per_token`; where the two describe the same format
    they agree (tests/test_memory.py checks it).
    """

    bits: int
    group_size: int
    overhead_bytes: int = 4

    def __post_init__(self) -> None:
        check_int("group_size", self.group_size)
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 32:
            raise KVLibValueError(f"bits must be an int in [1, 32], got {self.bits!r}")
        if not isinstance(self.overhead_bytes, int) or self.overhead_bytes < 0:
            raise KVLibValueError(
                f"overhead_bytes must be an int >= 0, got {self.overhead_bytes!r}"
            )

    def nbytes(self, n_elements: int) -> int:
        """Bytes for one row of `n_elements` numbers (whole groups, whole bytes)."""
        if n_elements % self.group_size:
            raise KVLibValueError(
                f"a row of {n_elements} numbers does not split into groups of {self.group_size}:"
                " pick a group size that divides it"
            )
        if n_elements * self.bits % 8:
            raise KVLibValueError(
                f"{n_elements} numbers at {self.bits} bits is not a whole number of bytes"
            )
        return n_elements * self.bits // 8 + n_elements // self.group_size * self.overhead_bytes


def kv_heads_per_gpu(model: ModelConfig | str, tp: int = 1) -> int:
    """kv heads each of tp GPUs holds: K / tp, or 1 (replicated tp / K times) when tp > K."""
    config = as_config(model)
    check_int("tp", tp)
    k = config.n_kv_heads
    if k % tp and tp % k:
        raise KVLibValueError(
            f"tp={tp} GPUs cannot share {k} kv heads evenly: tp must divide K={k} "
            "or be a multiple of it"
        )
    return max(k // tp, 1)


def kv_elements_per_token_per_layer(model: ModelConfig | str, tp: int = 1) -> int:
    """Numbers one token caches in one layer on one GPU: 2*K*D (K per GPU), or d_c + d_r (MLA).

    An MLA latent is shared by all heads, so tensor parallelism replicates it on every GPU.
    """
    config = as_config(model)
    mla = extras(config).mla
    if mla is not None:
        check_int("tp", tp)
        return mla.elements_per_token_per_layer
    return 2 * kv_heads_per_gpu(config, tp) * config.head_dim


def kv_bytes_per_token(
    config: ModelConfig | str,
    dtype: torch.dtype = torch.float16,
    *,
    quant: KVQuant | None = None,
    tp: int = 1,
) -> int:
    """Bytes of KV cache per token over all layers (per GPU when tp > 1).

    MHA/GQA/MQA: 2 * L * K * D * bytes(dtype); MLA: L * (d_c + d_r) * bytes(dtype). With
    `quant`, each layer's row is stored as `quant` says and `dtype` is ignored.
    """
    config = as_config(config)
    row = kv_elements_per_token_per_layer(config, tp)
    if quant is not None:
        if not isinstance(quant, KVQuant):
            raise KVLibTypeError(f"quant must be a KVQuant, got {type(quant).__name__}")
        return config.n_layers * quant.nbytes(row)
    return config.n_layers * row * dtype_bytes(dtype)


def sliding_window(model: ModelConfig | str) -> int | None:
    """The model's published sliding window (tokens), or None for full attention."""
    return extras(model).sliding_window


Window = int | None | Literal["model"]


def cached_tokens(model: ModelConfig | str, seq_len: int, window: Window = "model") -> int:
    """Tokens the cache holds after `seq_len` tokens: min(seq_len, W) with a sliding window.

    window: "model" = the model's own (see `sliding_window`), None = full attention, or W.
    """
    check_int("seq_len", seq_len, low=0)
    if window == "model":
        window = sliding_window(model)
    if window is None:
        return seq_len
    check_int("window", window)
    return min(seq_len, window)


def kv_cache_bytes(
    model: ModelConfig | str,
    seq_len: int,
    batch: int = 1,
    dtype: torch.dtype = torch.float16,
    *,
    quant: KVQuant | None = None,
    tp: int = 1,
    window: Window = "model",
) -> int:
    """Bytes of KV cache for `batch` sequences of `seq_len` tokens (per GPU when tp > 1)."""
    check_int("batch", batch)
    tokens = cached_tokens(model, seq_len, window)
    return batch * tokens * kv_bytes_per_token(model, dtype, quant=quant, tp=tp)


# ---- what fits on a GPU ------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryBudget:
    """Where one GPU's memory goes, in bytes: weights + reserved + KV cache = memory."""

    memory: int
    weights: int
    reserved: int
    kv: int  # what is left for the KV cache


def memory_budget(
    model: ModelConfig | str,
    gpu: GPU | str,
    *,
    weight_dtype: torch.dtype = torch.float16,
    reserved_bytes: int = 0,
    reserved_fraction: float = 0.0,
    tp: int = 1,
) -> MemoryBudget:
    """Split one GPU's memory; raise DoesNotFitError when weights and reserve exceed it.

    reserved = reserved_bytes + reserved_fraction * memory: activations, the framework, the
    CUDA context, fragmentation. vLLM's default `gpu_memory_utilization=0.9` is
    reserved_fraction=0.1 (its activation profile then comes out of the remaining 90%).
    """
    config, gpu = as_config(model), as_gpu(gpu)
    if not isinstance(reserved_bytes, int) or reserved_bytes < 0:
        raise KVLibValueError(f"reserved_bytes must be an int >= 0, got {reserved_bytes!r}")
    if not 0.0 <= reserved_fraction < 1.0:
        raise KVLibValueError(f"reserved_fraction must be in [0, 1), got {reserved_fraction!r}")
    weights = weight_bytes(config, weight_dtype, tp=tp)
    reserved = reserved_bytes + int(reserved_fraction * gpu.memory_bytes)
    kv = gpu.memory_bytes - weights - reserved
    if kv < 0:
        raise DoesNotFitError(
            f"{config.name or 'model'} does not fit on {gpu.name}: weights {weights / GB:.2f} GB "
            f"+ reserved {reserved / GB:.2f} GB > memory {gpu.memory_bytes / GB:.2f} GB; "
            "use more GPUs (tp), smaller weights or less reserve"
        )
    return MemoryBudget(gpu.memory_bytes, weights, reserved, kv)


def max_context(
    model: ModelConfig | str,
    gpu: GPU | str,
    batch: int = 1,
    dtype: torch.dtype = torch.float16,
    *,
    weight_dtype: torch.dtype | None = None,
    reserved_bytes: int = 0,
    reserved_fraction: float = 0.0,
    quant: KVQuant | None = None,
    tp: int = 1,
    window: Window = "model",
) -> int | float:
    """Longest context (tokens per sequence) whose KV cache fits beside the weights.

    Memory bound only: compare with `config.max_seq_len`, the length the model was trained
    for. Returns `math.inf` when a sliding-window cache fits at every length. Weights use
    `weight_dtype` (default: `dtype`); the cache uses `dtype`, or `quant` when given.
    """
    config = as_config(model)
    check_int("batch", batch)
    budget = memory_budget(
        config,
        gpu,
        weight_dtype=dtype if weight_dtype is None else weight_dtype,
        reserved_bytes=reserved_bytes,
        reserved_fraction=reserved_fraction,
        tp=tp,
    )
    tokens = budget.kv // (batch * kv_bytes_per_token(config, dtype, quant=quant, tp=tp))
    cap = cached_tokens(config, tokens + 1, window)  # < tokens + 1 only under a window
    return math.inf if cap <= tokens else tokens


def max_batch(
    model: ModelConfig | str,
    gpu: GPU | str,
    seq_len: int,
    dtype: torch.dtype = torch.float16,
    *,
    weight_dtype: torch.dtype | None = None,
    reserved_bytes: int = 0,
    reserved_fraction: float = 0.0,
    quant: KVQuant | None = None,
    tp: int = 1,
    window: Window = "model",
) -> int:
    """Most sequences of `seq_len` tokens whose KV caches fit beside the weights (may be 0)."""
    config = as_config(model)
    check_int("seq_len", seq_len)
    budget = memory_budget(
        config,
        gpu,
        weight_dtype=dtype if weight_dtype is None else weight_dtype,
        reserved_bytes=reserved_bytes,
        reserved_fraction=reserved_fraction,
        tp=tp,
    )
    per_sequence = kv_cache_bytes(config, seq_len, 1, dtype, quant=quant, tp=tp, window=window)
    return budget.kv // per_sequence


def format_bytes(n: float) -> str:
    """'1.68 GB (1.56 GiB)': decimal and binary side by side, so units never get mixed up."""
    if n < 0:
        raise KVLibValueError(f"a byte count must be >= 0, got {n}")
    units = ((TB, "TB", 2**40, "TiB"), (GB, "GB", GiB, "GiB"), (MB, "MB", MiB, "MiB"))
    for dec, dec_name, binary, bin_name in (*units, (KB, "KB", KiB, "KiB")):
        if n >= dec:
            return f"{n / dec:.2f} {dec_name} ({n / binary:.2f} {bin_name})"
    return f"{n:.0f} bytes"
