"""The block pool of a paged KV cache: fixed-size blocks, reference counts, a free list.

Memory is carved into blocks of `block_size` token slots, the way an operating system carves
RAM into pages (Kwon et al. 2023, vLLM). One preallocated pool per layer for K and for V:

    allocator.k_pool[layer], allocator.v_pool[layer]: (N, K, P, D)

N blocks of P = block_size slots. `k_pool[l][n, :, p]` is the key of one token, every kv
head, in slot p of block n of layer l. A block id indexes every layer's pool. `BlockAllocator`
hands blocks out and takes them back (all or nothing), counts references so blocks can be
shared (copy-on-write), and checks its own invariants. Who owns which block is the caller's:
`kvlib.paged.PagedKVCache`, or the serving engine's block pool.
"""

from __future__ import annotations

import torch

from kvlib.config import ModelConfig, dtype_bytes
from kvlib.errors import (
    KVLibIndexError,
    KVLibTypeError,
    KVLibValueError,
    OutOfBlocksError,
    check_int,
)


def blocks_for(n_tokens: int, block_size: int) -> int:
    """Blocks needed to hold n_tokens tokens."""
    return -(-n_tokens // block_size)


class BlockAllocator:
    """A pool of `num_blocks` blocks of `block_size` slots, with a free list and refcounts.

    A block is free exactly when its reference count is 0. `allocate` hands out the lowest
    free ids first (reproducible pictures), `incref` adds a holder, `free` drops one and
    returns the block to the free list when the last holder lets go.
    """

    def __init__(
        self,
        n_layers: int,
        num_blocks: int,
        block_size: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        for name, value in (
            ("n_layers", n_layers),
            ("num_blocks", num_blocks),
            ("block_size", block_size),
            ("n_kv_heads", n_kv_heads),
            ("head_dim", head_dim),
        ):
            check_int(name, value)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise KVLibTypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.n_layers = n_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (num_blocks, n_kv_heads, block_size, head_dim)  # (num_blocks, K, block_size, D)
        self.k_pool = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(n_layers)]
        self.v_pool = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(n_layers)]
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: pop() gives the lowest id
        self._ref = [0] * num_blocks

    @classmethod
    def from_config(
        cls,
        config: ModelConfig,
        num_blocks: int,
        block_size: int = 16,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> BlockAllocator:
        """A pool shaped for `config`'s layers, kv heads and head dim."""
        return cls(
            config.n_layers,
            num_blocks,
            block_size,
            config.n_kv_heads,
            config.head_dim,
            dtype=dtype,
            device=device,
        )

    # ---- bookkeeping -------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks nobody holds."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        """Blocks held by at least one sequence."""
        return self.num_blocks - len(self._free)

    def refcount(self, block: int) -> int:
        """How many block tables hold `block`."""
        self._check_block(block)
        return self._ref[block]

    def free_blocks(self) -> list[int]:
        """Ids of the free blocks, sorted."""
        return sorted(self._free)

    def allocate(self, n: int = 1) -> list[int]:
        """Take n free blocks (refcount 1 each); all or nothing."""
        check_int("number of blocks", n, low=0)
        if n > len(self._free):
            raise OutOfBlocksError(
                f"need {n} blocks but only {len(self._free)} of {self.num_blocks} are free "
                "(free or swap out a sequence, or make a larger pool)"
            )
        blocks = [self._free.pop() for _ in range(n)]
        for b in blocks:
            self._ref[b] = 1
        return blocks

    def incref(self, block: int) -> None:
        """One more table holds `block` (it must be in use already)."""
        self._check_block(block)
        if self._ref[block] == 0:
            raise KVLibValueError(f"block {block} is free; only a block in use can be shared")
        self._ref[block] += 1

    def free(self, block: int) -> None:
        """One table lets go of `block`; at refcount 0 it returns to the free list."""
        self._check_block(block)
        if self._ref[block] == 0:
            raise KVLibValueError(f"block {block} is already free (double free)")
        self._ref[block] -= 1
        if self._ref[block] == 0:
            self._free.append(block)

    def copy_block(self, src: int, dst: int) -> None:
        """Copy every layer's K and V of block src into block dst (copy-on-write)."""
        self._check_block(src)
        self._check_block(dst)
        for pool in self.k_pool + self.v_pool:
            pool[dst] = pool[src]

    def checkpoint(self) -> tuple[list[int], list[int]]:
        """The free list and refcounts, to restore after a failed step (the pools' contents
        need no copy: a step writes only into blocks it allocated or copied)."""
        return list(self._free), list(self._ref)

    def rollback(self, state: tuple[list[int], list[int]]) -> None:
        """Return the free list and refcounts to `state` from `checkpoint()`."""
        self._free, self._ref = list(state[0]), list(state[1])

    def check_invariants(self) -> None:
        """Raise AssertionError unless free list and refcounts agree."""
        free = set(self._free)
        assert len(free) == len(self._free), f"free list has duplicates: {self._free}"
        for b in range(self.num_blocks):
            assert self._ref[b] >= 0, f"block {b} has negative refcount {self._ref[b]}"
            assert (self._ref[b] == 0) == (b in free), (
                f"block {b}: refcount {self._ref[b]} but {'in' if b in free else 'not in'} "
                "the free list"
            )

    # ---- memory --------------------------------------------------------------------------------
    @property
    def block_nbytes(self) -> int:
        """Bytes of one block over all layers, K and V."""
        return (
            2
            * self.n_layers
            * self.n_kv_heads
            * self.block_size
            * self.head_dim
            * dtype_bytes(self.dtype)
        )

    @property
    def nbytes_pool(self) -> int:
        """Bytes of the whole preallocated pool."""
        return self.num_blocks * self.block_nbytes

    def _check_block(self, block: int) -> None:
        check_int("block id", block, low=None)
        if not 0 <= block < self.num_blocks:
            raise KVLibIndexError(
                f"block {block} out of range for a pool of {self.num_blocks} blocks"
            )

    def __repr__(self) -> str:
        return (
            f"BlockAllocator(L={self.n_layers}, num_blocks={self.num_blocks}, "
            f"block_size={self.block_size}, K={self.n_kv_heads}, D={self.head_dim}, "
            f"free={self.num_free})"
        )
