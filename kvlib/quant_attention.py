"""Decode attention over a history read one chunk at a time: the fused read of a quantized cache.

A quantized cache holds codes and scales, not numbers. Dequantizing the whole history into a
new fp32 tensor at every step (what `update` returns) reads the codes once and then writes and
reads 4 bytes per number: more memory traffic than an fp32 cache, so a slower step. The fused
read takes the history a chunk of C tokens at a time: the chunk's codes are dequantized into
fp32 (C tokens, small enough to stay in the processor's cache), its scores and weighted values
are computed, and the chunks are combined with the online softmax (Milakov & Gimelshein 2018):

    for each chunk c of keys/values:   s_c = scale * q k_c^T            (fp32 scores)
        m_c = max(m_{c-1}, max(s_c))                                     running max
        l_c = l_{c-1} * exp(m_{c-1} - m_c) + sum(exp(s_c - m_c))        running sum
        o_c = o_{c-1} * exp(m_{c-1} - m_c) + exp(s_c - m_c) @ v_c       running output
    out = o_last / l_last

No fp32 copy of the history ever exists; the codes are read once, where they lie. A cache
supplies the chunks through `read(a, b)` functions returning its keys or values of slots
[a, b) as a `Chunk`: numbers x * scale + zero, x fp32 (B, K, b - a, D). The quantized cache
dequantizes codes there, or hands back its full-precision residual (KIVI's recent tokens), in
the same pass. `chunk_bounds` lists where chunks start and end.

When a scale and zero point are shared by a whole token (or a whole head), they factor out of
both dot products, so the chunk's codes need only a conversion to fp32, not a dequantization:

    q . (c_s * scale_s + zero_s)         = scale_s * (q . c_s) + zero_s * sum(q)
    sum_s p_s (c_s * scale_s + zero_s)   = sum_s (p_s * scale_s) c_s + sum_s p_s zero_s

(for symmetric codes, zero_s = -2**(bits-1) * scale_s). The scores and weights are D times
smaller than the chunk, so this saves two passes over every chunk.

`reference_chunked_attention` is the slow path beside it: read everything, then
`kvlib.attention.grouped_attention`.

Shapes: q (B, H, T, D), keys and values (B, K, S, D), mask broadcastable to (B, H, T, S),
out (B, H, T, D). Query head h reads kv head h // G (G = H // K).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvlib.attention import grouped_attention
from kvlib.errors import KVLibValueError, check_int
from kvlib.online_softmax import online_softmax_result, online_softmax_step

DEFAULT_CHUNK = 1024  # tokens dequantized at a time: K * D fp32 numbers each, in the CPU's cache


@dataclass(frozen=True)
class Chunk:
    """Keys or values of n slots: the numbers x * scale + zero.

    x: fp32 (B, K, n, D); scale, zero: None (x are the numbers) or fp32 broadcastable to
    (B, K, n, 1): one per token ((B, K, n, 1)) or per head ((1, K, 1, 1)).
    """

    x: torch.Tensor
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None

    def numbers(self) -> torch.Tensor:
        """The fp32 (B, K, n, D) numbers (the reference path's dequantization)."""
        x = self.x if self.scale is None else self.x * self.scale
        return x if self.zero is None else x + self.zero

    def scores(self, qg: torch.Tensor) -> torch.Tensor:
        """qg (B, K, R, D) -> fp32 (B, K, R, n): qg . numbers, with the scale factored out."""
        s = qg @ self.x.transpose(-1, -2)  # (B, K, R, n)
        if self.scale is not None:
            s = s * self.scale.transpose(-1, -2)  # (B|1, K, 1, n|1)
        if self.zero is not None:
            s = s + qg.sum(-1, keepdim=True) * self.zero.transpose(-1, -2)  # (B, K, R, n)
        return s

    def weighted_sum(self, p: torch.Tensor) -> torch.Tensor:
        """p (B, K, R, n) -> (B, K, R, D): p @ numbers, with the scale factored out."""
        pw = p if self.scale is None else p * self.scale.transpose(-1, -2)  # (B, K, R, n)
        out = pw @ self.x  # (B, K, R, D)
        if self.zero is not None:
            zero = self.zero.expand(*self.x.shape[:-1], 1)  # (B, K, n, 1)
            out = out + p @ zero  # (B, K, R, 1) broadcast over D
        return out


Reader = Callable[[int, int], Chunk]  # read(a, b): keys or values of slots [a, b)


def chunk_bounds(S: int, chunk_size: int, cuts: tuple[int, ...] = (), align: int = 1) -> list[int]:
    """Chunk edges 0 = e_0 < e_1 < ... = S: every `chunk_size` tokens (rounded down to a
    multiple of `align`, at least `align`), plus the extra `cuts` (where storage changes, e.g.
    quantized codes to the full-precision residual)."""
    check_int("S", S, 0)
    check_int("chunk_size", chunk_size)
    check_int("align", align)
    step = max(chunk_size // align * align, align)
    edges = set(range(0, S, step)) | {c for c in cuts if 0 < c < S} | {S}
    return sorted(edges)


def _check_mask(mask: torch.Tensor | None, B: int, H: int, T: int, S: int) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.ndim > 4:
        raise KVLibValueError(
            "mask must be None or a bool tensor of at most 4 dims, got "
            f"{getattr(mask, 'shape', mask)}"
        )
    mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))  # (b, h, t, s)
    if not all(m in (1, n) for m, n in zip(mask.shape, (B, H, T, S), strict=True)):
        raise KVLibValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to (B, H, T, S) = "
            f"({B}, {H}, {T}, {S})"
        )
    return mask


