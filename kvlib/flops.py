"""Counting the arithmetic of a decoder forward pass, to see what a KV cache saves.

A matrix product of (m, n) by (n, p) costs 2*m*n*p FLOPs (one multiply and one add each). For a
forward pass over T new tokens attending to S keys (S >= T), per layer:

    q, k, v projections   2 * T * C * (H + 2K) * D
    scores q k^T          2 * T * S * H * D
    weights @ v           2 * T * S * H * D
    output projection     2 * T * H * D * C
    SwiGLU MLP            2 * T * 3 * C * F        (F = ffn_dim)

plus the output head, 2 * T * C * V. Norms, RoPE and softmax are O(T * C) and left out.
"""

from __future__ import annotations

from kvlib.config import ModelConfig
from kvlib.errors import KVLibValueError


def forward_flops(config: ModelConfig, T: int, S: int | None = None) -> int:
    """FLOPs of one forward pass: T new tokens attending to S keys (S = T without a cache)."""
    S = T if S is None else S
    if T < 1 or S < T:
        raise KVLibValueError(f"need 1 <= T <= S, got T={T}, S={S}")
    c, d, h, k = config.dim, config.head_dim, config.n_heads, config.n_kv_heads
    per_layer = (
        2 * T * c * (h + 2 * k) * d  # q, k, v projections
        + 2 * 2 * T * S * h * d  # scores and weighted sum
        + 2 * T * h * d * c  # output projection
        + 2 * T * 3 * c * config.ffn_dim  # SwiGLU MLP
    )
    return config.n_layers * per_layer + 2 * T * c * config.vocab_size


def generation_flops(config: ModelConfig, prompt_len: int, new_tokens: int, cached: bool) -> int:
    """FLOPs to generate `new_tokens` after a prompt, with or without a KV cache.

    Without a cache, step i runs the model over all prompt_len + i tokens again. With a cache, the
    prompt runs once (prefill) and each step runs one token against everything cached (decode).
    """
    if prompt_len < 1 or new_tokens < 1:
        raise KVLibValueError(
            f"need prompt_len >= 1 and new_tokens >= 1, got {prompt_len}, {new_tokens}"
        )
    if not cached:
        return sum(forward_flops(config, prompt_len + i) for i in range(new_tokens))
    prefill = forward_flops(config, prompt_len)
    decode = sum(forward_flops(config, 1, prompt_len + i) for i in range(1, new_tokens))
    return prefill + decode
