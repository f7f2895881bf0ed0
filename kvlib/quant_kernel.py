"""Compiled decode attention that reads int8 or FP8 codes where they lie (CPU, Numba).

`kvlib.quant_attention` reads a quantized cache a chunk at a time in plain PyTorch. PyTorch
has no matrix product that takes uint8 codes, so each chunk's codes are first converted into an
fp32 buffer that the product then reads: the quarter of the bytes read from memory comes back
as 4 bytes per number through the core. This module does what vLLM's FP8 kernels and KIVI's
fused kernels do, on the CPU: a compiled loop converts each code to fp32 in a register on its
way into the dot product, so the codes are the only thing read. It is the same algorithm as
the chunked read with one chunk; `kvlib.quant_attention.chunked_attention` is the reference the
tests compare it with.

One decode step (one query per row), codes with one scale (and zero point) per token, or one
scale per kv head (FP8), the number being x = code_value * scale + zero:

    pass 1   s[g, j] = scale_j * (q_g . c_j) + zero_j * sum(q_g)        (B, K, G, S) scores
    softmax  in PyTorch, fp32, over each row's real tokens
    pass 2   out[g] = sum_j (p[g, j] * scale_j) c_j + sum_j p[g, j] zero_j

Both caches are handed over as a pool of blocks (a contiguous cache is a pool of one block per
row): codes (N, K, P, D) uint8, scale and zero (N, K, P) fp32, block_tables (B, M), and per row
the storage slot of its first token, the view slot it appears at, and its number of tokens.
An FP8 code becomes a float32 by placing its bits (see `_kernels`), as `fp8_as_half` does with
float16.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

_FASTMATH = {"reassoc", "contract", "nsz", "arcp", "afn"}  # not "nnan"/"ninf": -inf scores stay


FP8_IN_FP32 = 2.0**-120  # e4m3 bits s eeee mmm placed as float32 s 0000eeee mmm0...: value * this


def _kernels(fp8: bool):
    """The two passes, compiled with the code conversion fixed: an int8 code's value, or an
    FP8 code's e4m3 bits placed in a float32 (s eeee mmm -> sign bit, then the 7 bits at the
    low end of the exponent and the top of the mantissa: the same number times 2**-120, normal
    and subnormal alike, since float32's exponent bias exceeds e4m3's by 120)."""

    @numba.njit(fastmath=_FASTMATH)
    def load(c, x, xbits):  # pragma: no cover - compiled
        # c (>= D,) uint8 codes -> x (D,) fp32 values (FP8: times FP8_IN_FP32); xbits: x's memory
        if fp8:
            for d in range(x.shape[0]):
                u = np.uint32(c[d])
                xbits[d] = ((u & np.uint32(0x80)) << np.uint32(24)) | (
                    (u & np.uint32(0x7F)) << np.uint32(20)
                )
        else:
            for d in range(x.shape[0]):
                x[d] = np.float32(c[d])

    @numba.njit(fastmath=_FASTMATH)
    def scores(q, codes, scale, zero, tables, first, view0, lens, out):  # pragma: no cover
        # q (B, K, G, D) pre-scaled; codes (N, K, P, >= D): the first D bytes of a slot are its
        # codes; scale, zero (N, K, P); out (B, K, G, S)
        B, K, G, D = q.shape
        P = codes.shape[2]
        xbits = np.empty(D, dtype=np.uint32)
        x = xbits.view(np.float32)
        qr = np.empty((G, D), dtype=np.float32)
        qs = np.empty(G, dtype=np.float32)
        for b in range(B):
            for h in range(K):
                for g in range(G):
                    qs[g] = 0.0
                    for d in range(D):
                        qr[g, d] = q[b, h, g, d]
                        qs[g] += q[b, h, g, d]
                for j in range(lens[b]):
                    s = first[b] + j  # storage slot of the row's j-th token
                    blk, off = tables[b, s // P], s % P
                    load(codes[blk, h, off], x, xbits)
                    sc, z = scale[blk, h, off], zero[blk, h, off]
                    for g in range(G):
                        dot = np.float32(0.0)
                        for d in range(D):
                            dot += qr[g, d] * x[d]
                        out[b, h, g, view0[b] + j] = dot * sc + qs[g] * z

    @numba.njit(fastmath=_FASTMATH)
    def weighted(p, codes, scale, zero, tables, first, view0, lens, out):  # pragma: no cover
        # p (B, K, G, S) softmax weights; out (B, K, G, D)
        B, K, G, S = p.shape
        D = out.shape[3]
        P = codes.shape[2]
        xbits = np.empty(D, dtype=np.uint32)
        x = xbits.view(np.float32)
        acc = np.empty((G, D), dtype=np.float32)
        zs = np.empty(G, dtype=np.float32)
        for b in range(B):
            for h in range(K):
                acc[:] = 0.0
                zs[:] = 0.0
                for j in range(lens[b]):
                    s = first[b] + j
                    blk, off = tables[b, s // P], s % P
                    load(codes[blk, h, off], x, xbits)
                    sc, z = scale[blk, h, off], zero[blk, h, off]
                    for g in range(G):
                        w = p[b, h, g, view0[b] + j]
                        ws = w * sc
                        zs[g] += w * z
                        for d in range(D):
                            acc[g, d] += ws * x[d]
                for g in range(G):
                    for d in range(D):
                        out[b, h, g, d] = acc[g, d] + zs[g]

    return scores, weighted


_COMPILED: dict[bool, tuple] = {}


def quant_decode_attention(
    q: torch.Tensor,
    k: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    v: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    block_tables: torch.Tensor,
    first: torch.Tensor,
    view0: torch.Tensor,
    lens: torch.Tensor,
    fp8: bool,
) -> torch.Tensor:
    """q (B, H, 1, D) fp32 -> (B, H, 1, D): attention over each row's lens[b] coded tokens.

    k, v: (codes (N, K, P, E) uint8 whose first D bytes per slot are the codes (E > D: a pool
    that keeps the scales in the slot; contiguous, so the loop reads a slot's codes as one run),
    scale (N, K, P) fp32, zero (N, K, P) fp32, any strides);
    block_tables (B, M); first, view0, lens (B,) int64 (see the module docstring).
    """
    if fp8 not in _COMPILED:
        _COMPILED[fp8] = _kernels(fp8)
    scores_pass, weighted_pass = _COMPILED[fp8]
    B, H, _, D = q.shape
    K = k[0].shape[1]
    G = H // K
    S = int((view0 + lens).max()) if B else 0
    qg = (q.float() * (1.0 / math.sqrt(D))).reshape(B, K, G, D).contiguous()  # (B, K, G, D)
    scores = torch.full((B, K, G, S), float("-inf"), dtype=torch.float32)  # (B, K, G, S)
    args = [block_tables.numpy(), first.numpy(), view0.numpy(), lens.numpy()]
    if fp8:  # the loop's FP8 values are the numbers times FP8_IN_FP32
        k = (k[0], k[1] / FP8_IN_FP32, k[2])
        v = (v[0], v[1] / FP8_IN_FP32, v[2])
    scores_pass(qg.numpy(), *(t.numpy() for t in k), *args, scores.numpy())
    p = torch.softmax(scores, dim=-1).nan_to_num_(0.0)  # (B, K, G, S); a row of no tokens: 0
    out = torch.empty(B, K, G, D, dtype=torch.float32)  # (B, K, G, D)
    weighted_pass(p.numpy(), *(t.numpy() for t in v), *args, out.numpy())
    return out.reshape(B, H, 1, D).to(q.dtype)  # (B, H, 1, D)
