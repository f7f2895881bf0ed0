"""Scaled dot-product attention for a KV cache: reference, grouped (GQA/MQA) and masks.

Shapes:
    q: (B, H, T, D)   T new query tokens
    k, v: (B, K, S, D)   S >= T cached keys and values, the T new ones last
    out: (B, H, T, D)
    masks: bool, True = may attend; any shape broadcastable to (B, H, T, S)

Query head h reads kv head h // G (G = H // K): heads [k*G, (k+1)*G) form group k.

Query token t sits at absolute slot S - T + t, so causal masks are aligned to the
bottom-right corner of the (T, S) score matrix. torch's `is_causal=True` aligns them to the
top-left, which is right only when T == S (no cache): see `causal_mask`.

Softmax runs in fp32 or wider: fp16/bf16 inputs are upcast to fp32, fp32 and fp64 keep their
precision, and the result is cast back to the input dtype. A query row
that may attend to nothing (a padding query) gets all-zero weights and a zero output.
"""

from __future__ import annotations

import math

import torch

from kvlib.errors import KVLibTypeError, KVLibValueError, check_int


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise KVLibTypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise KVLibValueError(
            f"q, k, v must be 4-D (B, H, T, D) / (B, K, S, D); got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise KVLibValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    B, H, T, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise KVLibValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on B or D: "
            "expected k of shape (B, K, S, D) with the B and D of q"
        )
    if k.shape[1] == 0 or H % k.shape[1]:
        raise KVLibValueError(
            f"{H} query heads cannot be grouped over {k.shape[1]} kv heads: "
            "H must be a positive multiple of K"
        )
    if k.shape[2] < T:
        raise KVLibValueError(
            f"{T} queries but only {k.shape[2]} keys: the keys must include the queries (S >= T)"
        )
    if not q.dtype.is_floating_point or not (q.dtype == k.dtype == v.dtype):
        raise KVLibValueError(
            f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not (q.device == k.device == v.device):
        raise KVLibValueError(
            f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}"
        )


def _check_mask(
    mask: torch.Tensor | None, B: int, H: int, T: int, S: int, device: torch.device
) -> torch.Tensor | None:
    """Validate a bool mask and return it as a 4-D (b, h, t, s) view, each dim 1 or full."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise KVLibTypeError(f"mask must be a bool torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise KVLibValueError(f"mask must be bool (True = attend), got {mask.dtype}")
    if mask.ndim > 4:
        raise KVLibValueError(f"mask must have at most 4 dims, got shape {tuple(mask.shape)}")
    if mask.device != device:
        raise KVLibValueError(f"mask is on {mask.device}, q/k/v are on {device}")
    mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))  # (b, h, t, s)
    if not all(m in (1, n) for m, n in zip(mask.shape, (B, H, T, S), strict=True)):
        raise KVLibValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to (B, H, T, S) = "
            f"({B}, {H}, {T}, {S}): each dim must be 1 or the full size"
        )
    return mask


def causal_mask(T: int, S: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(T, S) bool, bottom-right aligned: query t (slot S - T + t) sees slots <= S - T + t."""
    check_int("T", T, low=0)
    check_int("S", S, low=0)
    if S < T:
        raise KVLibValueError(f"causal mask needs 0 <= T <= S, got T={T}, S={S}")
    q_pos = torch.arange(S - T, S, device=device)  # (T,)
    k_pos = torch.arange(S, device=device)  # (S,)
    return k_pos[None, :] <= q_pos[:, None]  # (T, S)


