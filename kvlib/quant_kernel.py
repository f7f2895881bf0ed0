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
An int8 code's value is the code as a float32; an FP8 code becomes a float32 by placing its
bits (see `_kernels`), as `fp8_as_half` does with float16.

Each pass handles four query rows of a kv head at once (a GQA group; the rows are padded to a
multiple of four): a token's codes are read and converted once and feed four dot products, or
four running sums, so the loop does four multiply-adds per code it converts instead of one.
This is register blocking, the idea at the heart of every fast matrix product.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

_FASTMATH = {"reassoc", "contract", "nsz", "arcp", "afn"}  # not "nnan"/"ninf": -inf scores stay


FP8_IN_FP32 = 2.0**-120  # e4m3 bits s eeee mmm placed as float32 s 0000eeee mmm0...: value * this


def _kernels(fp8: bool):
    """The two passes, compiled with the code conversion fixed. An int8 code's value is the code
    as a float32, converted in a register on its way into the sums. An FP8 code's e4m3 bits are
    first placed in a float32 (s eeee mmm -> the sign bit, then the 7 bits at the low end of the
    exponent and the top of the mantissa: the same number times 2**-120, normal and subnormal
    alike, since float32's exponent bias exceeds e4m3's by 120), a token's D codes at a time,
    into a small buffer that stays in the L1 cache."""

    @numba.njit(inline="always")
    def place(c, xbits):  # pragma: no cover - compiled
        # FP8 only: c (>= D,) uint8 e4m3 codes -> xbits (D,) their bits as float32 (* 2**-120)
        if fp8:
            for d in range(xbits.shape[0]):
                u = np.uint32(c[d])
                xbits[d] = ((u & np.uint32(0x80)) << np.uint32(24)) | (
                    (u & np.uint32(0x7F)) << np.uint32(20)
                )

    @numba.njit(inline="always")
    def value(c, x, d):  # pragma: no cover - compiled
        # code d's fp32 value: the placed FP8 number, or the int8 code cast in a register
        if fp8:
            return x[d]
        return np.float32(c[d])

    @numba.njit(fastmath=_FASTMATH)
    def scores(q, codes, scale, zero, tables, first, view0, lens, out):  # pragma: no cover
        # q (B, K, R, D) pre-scaled, R >= G a multiple of 4 (rows past G are zero); codes
        # (N, K, P, >= D): the first D bytes of a slot are its codes; scale, zero (N, K, P);
        # out (B, K, G, S): -inf where a row has no token
        B, K, _, D = q.shape
        G = out.shape[2]
        P = codes.shape[2]
        xbits = np.empty(D, dtype=np.uint32)
        x = xbits.view(np.float32)
        for b in range(B):
            for h in range(K):
                for g0 in range(0, G, 4):  # four query rows share each code's conversion
                    n = min(4, G - g0)  # rows of this group that exist
                    q0, q1, q2, q3 = q[b, h, g0], q[b, h, g0 + 1], q[b, h, g0 + 2], q[b, h, g0 + 3]
                    zq = (q0.sum(), q1.sum(), q2.sum(), q3.sum())
                    out[b, h, g0 : g0 + n, : view0[b]] = -np.inf
                    out[b, h, g0 : g0 + n, view0[b] + lens[b] :] = -np.inf
                    j = 0
                    while j < lens[b]:  # a run of tokens that lie one after another in a block
                        s = first[b] + j  # storage slot of the row's j-th token
                        blk, off0 = tables[b, s // P], s % P
                        run = min(P - off0, lens[b] - j)
                        for off in range(off0, off0 + run):
                            c = codes[blk, h, off]
                            place(c, xbits)
                            a0 = a1 = a2 = a3 = np.float32(0.0)
                            if n == 1:  # no grouping: one dot product
                                for d in range(D):
                                    a0 += q0[d] * value(c, x, d)
                            else:
                                for d in range(D):  # one pass over the codes, four products
                                    xd = value(c, x, d)
                                    a0 += q0[d] * xd
                                    a1 += q1[d] * xd
                                    a2 += q2[d] * xd
                                    a3 += q3[d] * xd
                            sc, z = scale[blk, h, off], zero[blk, h, off]
                            dots = (a0, a1, a2, a3)
                            t = view0[b] + j + off - off0  # the token's column in `out`
                            for r in range(n):
                                out[b, h, g0 + r, t] = dots[r] * sc + zq[r] * z
                        j += run

    @numba.njit(fastmath=_FASTMATH)
    def weighted(p, codes, scale, zero, tables, first, view0, lens, out):  # pragma: no cover
        # p (B, K, G, S) softmax weights; out (B, K, G, D)
        B, K, G, S = p.shape
        D = out.shape[3]
        P = codes.shape[2]
        xbits = np.empty(D, dtype=np.uint32)
        x = xbits.view(np.float32)
        acc = np.empty((4, D), dtype=np.float32)  # four rows' weighted sums of codes
        for b in range(B):
            for h in range(K):
                for g0 in range(0, G, 4):  # four query rows share each code's conversion
                    n = min(4, G - g0)
                    acc[:] = 0.0
                    z0 = z1 = z2 = z3 = np.float32(0.0)  # the rows' weighted zero points
                    j = 0
                    while j < lens[b]:  # a run of tokens that lie one after another in a block
                        s = first[b] + j
                        blk, off0 = tables[b, s // P], s % P
                        run = min(P - off0, lens[b] - j)
                        for off in range(off0, off0 + run):
                            c = codes[blk, h, off]
                            place(c, xbits)
                            sc, z = scale[blk, h, off], zero[blk, h, off]
                            t = view0[b] + j + off - off0
                            w0 = p[b, h, g0, t]
                            w1 = p[b, h, g0 + 1, t] if n > 1 else np.float32(0.0)
                            w2 = p[b, h, g0 + 2, t] if n > 2 else np.float32(0.0)
                            w3 = p[b, h, g0 + 3, t] if n > 3 else np.float32(0.0)
                            z0 += w0 * z
                            z1 += w1 * z
                            z2 += w2 * z
                            z3 += w3 * z
                            w0, w1, w2, w3 = w0 * sc, w1 * sc, w2 * sc, w3 * sc
                            if n == 1:  # no grouping: one running sum
                                for d in range(D):
                                    acc[0, d] += w0 * value(c, x, d)
                            else:
                                for d in range(D):  # one pass over the codes, four rows
                                    xd = value(c, x, d)
                                    acc[0, d] += w0 * xd
                                    acc[1, d] += w1 * xd
                                    acc[2, d] += w2 * xd
                                    acc[3, d] += w3 * xd
                        j += run
                    zs = (z0, z1, z2, z3)
                    for r in range(n):
                        for d in range(D):
                            out[b, h, g0 + r, d] = acc[r, d] + zs[r]

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
    R = -(-G // 4) * 4  # query rows rounded up to the loops' groups of four
    qg = torch.zeros(B, K, R, D, dtype=torch.float32)  # (B, K, R, D), rows past G stay zero
    qg[:, :, :G] = q.float().reshape(B, K, G, D) * (1.0 / math.sqrt(D))
    scores = torch.empty(B, K, G, S, dtype=torch.float32)  # (B, K, G, S)
    if fp8:  # the loop's FP8 values are the numbers times FP8_IN_FP32
        k = (k[0], k[1] / FP8_IN_FP32, k[2])
        v = (v[0], v[1] / FP8_IN_FP32, v[2])
    args = [block_tables.numpy(), first.numpy(), view0.numpy(), lens.numpy()]
    scores_pass(qg.numpy(), *(t.numpy() for t in k), *args, scores.numpy())
    p = torch.softmax(scores, dim=-1).nan_to_num_(0.0)  # (B, K, G, S); a row of no tokens: 0
    out = torch.empty(B, K, G, D, dtype=torch.float32)  # (B, K, G, D)
    weighted_pass(p.numpy(), *(t.numpy() for t in v), *args, out.numpy())
    return out.reshape(B, H, 1, D).to(q.dtype)  # (B, H, 1, D)
