"""Fused paged decode attention on the CPU: one compiled loop reads K/V through the block table.

`kvlib.paged.paged_attention(method="gather")` copies every sequence's blocks into a contiguous
(B, K, S, D) tensor and then runs ordinary attention, so it moves the cache three times (read,
write, read again). PyTorch has no operator that multiplies through an index, so any pure-PyTorch
paged attention either copies or loops over blocks in Python. This module does what vLLM's
kernel does, on the CPU, in a loop compiled by Numba: for each (sequence b, kv head h) it walks
the sequence's block table and reads every block where it lies in the pool. Nothing is copied;
the cache is read once, as contiguous attention reads it.

The G query heads of kv head h and the T query tokens make R = G*T rows, r = g*T + t:

    pass 1  for each block j:  blk = block_tables[b, j]
                s[r, j*P + p] = scale * q[r] . k_pool[blk, h, p]        (R, S) scores
    softmax causal mask (query t sits at slot S - T + t), max, exp, sum   fp32, in cache
    pass 2  for each block j:  acc[r] += s[r, j*P + p] * v_pool[blk, h, p]
    out[r] = acc[r] / sum[r]

Two passes rather than an online softmax: the (R, S) scores are D times smaller than the
keys and stay in the processor's cache, and one long exp loop vectorizes where a short one per
block does not. The GPU kernels of chapter 10 use the online softmax instead, because there a
thread block cannot hold a long sequence's scores.

Numba's exp is a scalar libm call, which the vectorizer cannot widen. `_softmax_numerator`
computes exp itself from what the vectorizer can widen: x = n ln 2 + r with n an integer and
r in (-ln 2, 0] (Cody-Waite reduction), exp(r) from a degree-7 polynomial fit at import, and
2^n written straight into a float's exponent bits. It agrees with exp to a few fp32 ulp.

float32 only: it is the dtype kvlib decodes in on the CPU. Shapes use kvlib's letters:
q (B, H, T, D), one layer's pool (N, K, P, D), block_tables (B, M), seq_lens (B,).
"""

from __future__ import annotations

import numba
import numpy as np
import torch

# Every fast-math flag except "no NaNs" and "no infinities": masked scores are -inf and must
# stay -inf; reassociation lets the reductions vectorize.
_FASTMATH = {"reassoc", "contract", "nsz", "arcp", "afn"}
_LOG2E = np.float32(1.0 / np.log(2.0))
_LN2_HI = np.float32(0.693145751953125)  # ln 2 = HI + LO; HI has 16 significant bits, so
_LN2_LO = np.float32(1.4286068203094172e-06)  # n * HI is exact for |n| <= 127 (Cody-Waite)
_X_MIN = np.float32(-127.0 * np.log(2.0))  # exp of anything lower is below fp32's normal range
_NODES = 0.36 * np.cos(np.pi * (np.arange(64) + 0.5) / 64) - 0.345  # Chebyshev, [-0.705, 0.015]
_EXP_POLY = np.polynomial.polynomial.polyfit(_NODES, np.exp(_NODES), 7)[::-1].astype(np.float32)
"""exp(r) for r in (-ln 2, 0] (with a margin), highest power first (Horner order)."""


@numba.njit(inline="always", fastmath=_FASTMATH)
def _softmax_numerator(x, bits):  # pragma: no cover - compiled
    """x (S,) fp32 -> exp(x - max x) in place; returns the sum. bits: (S,) int32 scratch."""
    S = x.shape[0]
    two_n = bits.view(np.float32)  # the same memory read as floats: 2^n
    mx = x[0]
    for i in range(1, S):
        mx = max(mx, x[i])
    for i in range(S):
        z = max(x[i] - mx, _X_MIN)  # exp(z) = 2^n * exp(r); -inf -> _X_MIN
        n = int(z * _LOG2E)  # rounds toward zero: n in [-127, 0]
        r = (z - n * _LN2_HI) - n * _LN2_LO  # r in (-ln 2, 0], exact up to the last term
        p = _EXP_POLY[0]
        for c in range(1, _EXP_POLY.shape[0]):
            p = p * r + _EXP_POLY[c]
        x[i] = p
        bits[i] = (n + 127) << 23  # fp32 exponent field of 2^n; n = -127 gives 0.0 exactly
    total = np.float32(0.0)
    for i in range(S):
        x[i] *= two_n[i]
        total += x[i]
    return total