def sliding_window_mask(
    T: int, S: int, window: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(T, S) bool: causal, and each query sees only its `window` most recent slots (itself too)."""
    check_int("window", window)
    causal = causal_mask(T, S, device)  # (T, S), validates T and S
    q_pos = torch.arange(S - T, S, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
    return causal & (k_pos > q_pos - window)  # (T, S)


def real_slots(start: torch.Tensor, S: int) -> torch.Tensor:
    """(B, S) bool: True where slot s of row b holds a real token, i.e. s >= start[b].

    start (B,): the first real slot of each row (its left padding); the one place kvlib turns
    a row's padding into a mask."""
    slots = torch.arange(S, device=start.device)  # (S,)
    return slots[None, :] >= start[:, None]  # (B, S)


def padding_mask(valid: torch.Tensor) -> torch.Tensor:
    """(B, S) bool of real key slots -> (B, 1, 1, S), broadcastable over heads and queries."""
    if not isinstance(valid, torch.Tensor):
        raise KVLibTypeError(
            f"valid must be a (B, S) bool torch.Tensor, got {type(valid).__name__}"
        )
    if valid.ndim != 2 or valid.dtype != torch.bool:
        raise KVLibValueError(
            f"valid must be a (B, S) bool tensor, got {tuple(valid.shape)} {valid.dtype}"
        )
    return valid[:, None, None, :]  # (B, 1, 1, S)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, K, S, D) -> (B, K * n_rep, S, D): each kv head copied for its n_rep query heads.

    This materializes G copies of the cache; `attention` gets the same result without them.
    """
    check_int("n_rep", n_rep)  # the group size G = H // K
    if not isinstance(x, torch.Tensor):
        raise KVLibTypeError(f"repeat_kv expects a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise KVLibValueError(f"repeat_kv expects a 4-D (B, K, S, D) tensor, got {tuple(x.shape)}")
    if n_rep == 1:
        return x
    B, K, S, D = x.shape
    x = x[:, :, None, :, :].expand(B, K, n_rep, S, D)  # (B, K, G, S, D), no copy yet
    return x.reshape(B, K * n_rep, S, D)  # (B, H, S, D), copied here


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype softmax and reductions run in: fp32 for fp16/bf16/fp32, fp64 for fp64."""
    return torch.promote_types(dtype, torch.float32)


def _masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last axis in fp32 or wider. A row with nothing visible gets zero weights."""
    if scores.dtype not in (torch.float32, torch.float64):
        scores = scores.float()
    if mask is None:
        return torch.softmax(scores, dim=-1)
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)  # fully masked rows: exp(-inf)/0 = NaN
    visible = mask.any(dim=-1, keepdim=True)  # (..., T, 1)
    return weights.masked_fill(~visible, 0.0)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Textbook attention: repeat kv heads to H, softmax(q k^T * scale) v, all in fp32 or wider."""
    _check_qkv(q, k, v)
    B, H, T, D = q.shape
    mask = _check_mask(mask, B, H, T, k.shape[2], q.device)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    n_rep = H // k.shape[1]
    acc = _acc_dtype(q.dtype)
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)  # (B, H, S, D)
    scores = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * scale  # (B, H, T, S)
    weights = _masked_softmax(scores, mask)  # (B, H, T, S) fp32 or fp64
    return (weights @ v.to(acc)).to(q.dtype)  # (B, H, T, D)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Grouped attention: the G query heads of a group share one kv head, which is never copied.

    Covers MHA (G = 1), GQA and MQA (K = 1). Matches `reference_attention`. The two matmuls
    run in the input dtype (as in Hugging Face's eager attention); the softmax runs in fp32.
    """
    _check_qkv(q, k, v)
    B, H, T, D = q.shape
    mask = _check_mask(mask, B, H, T, k.shape[2], q.device)
    return grouped_attention(q, k, v, mask, scale)


def grouped_weights(
    q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float | None = None
) -> torch.Tensor:
    """The attention weights (B, K, G, T, S) of q (B, H, T, D) over k (B, K, S, D), in fp32
    (fp64 for fp64 inputs): the G query heads of kv head h stacked as rows, so k is never
    repeated. mask: None or bool, each dim 1 or full, at most 4 dims."""
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    G = H // K
    if mask is not None and mask.ndim < 4:
        mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))  # (b, h, t, s)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qg = q.reshape(B, K, G * T, D)  # (B, K, G*T, D): a group's queries stacked as rows
    scores = qg @ k.transpose(-1, -2)  # (B, K, G*T, S)
    if scores.dtype not in (torch.float32, torch.float64):
        scores = scores.float()  # softmax input in fp32
    scores = scores * scale
    scores = scores.reshape(B, K, G, T, S)  # (B, K, G, T, S)
    if mask is not None:
        b, h, t, s = mask.shape
        # per-head (b, H, t, s) -> (b, K, G, t, s); shared (b, 1, t, s) -> (b, 1, 1, t, s)
        mask = mask.reshape(b, K, G, t, s) if h == H else mask[:, :, None]
    return _masked_softmax(scores, mask)  # (B, K, G, T, S)


def grouped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None = None,
) -> torch.Tensor:
    """`attention` without the input checks: the grouped attention the model's layers and the
    caches run on q, k, v and a mask they built themselves. mask: None or bool, each dim 1 or
    full, at most 4 dims."""
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    weights = grouped_weights(q, k, mask, scale)  # (B, K, G, T, S) fp32 or fp64
    weights = weights.reshape(B, K, H // K * T, S)  # (B, K, G*T, S)
    if weights.dtype != v.dtype:
        weights = weights.to(v.dtype)
    out = weights @ v  # (B, K, G*T, D)
    return out.reshape(B, H, T, D)  # (B, H, T, D)
