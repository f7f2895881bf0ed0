"""Scaled dot-product attention for a KV cache: reference, grouped (GQA/MQA) and masks.

Shapes:
    q: (B, H, T, D)   T new query tokens
    k, v: (B, K, S, D)   S >= T cached keys and values, the T new ones last
    out: (B, H, T, D)
    masks: bool, True = may attend; any shape broadcastable to (B, H, T, S)

Query token t sits at absolute slot S - T + t, so causal masks are aligned to the
bottom-right corner of the (T, S) score matrix. torch's `is_causal=True` aligns them to the
top-left, which is right only when T == S (no cache): see `causal_mask`.

Softmax runs in fp32 whatever the input dtype, and the result is cast back.
"""

from __future__ import annotations

import math

import torch


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"q, k, v must be 4-D (B, H, T, D) / (B, K, S, D); got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    B, H, T, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on B or D")
    if H % k.shape[1]:
        raise ValueError(f"{H} query heads cannot be grouped over {k.shape[1]} kv heads")
    if k.shape[2] < T:
        raise ValueError(
            f"{T} queries but only {k.shape[2]} keys: the keys must include the queries"
        )


def causal_mask(T: int, S: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(T, S) bool, bottom-right aligned: query t (slot S - T + t) sees slots <= S - T + t."""
    if T < 0 or S < T:
        raise ValueError(f"causal mask needs 0 <= T <= S, got T={T}, S={S}")
    q_pos = torch.arange(S - T, S, device=device)  # (T,)
    k_pos = torch.arange(S, device=device)  # (S,)
    return k_pos[None, :] <= q_pos[:, None]  # (T, S)


def sliding_window_mask(
    T: int, S: int, window: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(T, S) bool: causal, and each query sees only its `window` most recent slots (itself too)."""
    if window <= 0:
        raise ValueError(f"window must be positive, got {window}")
    q_pos = torch.arange(S - T, S, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
    return (k_pos <= q_pos) & (k_pos > q_pos - window)  # (T, S)


def padding_mask(valid: torch.Tensor) -> torch.Tensor:
    """(B, S) bool of real key slots -> (B, 1, 1, S), broadcastable over heads and queries."""
    if valid.ndim != 2 or valid.dtype != torch.bool:
        raise ValueError(
            f"valid must be a (B, S) bool tensor, got {tuple(valid.shape)} {valid.dtype}"
        )
    return valid[:, None, None, :]  # (B, 1, 1, S)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, K, S, D) -> (B, K * n_rep, S, D): each kv head copied for its n_rep query heads."""
    if n_rep == 1:
        return x
    B, K, S, D = x.shape
    x = x[:, :, None, :, :].expand(B, K, n_rep, S, D)  # (B, K, G, S, D)
    return x.reshape(B, K * n_rep, S, D)  # (B, H, S, D)


def _masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last axis in fp32. A row with nothing visible gets all-zero weights."""
    scores = scores.float()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    if mask is not None:
        weights = weights.nan_to_num(0.0)  # fully masked rows (padding queries): 0/0
    return weights


def _check_mask(mask: torch.Tensor | None, B: int, H: int, T: int, S: int) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool (True = attend), got {mask.dtype}")
    if mask.ndim > 4:
        raise ValueError(f"mask must have at most 4 dims, got shape {tuple(mask.shape)}")
    mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))  # (b, h, T, S)
    ok = all(m in (1, n) for m, n in zip(mask.shape, (B, H, T, S), strict=True)) and mask.shape[
        2:
    ] == (T, S)
    if not ok:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to (B, H, T, S) = "
            f"({B}, {H}, {T}, {S}) with full (T, S) trailing dims"
        )
    return mask


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Textbook attention: repeat kv heads to H, softmax(q k^T * scale) v, fp32 softmax."""
    _check_qkv(q, k, v)
    B, H, T, D = q.shape
    mask = _check_mask(mask, B, H, T, k.shape[2])
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    n_rep = H // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)  # (B, H, S, D)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale  # (B, H, T, S)
    weights = _masked_softmax(scores, mask)  # (B, H, T, S) fp32
    return (weights @ v.float()).to(q.dtype)  # (B, H, T, D)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Grouped attention: the G query heads of a group share one kv head, which is never copied.

    Covers MHA (G = 1), GQA and MQA (K = 1). Matches `reference_attention`.
    """
    _check_qkv(q, k, v)
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    G = H // K
    mask = _check_mask(mask, B, H, T, S)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qg = q.reshape(B, K, G * T, D)  # (B, K, G*T, D): a group's queries stacked as rows
    scores = (qg @ k.transpose(-1, -2)).float() * scale  # (B, K, G*T, S)
    scores = scores.reshape(B, K, G, T, S)  # (B, K, G, T, S)
    if mask is not None:
        b, h = mask.shape[:2]
        # (b, h, T, S) -> (b, K, G, T, S) when per head, else (b, 1, 1, T, S)
        mask = mask.reshape(b, K, G, T, S) if h == H else mask[:, :, None]
    weights = _masked_softmax(scores, mask)  # (B, K, G, T, S) fp32
    weights = weights.reshape(B, K, G * T, S).to(v.dtype)  # (B, K, G*T, S)
    out = weights @ v  # (B, K, G*T, D)
    return out.reshape(B, H, T, D)  # (B, H, T, D)