def chunked_attention(
    q: torch.Tensor,
    read_k: Reader,
    read_v: Reader,
    edges: list[int],
    mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """q (B, H, T, D) attending over S = edges[-1] keys read chunk by chunk -> (B, H, T, D).

    Chunk i is slots [edges[i], edges[i+1]); read_k / read_v return them as `Chunk`s.
    Scores, softmax and the weighted sum run in fp32; the output is cast to q's dtype.
    """
    B, H, T, D = q.shape
    S = edges[-1]
    mask = _check_mask(mask, B, H, T, S)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    state = None
    qg = None
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        k = read_k(a, b)  # keys of this chunk only, x: (B, K, n, D)
        if qg is None:
            K = k.x.shape[1]
            G = H // K
            qg = (q.float() * scale).reshape(B, K, G * T, D)  # (B, K, G*T, D) a group's rows
        scores = k.scores(qg)  # (B, K, G*T, n) fp32
        if mask is not None:
            m = mask[..., a:b] if mask.shape[-1] == S else mask  # (b, h, t, n)
            bb, h, t, n = m.shape
            # per-head (b, H, t, n) -> (b, K, G, t, n); shared (b, 1, t, n) -> (b, 1, 1, t, n)
            m = m.reshape(bb, K, G, t, n) if h == H else m[:, :, None]
            scores = scores.reshape(B, K, G, T, b - a).masked_fill(~m, float("-inf"))
            scores = scores.reshape(B, K, G * T, b - a)  # (B, K, G*T, n)
        values = read_v(a, b)
        state = online_softmax_step(
            state, scores, values.weighted_sum if isinstance(values, Chunk) else values
        )
    if state is None:  # S = 0: nothing to attend to
        return torch.zeros_like(q)
    return online_softmax_result(state).reshape(B, H, T, D).to(q.dtype)  # (B, H, T, D)


def reference_chunked_attention(
    q: torch.Tensor,
    read_k: Reader,
    read_v: Reader,
    S: int,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """The reference path: read the whole history (dequantize everything), then attention."""
    k, v = read_k(0, S).numbers(), read_v(0, S).numbers()  # (B, K, S, D) fp32
    return grouped_attention(q.float(), k, v, mask, scale).to(q.dtype)  # (B, H, T, D)