@numba.njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _paged_decode(q, k_pool, v_pool, block_tables, seq_lens, scale, out):  # pragma: no cover
    # q, out (B, K, G, T, D); k_pool, v_pool (N, K, P, D); block_tables (B, M); seq_lens (B,)
    B, K, G, T, D = q.shape
    P = k_pool.shape[2]
    R = G * T
    for bh in numba.prange(B * K):  # one (sequence, kv head) per task
        b = bh // K
        h = bh % K
        S = seq_lens[b]
        if S == 0:  # a row with no tokens yet (only padding): nothing to attend to, zeros out
            out[b, h] = 0.0
            continue
        n_blocks = (S + P - 1) // P
        qr = np.empty((R, D), dtype=np.float32)  # the group's queries, pre-scaled
        for r in range(R):
            for d in range(D):
                qr[r, d] = q[b, h, r // T, r % T, d] * scale
        s = np.empty((R, S), dtype=np.float32)  # scores, then softmax numerators
        bits = np.empty(S, dtype=np.int32)
        for j in range(n_blocks):  # pass 1: q . k, block by block, in place in the pool
            kb = k_pool[block_tables[b, j], h]  # (P, D) view, no copy
            for p in range(min(P, S - j * P)):
                for r in range(R):
                    dot = np.float32(0.0)
                    for d in range(D):
                        dot += qr[r, d] * kb[p, d]
                    s[r, j * P + p] = dot
        total = np.empty(R, dtype=np.float32)
        for r in range(R):
            for i in range(S - T + r % T + 1, S):  # causal: keys after query t's slot
                s[r, i] = -np.inf
            total[r] = _softmax_numerator(s[r], bits)
        acc = np.zeros((R, D), dtype=np.float32)
        for j in range(n_blocks):  # pass 2: weights . v, block by block
            vb = v_pool[block_tables[b, j], h]  # (P, D) view, no copy
            for p in range(min(P, S - j * P)):
                for r in range(R):
                    w = s[r, j * P + p]
                    for d in range(D):
                        acc[r, d] += w * vb[p, d]
        for r in range(R):
            for d in range(D):
                out[b, h, r // T, r % T, d] = acc[r, d] / total[r]


def softmax_numerator(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """exp(x - max x) and its sum for a 1-D fp32 tensor, with the kernel's own exp (for tests)."""
    if not isinstance(x, torch.Tensor) or x.ndim != 1 or x.dtype != torch.float32:
        raise TypeError(f"x must be a 1-D float32 tensor, got {getattr(x, 'dtype', type(x))}")
    if x.numel() == 0:
        raise ValueError("x must not be empty")
    out = x.detach().cpu().clone()
    total = _softmax_numerator_jit(out.numpy(), np.empty(x.numel(), dtype=np.int32))
    return out, float(total)


@numba.njit(fastmath=_FASTMATH, cache=True)
def _softmax_numerator_jit(x, bits):  # pragma: no cover - compiled
    return _softmax_numerator(x, bits)


def paged_attention_fused(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q (B, H, T, D), one layer's pools (N, K, P, D) -> (B, H, T, D), read in place.

    The caller (`kvlib.paged.paged_attention`) validates shapes and block ids; this checks what
    only the compiled loop needs: float32 tensors on the CPU. Runs on as many threads as torch.
    A row with seq_lens[b] == 0 gets zeros, as `kvlib.attention` gives a query that sees nothing.
    """
    for name, x in (("q", q), ("k_pool", k_pool), ("v_pool", v_pool)):
        if x.device.type != "cpu":
            raise ValueError(
                f"the fused paged kernel runs on the CPU; {name} is on {x.device} "
                "(on a GPU, see kvlib.gpu.kernels.paged_decode_attention)"
            )
        if x.dtype != torch.float32:
            raise TypeError(
                f"the fused paged kernel takes float32, got {name} in {x.dtype}; "
                "method='gather' takes any floating dtype"
            )
    B, H, T, D = q.shape
    K = k_pool.shape[1]
    qg = q.detach().reshape(B, K, H // K, T, D).contiguous()  # (B, K, G, T, D)
    out = torch.empty_like(qg)  # (B, K, G, T, D)
    threads = torch.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    _paged_decode(
        qg.numpy(),
        k_pool.detach().contiguous().numpy(),
        v_pool.detach().contiguous().numpy(),
        block_tables.detach().to(torch.int64).contiguous().numpy(),
        seq_lens.detach().to(torch.int64).contiguous().numpy(),
        np.float32(scale),
        out.numpy(),
    )
    if torch.get_num_threads() != threads:
        # Numba's OpenMP pool can set the OpenMP thread count torch reads too; put it back so
        # torch's own kernels (and their float summation order) do not change behind its back
        torch.set_num_threads(threads)
    return out.reshape(B, H, T, D)  # (B, H, T, D)
