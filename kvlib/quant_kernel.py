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
This is register blocking, the idea at the heart of every fast matrix product. The second pass
blocks tokens too: it takes two at a time, so each running sum is loaded and stored once for two
tokens' codes.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

_FASTMATH = {"reassoc", "contract", "nsz", "arcp", "afn"}  # not "nnan"/"ninf": -inf scores stay


FP8_IN_FP32 = 2.0**-120  # e4m3 bits s eeee mmm placed as float32 s 0000eeee mmm0...: value * this


@intrinsic
def _bits_as_float32(typingctx, bits):
    """The float32 whose bits are `bits` (a uint32), as C gets it with memcpy: one LLVM bitcast,
    which costs nothing (the bits stay in their register)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


def _kernels(fp8: bool):
    """The two passes, compiled with the code conversion fixed; each code becomes a float32 in a
    register on its way into the sums. An int8 code is cast. An FP8 code's e4m3 bits are placed
    in a float32 (s eeee mmm -> the sign bit, then the 7 bits at the low end of the exponent and
    the top of the mantissa): the same number times 2**-120, normal and subnormal alike, since
    float32's exponent bias exceeds e4m3's by 120. The scales make up the 2**-120. Reading the
    code as a signed byte makes the placing three cheap steps (widen, shift, mask), about as
    fast as int8's cast."""
    unit = np.float32(1.0 / FP8_IN_FP32 if fp8 else 1.0)  # what a code's loop value is worth

    @numba.njit(inline="always")
    def value(c, d):  # pragma: no cover - compiled
        # code d's fp32 value, made in a register: the int8 code cast, or the FP8 bits placed
        if fp8:  # c holds the codes as signed bytes: widening copies the sign into bits 7..31
            v = np.uint32(np.int32(c[d]))  # s...s seeeemmm
            return _bits_as_float32((v << np.uint32(20)) & np.uint32(0x87F00000))  # s0000eeeemmm0..
        return np.float32(c[d])

    @numba.njit(inline="always")
    def group_weights(p, b, h, g0, n, t, real):  # pragma: no cover - compiled
        # the softmax weights of a group's n <= 4 rows at column t; zeros past n, or if not real
        w = np.float32(0.0)
        return (
            p[b, h, g0, t] if real else w,
            p[b, h, g0 + 1, t] if real and n > 1 else w,
            p[b, h, g0 + 2, t] if real and n > 2 else w,
            p[b, h, g0 + 3, t] if real and n > 3 else w,
        )

    @numba.njit(fastmath=_FASTMATH)
    def scores(q, codes, scale, zero, offset, tables, first, view0, lens, out):  # pragma: no cover
        # q (B, K, R, D) pre-scaled, R >= G a multiple of 4 (rows past G are zero); codes
        # (N, K, P, >= D): the first D bytes of a slot are its codes; scale, zero (N, K, P);
        # offset: a number every code is shifted by, x = (c - offset) * scale + zero;
        # out (B, K, G, S): -inf where a row has no token
        B, K, R, D = q.shape
        G = out.shape[2]
        P = codes.shape[2]
        qsum = np.empty((K, R), dtype=np.float32)  # sum(q_g): what a zero point adds to a score
        for b in range(B):
            for h in range(K):
                for g in range(R):
                    qsum[h, g] = q[b, h, g].sum()
            out[b, :, :, : view0[b]] = -np.inf
            out[b, :, :, view0[b] + lens[b] :] = -np.inf
            j = 0
            while j < lens[b]:  # a run of tokens that lie one after another in a block
                s = first[b] + j  # storage slot of the row's j-th token
                blk, off0 = tables[b, s // P], s % P
                run = min(P - off0, lens[b] - j)
                for h in range(K):  # every head of the block, in the order they lie
                    for g0 in range(0, G, 4):  # four query rows share each code's conversion
                        n = min(4, G - g0)  # rows of this group that exist
                        q0, q1 = q[b, h, g0], q[b, h, g0 + 1]
                        q2, q3 = q[b, h, g0 + 2], q[b, h, g0 + 3]
                        for off in range(off0, off0 + run):
                            c = codes[blk, h, off]
                            a0 = a1 = a2 = a3 = np.float32(0.0)
                            if n == 1:  # no grouping: one dot product
                                for d in range(D):
                                    a0 += q0[d] * value(c, d)
                            else:
                                for d in range(D):  # one pass over the codes, four products
                                    xd = value(c, d)
                                    a0 += q0[d] * xd
                                    a1 += q1[d] * xd
                                    a2 += q2[d] * xd
                                    a3 += q3[d] * xd
                            sc, z = scale[blk, h, off] * unit, zero[blk, h, off]
                            dots = (a0, a1, a2, a3)
                            t = view0[b] + j + off - off0  # the token's column in `out`
                            for r in range(n):
                                zq = qsum[h, g0 + r]
                                out[b, h, g0 + r, t] = (dots[r] - offset * zq) * sc + zq * z
                j += run

    @numba.njit(fastmath=_FASTMATH)
    def weighted(
        p, codes, scale, zero, offset, tables, first, view0, lens, out
    ):  # pragma: no cover
        # p (B, K, G, S) softmax weights; out (B, K, G, D); the rest as in `scores`. Each step
        # takes two tokens, so a row's running sums are loaded and stored once for both.
        B, K, G, S = p.shape
        D = out.shape[3]
        P = codes.shape[2]
        R = -(-G // 4) * 4
        acc = np.empty((K, R, D), dtype=np.float32)  # every row's weighted sum of codes
        zs = np.empty((K, R), dtype=np.float32)  # and of zero points
        for b in range(B):
            acc[:] = 0.0
            zs[:] = 0.0
            j = 0
            while j < lens[b]:  # a run of tokens that lie one after another in a block
                s = first[b] + j
                blk, off0 = tables[b, s // P], s % P
                run = min(P - off0, lens[b] - j)
                for h in range(K):  # every head of the block, in the order they lie
                    for g0 in range(0, G, 4):  # four query rows share each code's conversion
                        n = min(4, G - g0)
                        a = acc[h, g0 : g0 + 4]  # (4, D) the group's running sums
                        for i in range(0, run, 2):  # two tokens per step
                            o1 = off0 + i
                            o2 = o1 + 1 if i + 1 < run else o1  # an odd run: the last pair's
                            t = view0[b] + j + i  # second token repeats the first, weightless
                            c1, c2 = codes[blk, h, o1], codes[blk, h, o2]
                            sc1, sc2 = scale[blk, h, o1] * unit, scale[blk, h, o2] * unit
                            z1 = zero[blk, h, o1] - offset * sc1  # the value of code 0
                            z2 = zero[blk, h, o2] - offset * sc2
                            u0, u1, u2, u3 = group_weights(p, b, h, g0, n, t, True)
                            v0, v1, v2, v3 = group_weights(p, b, h, g0, n, t + 1, o2 != o1)
                            zs[h, g0] += u0 * z1 + v0 * z2
                            zs[h, g0 + 1] += u1 * z1 + v1 * z2
                            zs[h, g0 + 2] += u2 * z1 + v2 * z2
                            zs[h, g0 + 3] += u3 * z1 + v3 * z2
                            u0, u1, u2, u3 = u0 * sc1, u1 * sc1, u2 * sc1, u3 * sc1
                            v0, v1, v2, v3 = v0 * sc2, v1 * sc2, v2 * sc2, v3 * sc2
                            if n == 1:  # no grouping: one running sum
                                for d in range(D):
                                    a[0, d] += u0 * value(c1, d) + v0 * value(c2, d)
                            else:
                                for d in range(D):  # one pass over two tokens' codes, four rows
                                    x1, x2 = value(c1, d), value(c2, d)
                                    a[0, d] += u0 * x1 + v0 * x2
                                    a[1, d] += u1 * x1 + v1 * x2
                                    a[2, d] += u2 * x1 + v2 * x2
                                    a[3, d] += u3 * x1 + v3 * x2
                j += run
            for h in range(K):
                for g in range(G):
                    for d in range(D):
                        out[b, h, g, d] = acc[h, g, d] + zs[h, g]

    return scores, weighted


_COMPILED: dict[bool, tuple] = {}


def quant_decode_attention(
    q: torch.Tensor,
    k: tuple[torch.Tensor, torch.Tensor, torch.Tensor, float],
    v: tuple[torch.Tensor, torch.Tensor, torch.Tensor, float],
    block_tables: torch.Tensor,
    first: torch.Tensor,
    view0: torch.Tensor,
    lens: torch.Tensor,
    fp8: bool,
) -> torch.Tensor:
    """q (B, H, 1, D) fp32 -> (B, H, 1, D): attention over each row's lens[b] coded tokens.

    k, v: (codes (N, K, P, E) uint8 whose first D bytes per slot are the codes (E > D: a pool
    that keeps the scales in the slot; contiguous, so the loop reads a slot's codes as one run),
    scale (N, K, P) fp32, zero (N, K, P) fp32, any strides (zeros may be a broadcast 0), and
    offset, the number each code is shifted by: x = (code - offset) * scale + zero, 128 for
    symmetric int8 stored as unsigned bytes);
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
    args = [block_tables.numpy(), first.numpy(), view0.numpy(), lens.numpy()]
    as_codes = torch.int8 if fp8 else torch.uint8  # FP8 codes are read as signed bytes
    k, v = [
        (c.view(as_codes).numpy(), scale.numpy(), zero.numpy(), float(off))
        for c, scale, zero, off in (k, v)
    ]
    scores_pass(qg.numpy(), *k, *args, scores.numpy())
    p = torch.softmax(scores, dim=-1).nan_to_num_(0.0)  # (B, K, G, S); a row of no tokens: 0
    out = torch.empty(B, K, G, D, dtype=torch.float32)  # (B, K, G, D)
    weighted_pass(p.numpy(), *v, *args, out.numpy())
    return out.reshape(B, H, 1, D).to(q.dtype)  # (B, H, 1, D)
