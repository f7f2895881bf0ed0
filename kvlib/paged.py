"""Paged KV cache: per-sequence block tables over a pool of fixed-size blocks.

The pool is a `kvlib.blocks.BlockAllocator`: per layer, k_pool and v_pool of shape (N, K, P, D),
N blocks of P = block_size slots. A sequence owns one block table, shared by the layers.
Token i of a sequence lives in block `table[i // block_size]`, slot `i % block_size`; the
blocks of one sequence need not be adjacent, so memory is handed out one block at a time, as
the sequence grows, and at most `block_size - 1` slots per sequence sit unused.

`PagedKVCache` keeps named sequences (integer ids) and an *active batch*: row b of every
tensor the model sees is sequence `active[b]`. It implements the cache interface of
`kvlib.cache.Cache`, so the same `Transformer` runs on it unchanged. `update` gives the
contiguous layout

    update(...) -> k, v: (B, K, S, D)    row b's real tokens in slots [start[b], S)

gathered from the pool (the gather reference path). Rows of different lengths are
right-aligned, exactly like left padding; padding slots read as zeros and are never stored.
`attend`, the call the model makes per layer, skips the gather for a decode step (T = 1) on a
float32 CPU pool: it stores the new token and runs the fused kernel (`kvlib.paged_kernel`) on
the blocks in place; otherwise it is the interface's default (update, then attention).

Sharing: `fork` gives a new sequence the same blocks (reference counts go up);
the first write into a shared block copies it first (copy-on-write). Preemption:
`swap_out` moves a sequence's blocks to CPU memory and frees them; `swap_in` brings them back.

`kvlib.paged_attention` reads K/V through block tables directly (gather, block by block, or
the fused compiled loop); `BlockAllocator`, `paged_attention` and `gather_kv` are importable
from here too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from kvlib.blocks import BlockAllocator, blocks_for
from kvlib.cache import Cache
from kvlib.config import ModelConfig
from kvlib.errors import KVCacheError, KVLibTypeError, OutOfBlocksError, UnknownNameError, check_int
from kvlib.paged_attention import PAGED_METHODS, gather_kv, paged_attention
from kvlib.paged_kernel import paged_attention_fused

__all__ = ["PAGED_METHODS", "BlockAllocator", "PagedKVCache", "gather_kv", "paged_attention"]


@dataclass
class _Sequence:
    """One sequence: its block table, tokens written per layer, and CPU copies when swapped."""

    blocks: list[int]
    lens: list[int]
    swapped: tuple[list[torch.Tensor], list[torch.Tensor]] | None = field(default=None)


class PagedKVCache(Cache):
    """KV cache in a block pool: named sequences, an active batch, the `KVCache` interface.

    `PagedKVCache(allocator, batch_size)` creates `batch_size` empty sequences (ids
    0..batch_size-1) and makes them the active batch, so it drops in wherever a `KVCache`
    goes. `add_sequence`, `fork`, `set_active`, `swap_out`/`swap_in` and `free_sequence`
    manage sequences between decode steps.
    """

    def __init__(self, allocator: BlockAllocator, batch_size: int = 1) -> None:
        if not isinstance(allocator, BlockAllocator):
            raise KVLibTypeError(
                f"allocator must be a BlockAllocator, got {type(allocator).__name__}"
            )
        check_int("batch_size", batch_size)
        a = allocator
        super().__init__(a.n_layers, batch_size, a.n_kv_heads, a.head_dim, a.dtype, a.device)
        self.allocator = allocator
        self.block_size = allocator.block_size
        self._seqs: dict[int, _Sequence] = {}
        self._next_id = 0
        self._active: list[int] = []
        self._tables: torch.Tensor | None = None  # block_tables(), until a table changes
        self.set_active([self.add_sequence() for _ in range(batch_size)])

    @classmethod
    def from_config(
        cls,
        config: ModelConfig,
        batch_size: int = 1,
        *,
        num_blocks: int,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> PagedKVCache:
        """A cache with its own pool of `num_blocks` blocks shaped for `config`."""
        pool = BlockAllocator.from_config(
            config, num_blocks, block_size, dtype=dtype, device=device
        )
        return cls(pool, batch_size)

    # ---- sequences -------------------------------------------------------------------------------
    @property
    def active(self) -> list[int]:
        """Sequence ids of the batch rows, in row order."""
        return list(self._active)

    @property
    def sequences(self) -> list[int]:
        """Every sequence id this cache holds (active, idle or swapped out)."""
        return list(self._seqs)

    def sequence_length(self, seq_id: int) -> int:
        """Tokens cached for `seq_id` (in every layer)."""
        return min(self._seq(seq_id).lens)

    def block_table(self, seq_id: int) -> list[int]:
        """A copy of the block ids of `seq_id`, in token order."""
        return list(self._seq(seq_id).blocks)

    def is_swapped(self, seq_id: int) -> bool:
        """Whether `seq_id`'s blocks are in CPU memory (swapped out)."""
        return self._seq(seq_id).swapped is not None

    def add_sequence(self) -> int:
        """A new empty sequence (not active until `set_active`); returns its id."""
        seq_id = self._next_id
        self._next_id += 1
        self._seqs[seq_id] = _Sequence(blocks=[], lens=[0] * self.n_layers)
        return seq_id

    def set_active(self, seq_ids: list[int]) -> None:
        """Make `seq_ids` the batch rows. Rows of different lengths are right-aligned."""
        ids = list(seq_ids)
        if not ids:
            raise KVCacheError("the active batch needs at least one sequence")
        if len(set(ids)) != len(ids):
            raise KVCacheError(f"sequence ids repeat in {ids}; each row is a distinct sequence")
        for i in ids:
            seq = self._seq(i)
            if seq.swapped is not None:
                raise KVCacheError(f"sequence {i} is swapped out; swap_in({i}) before running it")
        self._check_between_steps()
        lens = [min(self._seqs[i].lens) for i in ids]
        S = max(lens)
        self._active = ids
        self._tables = None
        self.batch_size = len(ids)
        self._start = torch.tensor([S - n for n in lens], dtype=torch.long, device=self.device)
        self._len = [S] * self.n_layers

    def fork(self, seq_id: int, n_tokens: int | None = None) -> int:
        """A new sequence sharing the first n_tokens (default all) of `seq_id` by reference.

        No K/V is copied: the blocks gain a holder. A later write into a shared, partly
        filled block copies that block first (copy-on-write).
        """
        seq = self._seq(seq_id)
        if seq.swapped is not None:
            raise KVCacheError(f"sequence {seq_id} is swapped out; swap_in({seq_id}) first")
        self._check_between_steps()
        length = min(seq.lens)
        n = length if n_tokens is None else n_tokens
        check_int("n_tokens", n, low=0, high=length)
        blocks = seq.blocks[: blocks_for(n, self.block_size)]
        for b in blocks:
            self.allocator.incref(b)
        new_id = self.add_sequence()
        self._seqs[new_id] = _Sequence(blocks=list(blocks), lens=[n] * self.n_layers)
        return new_id

    def free_sequence(self, seq_id: int) -> None:
        """Forget an inactive sequence and release its blocks (or its CPU copy)."""
        seq = self._seq(seq_id)
        if seq_id in self._active:
            raise KVCacheError(
                f"sequence {seq_id} is in the active batch {self._active}; "
                "set_active without it first"
            )
        for b in seq.blocks:
            self.allocator.free(b)
        del self._seqs[seq_id]

    def swap_out(self, seq_id: int) -> None:
        """Copy an inactive sequence's blocks to CPU memory and release them (preemption)."""
        seq = self._seq(seq_id)
        if seq_id in self._active:
            raise KVCacheError(
                f"sequence {seq_id} is in the active batch {self._active}; "
                "set_active without it before swapping it out"
            )
        if seq.swapped is not None:
            raise KVCacheError(f"sequence {seq_id} is already swapped out")
        idx = torch.tensor(seq.blocks, dtype=torch.long, device=self.device)
        # each (n_blocks, K, block_size, D), on the CPU
        k_cpu = [pool[idx].to("cpu") for pool in self.allocator.k_pool]
        v_cpu = [pool[idx].to("cpu") for pool in self.allocator.v_pool]
        for b in seq.blocks:
            self.allocator.free(b)
        seq.blocks = []  # an inactive sequence: the active tables are unchanged
        seq.swapped = (k_cpu, v_cpu)

    def swap_in(self, seq_id: int) -> None:
        """Bring a swapped-out sequence back into fresh blocks (all or nothing)."""
        seq = self._seq(seq_id)
        if seq.swapped is None:
            raise KVCacheError(f"sequence {seq_id} is not swapped out")
        k_cpu, v_cpu = seq.swapped
        blocks = self.allocator.allocate(k_cpu[0].shape[0])  # may raise; nothing changed yet
        idx = torch.tensor(blocks, dtype=torch.long, device=self.device)
        for layer in range(self.n_layers):
            self.allocator.k_pool[layer][idx] = k_cpu[layer].to(self.device)
            self.allocator.v_pool[layer][idx] = v_cpu[layer].to(self.device)
        seq.blocks = blocks
        seq.swapped = None

    def block_tables(self) -> torch.Tensor:
        """(B, M) int64 block table of the active rows, padded with -1 (M = longest table).

        Built once and kept until a table changes (a block allocated or copied on write, a
        crop, a reset, a rollback, another active batch): every layer of a step reads the same
        tables. Treat it as read-only."""
        if self._tables is None:
            tables = [self._seqs[i].blocks for i in self._active]
            M = max(1, max(len(t) for t in tables))
            padded = [t + [-1] * (M - len(t)) for t in tables]
            self._tables = torch.tensor(padded, dtype=torch.long, device=self.device)  # (B, M)
        return self._tables

    # ---- the cache interface ---------------------------------------------------------------------
    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, K, T, D) to `layer`; return that layer's gathered (B, K, S, D).

        Padding slots (view slots before start[b]) are dropped, not stored. Blocks are
        allocated (and shared blocks copied) for every row before anything is written; if
        the pool runs out, OutOfBlocksError is raised and no sequence has changed.
        """
        self._write(layer, k, v)
        return self._gather(layer, self._len[layer])

    @property
    def fused_decode(self) -> bool:
        """Whether `attend` reads this pool in place (`kvlib.paged_kernel`: CPU, float32)."""
        return self.device.type == "cpu" and self.dtype == torch.float32

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Store k, v (B, K, T, D) and attend q (B, H, T, D) over each row's tokens.

        A decode step (T = 1) of a float32 model on a `fused_decode` pool skips the gather: it
        stores the token like `update`, then runs the fused loop over each row's own blocks
        where they lie. With one query per row the only mask is which slots are real, which
        the loop knows as the sequence lengths; `mask` must be that one (the model's), and is
        checked. Anything else takes the default path: update (gather), then attention.
        """
        self._check_q(q, k)
        if not (self.fused_decode and q.dtype == self.dtype and q.shape[2] == 1):
            return super().attend(layer, q, k, v, mask)
        self._check_layer(layer)
        B, H, _, D = q.shape
        S = self._len[layer] + 1
        if mask is not None and not torch.equal(
            mask.reshape(-1, S).expand(B, S), self.valid_mask(S)
        ):
            raise KVCacheError(
                "a decode step reads each row's own tokens; the mask must be the cache's "
                "valid_mask (other masks: use update, then attention)"
            )
        self._write(layer, k, v)
        lens = [self._seqs[i].lens[layer] for i in self._active]  # 0: a row of padding so far
        seq_lens = torch.tensor(lens, dtype=torch.long)  # (B,)
        pool, tables, scale = self.allocator, self.block_tables(), 1.0 / math.sqrt(D)
        return paged_attention_fused(
            q, pool.k_pool[layer], pool.v_pool[layer], tables, seq_lens, scale
        )  # (B, H, 1, D)

    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (B, K, T, D) of the active rows in their blocks (the first half of update)."""
        T = self._check_kv(layer, k, v, None)
        pos = self._len[layer]
        P = self.block_size
        start = self._start.tolist()
        alloc = self.allocator
        plans = []  # (row, seq, old, new, blocks needed): real tokens [old, new) get written
        need_new = 0
        writers: dict[int, int] = {}  # shared block -> rows about to write into it
        for b, seq_id in enumerate(self._active):
            seq = self._seqs[seq_id]
            old, new = max(pos - start[b], 0), max(pos + T - start[b], 0)
            if seq.lens[layer] != old:
                raise KVCacheError(
                    f"row {b} (sequence {seq_id}) holds {seq.lens[layer]} tokens in layer "
                    f"{layer}, the batch view expects {old}"
                )
            if new == old:
                continue
            n_blocks = blocks_for(new, P)
            need_new += max(n_blocks - len(seq.blocks), 0)
            for j in range(old // P, min(n_blocks, len(seq.blocks))):
                if alloc.refcount(seq.blocks[j]) > 1:
                    writers[seq.blocks[j]] = writers.get(seq.blocks[j], 0) + 1
            plans.append((b, seq, old, new, n_blocks))
        # each writer copies while others still hold the block: the last holder keeps it
        need_cow = sum(min(w, alloc.refcount(blk) - 1) for blk, w in writers.items())
        if need_new + need_cow > alloc.num_free:
            raise OutOfBlocksError(
                f"this step needs {need_new} new blocks and {need_cow} copy-on-write copies "
                f"but only {alloc.num_free} of {alloc.num_blocks} blocks are "
                "free; nothing was written (swap out or free a sequence, then retry)"
            )
        rows, cols, blk, off = [], [], [], []
        for b, seq, old, new, n_blocks in plans:
            if writers:
                for j in range(old // P, min(n_blocks, len(seq.blocks))):
                    if alloc.refcount(seq.blocks[j]) > 1:  # shared: copy on write
                        (fresh,) = alloc.allocate(1)
                        alloc.copy_block(seq.blocks[j], fresh)
                        alloc.free(seq.blocks[j])
                        seq.blocks[j] = fresh
                        self._tables = None
            if n_blocks > len(seq.blocks):
                seq.blocks += alloc.allocate(n_blocks - len(seq.blocks))
                self._tables = None
            for r in range(old, new):
                rows.append(b)
                cols.append(r + start[b] - pos)  # the token's index t in [0, T)
                blk.append(seq.blocks[r // P])
                off.append(r % P)
            seq.lens[layer] = new
        if rows:
            rows_t, cols_t, blk_t, off_t = torch.tensor([rows, cols, blk, off], device=self.device)
            # pool[blk, :, off] is (n, K, D); k[rows, :, cols] is (n, K, D)
            self._store(layer, blk_t, off_t, k[rows_t, :, cols_t], v[rows_t, :, cols_t])
        self._len[layer] = pos + T

    def _store(
        self, layer: int, blk: torch.Tensor, off: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Write n tokens' k, v (n, K, D) into slots off (n,) of blocks blk (n,) of `layer`'s
        pools (a pool storing another format overrides this and `_load`)."""
        self.allocator.k_pool[layer][blk, :, off] = k
        self.allocator.v_pool[layer][blk, :, off] = v

    def _load(
        self, layer: int, blk: torch.Tensor, off: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (..., K, D) of slots off of blocks blk (both (...)) of `layer`'s pools."""
        return self.allocator.k_pool[layer][blk, :, off], self.allocator.v_pool[layer][blk, :, off]

    def _gather(self, layer: int, S: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The active rows' first S view slots of `layer` as (B, K, S, D), padding zeroed."""
        P = self.block_size
        tables = self.block_tables().clamp(min=0)  # (B, M)
        slots = torch.arange(S, device=self.device)  # (S,)
        r = slots[None, :] - self._start[:, None]  # (B, S) token index in its sequence
        valid = r >= 0  # (B, S)
        r = r.clamp(min=0)
        col = (r // P).clamp(max=tables.shape[1] - 1)  # (B, S)
        blk, off = tables.gather(1, col), r % P  # (B, S) each: block id and slot of each token
        k, v = self._load(layer, blk, off)  # (B, S, K, D) each
        keep = valid[:, :, None, None]  # (B, S, 1, 1)
        k = torch.where(keep, k, torch.zeros((), dtype=k.dtype, device=k.device))
        v = torch.where(keep, v, torch.zeros((), dtype=v.dtype, device=v.device))
        return k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)  # (B, K, S, D)

    def checkpoint(self) -> dict:
        """Lengths, block tables and the pool's free list and refcounts (no K/V is copied)."""
        seqs = {i: (list(s.blocks), list(s.lens), s.swapped) for i, s in self._seqs.items()}
        return super().checkpoint() | {
            "seqs": seqs,
            "active": list(self._active),
            "next_id": self._next_id,
            "pool": self.allocator.checkpoint(),
        }

    def rollback(self, state: dict) -> None:
        super().rollback(state)
        self._seqs = {
            i: _Sequence(blocks=list(blocks), lens=list(lens), swapped=swapped)
            for i, (blocks, lens, swapped) in state["seqs"].items()
        }
        self._active = list(state["active"])
        self._tables = None
        self.batch_size = len(self._active)
        self._next_id = state["next_id"]
        self.allocator.rollback(state["pool"])

    def crop(self, n: int) -> None:
        """Keep the first n view slots; blocks past each row's new end are released."""
        super().crop(n)  # validates, sets the view length
        start = self._start.tolist()
        for b, seq_id in enumerate(self._active):
            seq = self._seqs[seq_id]
            keep = max(n - start[b], 0)
            for blk in seq.blocks[blocks_for(keep, self.block_size) :]:
                self.allocator.free(blk)
            del seq.blocks[blocks_for(keep, self.block_size) :]
            seq.lens = [keep] * self.n_layers
            start[b] = n - keep
        self._tables = None
        self._start = torch.tensor(start, dtype=torch.long, device=self.device)

    def reset(self) -> None:
        """Empty every active sequence and release its blocks (idle sequences are kept)."""
        for seq_id in self._active:
            seq = self._seqs[seq_id]
            for blk in seq.blocks:
                self.allocator.free(blk)
            seq.blocks = []
            seq.lens = [0] * self.n_layers
        self._tables = None
        super().reset()

    # ---- memory ----------------------------------------------------------------------------------
    def _block_fill(self) -> dict[int, int]:
        """Resident block id -> slots holding tokens (a shared block counts once)."""
        fill: dict[int, int] = {}
        P = self.block_size
        for seq in self._seqs.values():
            n = min(seq.lens)
            for j, blk in enumerate(seq.blocks):
                fill[blk] = max(fill.get(blk, 0), min(max(n - j * P, 0), P))
        return fill

    @property
    def nbytes_allocated(self) -> int:
        """Bytes of the blocks this cache's sequences hold (shared blocks once)."""
        return len(self._block_fill()) * self.allocator.block_nbytes

    @property
    def nbytes_used(self) -> int:
        """Bytes of those blocks that hold tokens (shared tokens once)."""
        return sum(self._block_fill().values()) * self._token_bytes()

    # ---- checks ----------------------------------------------------------------------------------
    def _seq(self, seq_id: int) -> _Sequence:
        check_int("sequence id", seq_id, low=None)
        if seq_id not in self._seqs:
            raise UnknownNameError(f"no sequence {seq_id}; known sequences: {sorted(self._seqs)}")
        return self._seqs[seq_id]

    def __repr__(self) -> str:
        return (
            f"PagedKVCache(L={self.n_layers}, active={self._active}, "
            f"block_size={self.block_size}, seq_len={self.seq_len}, "
            f"blocks_used={self.allocator.num_used}/{self.allocator.num_blocks})"
        )
