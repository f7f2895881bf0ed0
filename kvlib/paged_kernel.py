"""Fused paged decode attention on the CPU: one compiled loop reads K/V through the block table.

`kvlib.paged.paged_attention(method="gather")` copies every sequence's blocks into a contiguous
(B, K, S, D) tensor and then runs ordinary attention, so it moves the cache three times (read,
write, read again). PyTorch has no operator that multiplies through an index, so any pure-PyTorch
paged attention either copies or loops over blocks in Python. This module does what vLLM's
kernel does, on the CPU, in a loop compiled by Numba: for each (sequence b, kv head h) it walks
the sequence's block table and reads every block where it lies in the pool. Nothing is copied;
the cache is read once, as contiguous attention reads it.

The G query heads of kv head h and the T query tokens make G*T rows, r = g*T + t:

    pass 1 (compiled)  for each block j:  blk = block_tables[b, j]
                           s[r, j*P + p] = scale * q[r] . k_pool[blk, h, p]   (G*T, S) scores
                       a key after query t's slot (S - T + t), or past S, stays -inf
    softmax (torch)    w = softmax(s) over the keys, in fp32
    pass 2 (compiled)  for each block j:  out[r] += w[r, j*P + p] * v_pool[blk, h, p]

Two passes rather than an online softmax: the (G*T, S) scores are D times smaller than the
keys and stay in the processor's cache. vLLM's paged kernel does the same (all logits of a
sequence in shared memory, one max, one sum); the GPU kernels of chapter 10 use the online
softmax instead, because there a thread block cannot hold a long sequence's scores. The
softmax between the passes is torch's own, vectorized, in fp32: only the two reads through the
block table need a compiled loop.

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
def _scores(q, k_pool, block_tables, seq_lens, T, scale, s):  # pragma: no cover - compiled
    # q (B, K, G*T, D); k_pool (N, K, P, D); block_tables (B, M); seq_lens (B,);
    # s (B, K, G*T, S) set to -inf by the caller: only the keys a query may see are written
    B, K, rows, D = q.shape
    P = k_pool.shape[2]
    for bh in numba.prange(B * K):  # one (sequence, kv head) per task
        b = bh // K
        h = bh % K
        S = seq_lens[b]
        for j in range((S + P - 1) // P):  # block by block, in place in the pool
            kb = k_pool[block_tables[b, j], h]  # (P, D) view, no copy
            for p in range(min(P, S - j * P)):
                i = j * P + p  # the key's slot
                for r in range(rows):
                    if i > S - T + r % T:  # causal: query t sits at slot S - T + t
                        continue
                    dot = np.float32(0.0)
                    for d in range(D):
                        dot += q[b, h, r, d] * kb[p, d]
                    s[b, h, r, i] = dot * scale


@numba.njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _weighted_sum(w, v_pool, block_tables, seq_lens, out):  # pragma: no cover - compiled
    # w (B, K, G*T, S) softmax weights; v_pool (N, K, P, D); out (B, K, G*T, D) zeroed
    B, K, rows, _ = w.shape
    P, D = v_pool.shape[2], v_pool.shape[3]
    for bh in numba.prange(B * K):
        b = bh // K
        h = bh % K
        S = seq_lens[b]
        for j in range((S + P - 1) // P):  # block by block, in place in the pool
            vb = v_pool[block_tables[b, j], h]  # (P, D) view, no copy
            for p in range(min(P, S - j * P)):
                for r in range(rows):
                    x = w[b, h, r, j * P + p]
                    for d in range(D):
                        out[b, h, r, d] += x * vb[p, d]


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
    G = H // K
    qg = q.detach().reshape(B, K, G * T, D).contiguous()  # (B, K, G*T, D), rows r = g*T + t
    tables = block_tables.detach().to(torch.int64).contiguous().numpy()
    lens = seq_lens.detach().to(torch.int64).contiguous()
    S = max(int(lens.max()), 1)
    numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    scores = torch.full((B, K, G * T, S), float("-inf"), dtype=torch.float32)  # (B, K, G*T, S)
    k = k_pool.detach().contiguous().numpy()
    _scores(qg.numpy(), k, tables, lens.numpy(), T, np.float32(scale), scores.numpy())
    weights = torch.softmax(scores, dim=-1)  # (B, K, G*T, S) fp32; a row of S = 0 is never read
    out = torch.zeros(B, K, G * T, D, dtype=torch.float32)  # (B, K, G*T, D)
    v = v_pool.detach().contiguous().numpy()
    _weighted_sum(weights.numpy(), v, tables, lens.numpy(), out.numpy())
    return out.reshape(B, H, T, D)  # (B, H, T, D)
