"""Paged attention: attention that reads K/V through block tables instead of a contiguous cache.

    q (B, H, T, D); one layer's pools (N, K, P, D); block_tables (B, M); seq_lens (B,)

Three ways to read the pool (`PAGED_METHODS`): "gather" copies each sequence's blocks into a
contiguous (B, K, S, D) tensor and runs ordinary attention (the reference); "blocks" walks the
blocks with an online softmax that never materializes a whole sequence; "fused" is a compiled
loop (`kvlib.paged_kernel`) that reads the blocks in place. Softmax and its running sums are
fp32; the output is cast back to the query dtype.
"""

from __future__ import annotations

import math

import torch

from kvlib.attention import attention
from kvlib.blocks import BlockAllocator, blocks_for
from kvlib.errors import KVLibIndexError, KVLibTypeError, KVLibValueError, check_int
from kvlib.online_softmax import online_softmax_result, online_softmax_step
from kvlib.paged_kernel import paged_attention_fused

PAGED_METHODS = ("gather", "blocks", "fused")  # ways `paged_attention` reads the pool


def _check_paged_args(
    q: torch.Tensor,
    pool: BlockAllocator,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    layer: int,
) -> None:
    if not isinstance(pool, BlockAllocator):
        raise KVLibTypeError(f"pool must be a BlockAllocator, got {type(pool).__name__}")
    check_int("layer", layer, low=None)
    if not 0 <= layer < pool.n_layers:
        raise KVLibIndexError(f"layer must be an int in [0, {pool.n_layers}), got {layer!r}")
    if not isinstance(q, torch.Tensor) or q.ndim != 4:
        raise KVLibValueError(f"q must be a (B, H, T, D) tensor, got {getattr(q, 'shape', q)!r}")
    B, H, T, D = q.shape
    if D != pool.head_dim or H % pool.n_kv_heads:
        raise KVLibValueError(
            f"q has H={H}, D={D}; the pool holds K={pool.n_kv_heads} kv heads of "
            f"D={pool.head_dim} (H must be a multiple of K)"
        )
    if q.dtype != pool.dtype:
        raise KVLibTypeError(f"q has dtype {q.dtype}, the pool holds {pool.dtype}")
    if block_tables.ndim != 2 or block_tables.shape[0] != B or block_tables.dtype.is_floating_point:
        raise KVLibValueError(
            f"block_tables must be an integer (B={B}, M) tensor, got "
            f"{tuple(block_tables.shape)} {block_tables.dtype}"
        )
    if seq_lens.shape != (B,) or seq_lens.dtype.is_floating_point:
        raise KVLibValueError(
            f"seq_lens must be an integer ({B},) tensor, got {tuple(seq_lens.shape)} "
            f"{seq_lens.dtype}"
        )
    lo, hi = seq_lens.aminmax()
    if lo.item() < T:
        raise KVLibValueError(
            f"every sequence must hold its {T} query tokens, got seq_lens={seq_lens.tolist()}"
        )
    P, M = pool.block_size, block_tables.shape[1]
    if hi.item() > M * P:
        raise KVLibValueError(
            f"seq_lens {seq_lens.tolist()} exceed the {M} blocks x {P} slots of block_tables"
        )
    n_blocks = -(-hi.item() // P)  # columns of the table that hold tokens
    needed = torch.arange(n_blocks, device=block_tables.device)[None, :] * P < seq_lens[:, None]
    ids = block_tables[:, :n_blocks]  # (B, n_blocks)
    outside = (ids < 0) | (ids >= pool.num_blocks)
    if bool((outside & needed).any()):
        raise KVLibIndexError(
            f"block_tables name blocks outside [0, {pool.num_blocks}) where tokens are expected"
        )


def _gather_blocks(pool: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """pool (N, K, P, D) of one layer, ids (B, c) block ids -> (B, K, c*P, D), copied once.

    The pool is seen as N*K rows of (P, D) (block n, kv head h is row n*K + h), so one
    index per block and head lays the blocks out straight in the cache layout.
    """
    N, K, P, D = pool.shape
    B, c = ids.shape
    heads = torch.arange(K, device=ids.device)  # (K,)
    rows = (ids[:, None, :] * K + heads[None, :, None]).reshape(-1)  # (B*K*c,) ordered (b, h, j)
    return pool.reshape(N * K, P, D).index_select(0, rows).view(B, K, c * P, D)  # (B, K, c*P, D)


def gather_kv(
    pool: BlockAllocator, block_tables: torch.Tensor, seq_lens: torch.Tensor, layer: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copy each sequence's K/V out of the pool: (B, K, S, D) each, S = max(seq_lens).

    Row b's tokens sit left-aligned in slots [0, seq_lens[b]); also returns the (B, S) bool
    mask of those slots. Positions past a row's length read block 0 and are masked.
    Whole blocks are gathered (one index per block and kv head, not per token), straight
    into the (B, K, S, D) layout.
    """
    B, M = block_tables.shape
    P = pool.block_size
    S = int(seq_lens.max())
    if S > M * P:
        raise KVLibValueError(
            f"seq_lens up to {S} exceed the {M} blocks x {P} slots of block_tables; "
            "expected max(seq_lens) <= M * block_size"
        )
    ids = block_tables.clamp(min=0)  # (B, M), -1 (no block) reads block 0
    k = _gather_blocks(pool.k_pool[layer], ids)[:, :, :S]  # (B, K, S, D)
    v = _gather_blocks(pool.v_pool[layer], ids)[:, :, :S]  # (B, K, S, D)
    r = torch.arange(S, device=block_tables.device)  # (S,)
    valid = r[None, :] < seq_lens[:, None]  # (B, S)
    return k, v, valid


def paged_attention(
    q: torch.Tensor,
    pool: BlockAllocator,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    layer: int,
    *,
    scale: float | None = None,
    method: str = "blocks",
    blocks_per_step: int = 1,
) -> torch.Tensor:
    """Attention of each sequence's last T tokens over its cached K/V, read through block tables.

    q: (B, H, T, D), the queries of tokens [seq_lens[b] - T, seq_lens[b]) of row b, whose
    keys are already in the pool; block_tables: (B, M) ids (-1 past the end); seq_lens: (B,).
    Causal: query t of row b sees positions <= seq_lens[b] - T + t. Returns (B, H, T, D).

    method="gather": copy K/V into (B, K, S, D) and call `kvlib.attention.attention`
    (the reference). method="fused": one compiled CPU loop (`kvlib.paged_kernel`, float32)
    that reads each block where it lies in the pool; nothing is copied. method="blocks":
    visit one block at a time with an online softmax (running max m, running denominator l,
    fp32 accumulator), never holding more than one block of K/V. GQA: the G query heads of a
    kv head share its blocks. blocks_per_step > 1 makes "blocks" visit that many blocks per
    step (fewer, larger steps: less per-step overhead, while each gathered group still fits in
    the processor's cache).
    """
    if method not in PAGED_METHODS:
        raise KVLibValueError(f"method must be one of {PAGED_METHODS}, got {method!r}")
    check_int("blocks_per_step", blocks_per_step)
    _check_paged_args(q, pool, block_tables, seq_lens, layer)
    B, H, T, D = q.shape
    K = pool.n_kv_heads
    G = H // K
    P = pool.block_size
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if method == "fused":
        return paged_attention_fused(
            q, pool.k_pool[layer], pool.v_pool[layer], block_tables, seq_lens, scale
        )
    dev = q.device
    q_pos = seq_lens[:, None] - T + torch.arange(T, device=dev)[None, :]  # (B, T)

    if method == "gather":
        k, v, valid = gather_kv(pool, block_tables, seq_lens, layer)  # (B, K, S, D), (B, S)
        S = k.shape[2]
        if T == 1 and int(seq_lens.min()) == S:
            return attention(q, k, v, None, scale=scale)  # one query per row sees every key
        k_pos = torch.arange(S, device=dev)  # (S,)
        mask = valid[:, None, :] & (k_pos[None, None, :] <= q_pos[:, :, None])  # (B, T, S)
        return attention(q, k, v, mask[:, None], scale=scale)  # (B, H, T, D)

    qg = q.reshape(B, K, G * T, D).float()  # (B, K, G*T, D): rows ordered (g, t)
    q_pos_g = q_pos[:, None, :].expand(B, G, T).reshape(B, 1, G * T, 1)  # (B, 1, G*T, 1)
    state = None  # the online softmax's running (max, sum, output), see kvlib.online_softmax
    k_pool, v_pool = pool.k_pool[layer], pool.v_pool[layer]
    ids_all = block_tables.clamp(min=0)  # (B, M)
    n_blocks = blocks_for(int(seq_lens.max()), P)
    # blocks [0, n_full) hold only keys every query of every row may see: no mask needed
    n_full = max(int(seq_lens.min()) - T + 1, 0) // P
    for j0 in range(0, n_blocks, blocks_per_step):
        j1 = min(j0 + blocks_per_step, n_blocks)
        kb = _gather_blocks(k_pool, ids_all[:, j0:j1]).float()  # (B, K, c*P, D), c = j1 - j0
        vb = _gather_blocks(v_pool, ids_all[:, j0:j1]).float()  # (B, K, c*P, D)
        s = (qg @ kb.transpose(-1, -2)) * scale  # (B, K, G*T, c*P)
        if j1 > n_full:  # a block some query may not see: mask it
            k_pos = j0 * P + torch.arange((j1 - j0) * P, device=dev)  # (c*P,)
            visible = (k_pos[None, :] < seq_lens[:, None])[:, None, None, :] & (
                k_pos[None, None, None, :] <= q_pos_g
            )  # (B, 1, G*T, c*P)
            s = s.masked_fill(~visible, float("-inf"))
        state = online_softmax_step(state, s, vb)
    out = online_softmax_result(state)  # (B, K, G*T, D)
    return out.reshape(B, H, T, D).to(q.dtype)  # (B, H, T, D)
