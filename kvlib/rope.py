"""Rotary position embeddings (RoPE, Su et al. 2024) in the Llama / Hugging Face layout.

Channel pair (i, i + D/2) of a query or key at position p turns by the angle p * theta^(-2i/D)
("rotate_half" layout, so Hugging Face Llama weights load without any permutation; Meta's
original code pairs adjacent channels instead). The angles are computed in fp32 whatever the
model's dtype.

Shapes:
    positions: (...) integer   cos, sin: (..., D) fp32
    x: (B, heads, T, D)        cos, sin broadcast to x, in x's dtype
"""

from __future__ import annotations

import torch

from kvlib.errors import KVLibValueError


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (..., D) fp32, of the RoPE angles of integer `positions` (...).

    Channel pair (i, i + D/2) rotates at frequency theta^(-2i/D): the "rotate_half" layout of
    Hugging Face's Llama. Computed in fp32 whatever the model's dtype, then cast by the caller.
    """
    if head_dim % 2:
        raise KVLibValueError(f"head_dim must be even for RoPE, got {head_dim}")
    device = positions.device
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    )  # (D/2,)
    freqs = positions.to(torch.float32)[..., None] * inv_freq  # (..., D/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (..., D)
    return emb.cos(), emb.sin()


def rope_tables(
    head_dim: int,
    max_seq_len: int,
    theta: float = 10000.0,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (max_seq_len, D) fp32, for positions 0 .. max_seq_len - 1."""
    return rope_cos_sin(torch.arange(max_seq_len, device=device), head_dim, theta)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last axis."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, T, D) by the angles of its positions; cos, sin broadcast to x.

    cos and sin come in x's dtype (the model computes them in fp32 once per forward pass).
    """
    return x * cos + rotate_half(x) * sin
