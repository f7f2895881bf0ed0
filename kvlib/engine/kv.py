"""The engine's K/V memory, and `StepCache`: the cache of one forward over many requests.

Storage is a `kvlib.paged.BlockAllocator`'s pools, one per layer for K and for V:

    k_pool[layer], v_pool[layer]: (N, K, P, D)

The engine's `BlockPool` decides which block ids each request holds (the allocator's own free
list is not used); this module only reads and writes the tensors.

One engine step packs every scheduled request into one row of new tokens: request r brings
n_r tokens (a chunk of its prompt, or one decode token), so the model runs on tokens (1, T)
with T = sum of n_r. The MLPs and projections see all T tokens at once; attention must not
mix requests. `StepCache` does what the model asks of a cache for such a packed row:

    next_positions   each token's own position in its request (num_computed_r + t)
    attend           store each token's k, v in its request's block, then attend each
                     request's queries over that request's blocks only (causal within it)

Decode tokens (n_r = 1) of all requests are attended in one call, each prefill chunk in one
call of its own, through `kvlib.paged.paged_attention`. Method "gather" copies each request's
blocks out and runs ordinary attention (the reference path). Method "fused" reads the decode
tokens' blocks in place (`kvlib.paged_kernel`, float32 on the CPU), as `PagedKVCache` does; a
chunk of many queries still gathers, where the copy is small next to the chunk's matrix products.
The model's own (1, 1, T, S) mask is not used: the rows are the mask.
"""

from __future__ import annotations

import torch

from kvlib.blocks import BlockAllocator
from kvlib.cache import Cache
from kvlib.errors import KVCacheError, check_int
from kvlib.paged_attention import paged_attention

ATTENTION_METHODS = ("fused", "gather")


