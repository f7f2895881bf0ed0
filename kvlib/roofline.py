"""The roofline of one whole decode step: weights plus KV cache, as batch and context grow.

A decode step runs every sequence of a batch of B through the model for one new token. It
reads (one pass over memory each):

    weights   every matrix once, whatever B:      n_matmul_params * bytes per weight
    KV cache  each sequence its own S tokens:     B * S * bytes per token (all layers, K and V)

and computes

    FLOPs     2 * n_matmul_params * B   (each weight: one multiply-add per sequence)
            + 4 * L * H * D * B * S     (scores q k^T and the weighted sum over S keys)

so its time is at least max(bytes / bandwidth, FLOPs / peak). Batching shares one read of
the weights among B sequences: weight bytes per token fall as 1 / B. It never shares KV reads:
every sequence reads its own cache, so KV bytes per token stay S * bytes per token at any B.
At batch 1 and a short context the weights dominate (Llama-3-8B in bf16: 16 GB of weights
against 1 GB of cache at 8k tokens), so a smaller cache changes little; at large B * S the
cache dominates, and there quantizing it shortens the step in proportion to its bytes.

`n_matmul_params` is every parameter a step multiplies by: all but the input embedding, which
is a table lookup of B rows (unless the output head shares it). Norms, RoPE and softmax are
left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlib.config import ModelConfig, dtype_bytes
from kvlib.errors import KVLibTypeError, KVLibValueError, check_int


def matmul_params(config: ModelConfig) -> int:
    """Parameters a decode step multiplies by: all but a lookup-only input embedding."""
    embedding = 0 if config.tie_embeddings else config.vocab_size * config.dim
    return config.n_params - embedding


@dataclass(frozen=True)
class DecodeStep:
    """One decode step of B sequences with S cached tokens each (bytes, FLOPs, seconds)."""

    B: int
    S: int
    weight_bytes: float
    kv_bytes: float
    flops: float
    memory_s: float  # bytes / bandwidth
    compute_s: float  # FLOPs / peak
    time_s: float  # max of the two: the roofline's estimate

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.kv_bytes

    @property
    def kv_share(self) -> float:
        """The fraction of the step's bytes that are KV cache."""
        return self.kv_bytes / self.bytes

    @property
    def bound(self) -> str:
        """'memory' or 'compute': which roof the step sits under."""
        return "memory" if self.memory_s >= self.compute_s else "compute"

    @property
    def tokens_per_s(self) -> float:
        """Tokens the batch produces per second at this step time (B per step)."""
        return self.B / self.time_s


def decode_step(
    config: ModelConfig,
    B: int,
    S: int,
    *,
    bandwidth: float,
    peak_flops: float,
    weight_dtype: torch.dtype = torch.bfloat16,
    kv_bytes_per_token: float | None = None,
) -> DecodeStep:
    """The roofline estimate of one decode step (see the module docstring).

    bandwidth: bytes/s; peak_flops: FLOP/s; kv_bytes_per_token: bytes of one token's K and V
    over all layers (default: the config's at `weight_dtype`; a quantized cache passes its
    scheme's, e.g. `QuantScheme.bytes_per_token`).
    """
    if not isinstance(config, ModelConfig):
        raise KVLibTypeError(f"config must be a ModelConfig, got {type(config).__name__}")
    check_int("B", B)
    check_int("S", S, 0)
    for name, x in (("bandwidth", bandwidth), ("peak_flops", peak_flops)):
        if not isinstance(x, (int, float)) or isinstance(x, bool) or not x > 0:
            raise KVLibValueError(f"{name} must be a positive number, got {x!r}")
    if kv_bytes_per_token is None:
        kv_bytes_per_token = config.kv_bytes_per_token(weight_dtype)
    if not isinstance(kv_bytes_per_token, (int, float)) or kv_bytes_per_token < 0:
        raise KVLibValueError(
            f"kv_bytes_per_token must be a number >= 0, got {kv_bytes_per_token!r}"
        )
    P = matmul_params(config)
    weight_bytes = P * dtype_bytes(weight_dtype)
    kv_bytes = B * S * kv_bytes_per_token
    attn_flops = 4 * config.n_layers * config.n_heads * config.head_dim * B * S
    flops = 2 * P * B + attn_flops
    memory_s = (weight_bytes + kv_bytes) / bandwidth
    compute_s = flops / peak_flops
    return DecodeStep(
        B, S, weight_bytes, kv_bytes, flops, memory_s, compute_s, max(memory_s, compute_s)
    )


def bytes_per_token(step: DecodeStep) -> tuple[float, float]:
    """(weight bytes, KV bytes) read per generated token: weights / B, KV per sequence."""
    return step.weight_bytes / step.B, step.kv_bytes / step.B


def kv_dominates_from(
    config: ModelConfig,
    B: int,
    *,
    weight_dtype: torch.dtype = torch.bfloat16,
    kv_bytes_per_token: float | None = None,
) -> float:
    """The context S at which a batch of B reads as many KV bytes as weight bytes."""
    check_int("B", B)
    if kv_bytes_per_token is None:
        kv_bytes_per_token = config.kv_bytes_per_token(weight_dtype)
    return matmul_params(config) * dtype_bytes(weight_dtype) / (B * kv_bytes_per_token)
