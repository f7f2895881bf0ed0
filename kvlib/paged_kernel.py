"""Fused paged decode attention on the CPU: one compiled loop reads K/V through the block table.

`kvlib.paged.paged_attention(method="gather")` copies every sequence's blocks into a contiguous
(B, K, S, D) tensor and then runs ordinary attention, so it moves the cache three times (read,
write, read again). PyTorch has no operator that multiplies through an index, so any pure-PyTorch
paged attention either copies or loops over blocks in Python. This module does what vLLM's
kernel does, on the CPU, in a loop compiled by Numba: for each (sequence b, kv head h) it walks
the sequence's block table and reads every block where it lies in the pool. Nothing is copied;
the cache is read once, as contiguous attention reads it.

The G query heads of kv head h and the T query tokens make G*T rows, r = g*T + t:

    pass 1  for each block j:  blk = block_tables[b, j]
                s[r, j*P + p] = scale * q[r] . k_pool[blk, h, p]        (G*T, S) scores
    softmax causal mask (query t sits at slot S - T + t), max, exp, sum   fp32, in cache
    pass 2  for each block j:  acc[r] += s[r, j*P + p] * v_pool[blk, h, p]
    out[r] = acc[r] / sum[r]

Two passes rather than an online softmax: the (G*T, S) scores are D times smaller than the
keys and stay in the processor's cache. vLLM's paged kernel does the same (all logits of a
sequence in shared memory, one max, one sum); the GPU kernels of chapter 10 use the online
softmax instead, because there a thread block cannot hold a long sequence's scores. The
exponentials are plain `np.exp`, in fp32.

float32 only: it is the dtype kvlib decodes in on the CPU. Shapes use kvlib's letters:
q (B, H, T, D), one layer's pool (N, K, P, D), block_tables (B, M), seq_lens (B,).
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from kvlib.errors import KVCacheError, KVLibTypeError

# Fast-math flags that let the dot products and sums vectorize (reassociation, fused multiply-add);
# "no NaNs" and "no infinities" stay off, so a NaN in the cache still shows in the output.
_FASTMATH = {"reassoc", "contract", "nsz", "arcp", "afn"}

# Numba's own thread pool, not its OpenMP one: torch reads the OpenMP thread count, and starting
# Numba's OpenMP pool would reset it behind torch's back (and with it torch's summation order).
numba.config.THREADING_LAYER = "workqueue"


@numba.njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _paged_decode(q, k_pool, v_pool, block_tables, seq_lens, scale, out):  # pragma: no cover
    # q, out (B, K, G, T, D); k_pool, v_pool (N, K, P, D); block_tables (B, M); seq_lens (B,)
    B, K, G, T, D = q.shape
    P = k_pool.shape[2]
    rows = G * T  # (g, t) pairs, r = g*T + t
    for bh in numba.prange(B * K):  # one (sequence, kv head) per task
        b = bh // K
        h = bh % K
        S = seq_lens[b]
        if S == 0:  # a row with no tokens yet (only padding): nothing to attend to, zeros out
            out[b, h] = 0.0
            continue
        n_blocks = (S + P - 1) // P
        qr = np.empty((rows, D), dtype=np.float32)  # the group's queries, pre-scaled
        for r in range(rows):
            for d in range(D):
                qr[r, d] = q[b, h, r // T, r % T, d] * scale
        s = np.empty((rows, S), dtype=np.float32)  # scores, then softmax weights
        for j in range(n_blocks):  # pass 1: q . k, block by block, in place in the pool
            kb = k_pool[block_tables[b, j], h]  # (P, D) view, no copy
            for p in range(min(P, S - j * P)):
                for r in range(rows):
                    dot = np.float32(0.0)
                    for d in range(D):
                        dot += qr[r, d] * kb[p, d]
                    s[r, j * P + p] = dot
        total = np.zeros(rows, dtype=np.float32)
        for r in range(rows):  # softmax numerators exp(s - max) and their sum, in fp32
            n_seen = S - T + r % T + 1  # causal: query t sits at slot S - T + t
            mx = s[r, :n_seen].max()
            for i in range(n_seen):
                s[r, i] = np.exp(s[r, i] - mx)
                total[r] += s[r, i]
            s[r, n_seen:] = 0.0
        acc = np.zeros((rows, D), dtype=np.float32)
        for j in range(n_blocks):  # pass 2: weights . v, block by block
            vb = v_pool[block_tables[b, j], h]  # (P, D) view, no copy
            for p in range(min(P, S - j * P)):
                for r in range(rows):
                    w = s[r, j * P + p]
                    for d in range(D):
                        acc[r, d] += w * vb[p, d]
        for r in range(rows):
            for d in range(D):
                out[b, h, r // T, r % T, d] = acc[r, d] / total[r]


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
    only the compiled loop needs: float32 tensors on the CPU. Runs on as many threads as torch
    (Numba's pool, sized to match).
    A row with seq_lens[b] == 0 gets zeros, as `kvlib.attention` gives a query that sees nothing.
    """
    for name, x in (("q", q), ("k_pool", k_pool), ("v_pool", v_pool)):
        if x.device.type != "cpu":
            raise KVCacheError(
                f"the fused paged kernel runs on the CPU; {name} is on {x.device} "
                "(on a GPU, see kvlib.gpu.kernels.paged_decode_attention)"
            )
        if x.dtype != torch.float32:
            raise KVLibTypeError(
                f"the fused paged kernel takes float32, got {name} in {x.dtype}; "
                "method='gather' takes any floating dtype"
            )
    B, H, T, D = q.shape
    K = k_pool.shape[1]
    qg = q.detach().reshape(B, K, H // K, T, D).contiguous()  # (B, K, G, T, D)
    out = torch.empty_like(qg)  # (B, K, G, T, D)
    numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    _paged_decode(
        qg.numpy(),
        k_pool.detach().contiguous().numpy(),
        v_pool.detach().contiguous().numpy(),
        block_tables.detach().to(torch.int64).contiguous().numpy(),
        seq_lens.detach().to(torch.int64).contiguous().numpy(),
        np.float32(scale),
        out.numpy(),
    )
    return out.reshape(B, H, T, D)  # (B, H, T, D)