def swap_out(pool: BlockAllocator, blocks: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of `blocks` in every layer, in CPU memory: per layer (k, v), each (M, K, P, D)."""
    idx = torch.tensor(blocks, dtype=torch.long, device=pool.device)  # (M,)
    return [
        (pool.k_pool[i][idx].to("cpu", copy=True), pool.v_pool[i][idx].to("cpu", copy=True))
        for i in range(pool.n_layers)
    ]


def swap_in(pool: BlockAllocator, blocks: list[int], saved: list) -> None:
    """Write the copies from `swap_out` into `blocks` (as many as were saved)."""
    idx = torch.tensor(blocks, dtype=torch.long, device=pool.device)  # (M,)
    for i, (k, v) in enumerate(saved):
        pool.k_pool[i][idx] = k.to(pool.device)
        pool.v_pool[i][idx] = v.to(pool.device)


class StepCache(Cache):
    """The cache the model sees during one engine step: several requests packed in one row.

    rows: per request (block_table, num_computed, n_new): its blocks (enough for
    num_computed + n_new tokens), the tokens already in them, and the new tokens it brings,
    in the order its tokens appear in the packed row.
    """

    def __init__(
        self, pool: BlockAllocator, rows: list[tuple[list[int], int, int]], method: str = "fused"
    ) -> None:
        if not isinstance(pool, BlockAllocator):
            raise KVCacheError(f"pool must be a BlockAllocator, got {type(pool).__name__}")
        if method not in ATTENTION_METHODS:
            raise KVCacheError(f"method must be one of {ATTENTION_METHODS}, got {method!r}")
        if method == "fused" and not (pool.device.type == "cpu" and pool.dtype == torch.float32):
            method = "gather"  # the compiled loop reads float32 CPU pools only
        if not rows:
            raise KVCacheError("a step needs at least one request")
        P = pool.block_size
        for i, (table, done, n) in enumerate(rows):
            check_int(f"rows[{i}] num_computed", done, low=0, error=KVCacheError)
            check_int(f"rows[{i}] n_new", n, error=KVCacheError)
            if len(table) * P < done + n:
                raise KVCacheError(
                    f"rows[{i}] holds {len(table)} blocks of {P} slots; it needs "
                    f"{done + n} tokens' worth (allocate blocks before the step)"
                )
        super().__init__(pool.n_layers, 1, pool.n_kv_heads, pool.head_dim, pool.dtype, pool.device)
        self.pool, self.rows, self.method = pool, rows, method
        self.n_tokens = sum(n for _, _, n in rows)
        dev = pool.device
        pos = torch.cat([torch.arange(d, d + n) for _, d, n in rows])  # (T,) positions
        table_of = torch.cat([torch.full((n,), i) for i, (_, _, n) in enumerate(rows)])  # (T,)
        M = max(len(t) for t, _, _ in rows)
        tables = torch.tensor([t + [-1] * (M - len(t)) for t, _, _ in rows])  # (B, M)
        self._pos = pos.to(dev)  # (T,)
        self._slot_block = tables[table_of, pos // P].to(dev)  # (T,) block of each new token
        self._slot_offset = (pos % P).to(dev)  # (T,) its slot in that block
        self._tables = tables.to(dev)  # (B, M), -1 past a request's blocks
        self._seq_lens = torch.tensor([d + n for _, d, n in rows], device=dev)  # (B,)
        starts = [0]
        for _, _, n in rows:
            starts.append(starts[-1] + n)
        self._starts = starts  # row r's tokens are [starts[r], starts[r + 1]) of the packed row
        decodes = [r for r, (_, _, n) in enumerate(rows) if n == 1]
        rows_d = torch.tensor(decodes, dtype=torch.long, device=dev)  # (B,) decode requests
        self._decode_at = torch.tensor([starts[r] for r in decodes], dtype=torch.long, device=dev)
        self._decode_tables = self._tables[rows_d]  # (B, M) the same for every layer
        self._decode_lens = self._seq_lens[rows_d]  # (B,)
        self._chunks = [r for r, (_, _, n) in enumerate(rows) if n > 1]

    def prepare(self, T: int) -> int:
        self._check_between_steps()
        if T != self.n_tokens:
            raise KVCacheError(f"this step packs {self.n_tokens} tokens, the model fed {T}")
        return 0

    def next_positions(self, T: int) -> torch.Tensor:
        """(1, T) each token's position in its own request."""
        return self._pos[None, :]  # (1, T)

    def max_position(self, n: int) -> int:
        return int(self._pos.max())

    def attend(self, layer, q, k, v, mask):
        """Store k, v (1, K, T, D) in the requests' blocks; attend q (1, H, T, D) per request."""
        self._check_q(q, k)
        self._check_kv(layer, k, v, None)
        blk, off = self._slot_block, self._slot_offset
        self.pool.k_pool[layer][blk, :, off] = k[0].transpose(0, 1)  # (T, K, D) into the blocks
        self.pool.v_pool[layer][blk, :, off] = v[0].transpose(0, 1)  # (T, K, D)
        self._len[layer] += k.shape[2]
        out = torch.empty_like(q)  # (1, H, T, D)
        at = self._decode_at
        if len(at):
            qd = q[0][:, at].transpose(0, 1)[:, :, None]  # (B, H, 1, D): one query per request
            o = paged_attention(
                qd, self.pool, self._decode_tables, self._decode_lens, layer, method=self.method
            )  # (B, H, 1, D)
            out[0][:, at] = o[:, :, 0].transpose(0, 1)  # (H, B, D)
        for r in self._chunks:
            a, b = self._starts[r], self._starts[r + 1]
            out[:, :, a:b] = paged_attention(
                q[:, :, a:b],  # (1, H, n, D)
                self.pool,
                self._tables[r : r + 1],
                self._seq_lens[r : r + 1],
                layer,
                method="gather",
            )  # (1, H, n, D)
        return out

    def update(self, layer, k, v):
        raise KVCacheError(
            "a StepCache packs several requests in one row: there is no single (B, K, S, D) "
            "history to return; the model calls attend"
        )

    @property
    def nbytes_allocated(self) -> int:
        return self.pool.nbytes_pool

    @property
    def nbytes_used(self) -> int:
        return int(self._seq_lens.sum()) * self._token_bytes()
