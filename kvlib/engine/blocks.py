"""The engine's shared block pool: reference counts, an LRU free queue, and prefix caching.

The pool hands out block ids; `kvlib.engine.kv` holds what the blocks contain. A request's
block table lists its blocks in token order (token i lives in block `table[i // P]`).

Automatic prefix caching (vLLM's design). A *full* block is named by a chained hash

    key_i = hash(key_{i-1}, the block's P token ids, salt)        key_{-1} = None

so a key names the block's tokens *and every token before them*: two requests share a block
exactly when their prompts agree up to the end of that block. When a block fills, the pool
records key -> block in the prefix index. A new request walks its prompt block by block and
takes every block it finds (its reference count goes up; nothing is computed for those
tokens). Only full blocks are cached; a partly filled block is private to its request.

Reference counts and the free queue. `ref[b]` counts the requests whose table holds b. A
block whose count falls to 0 goes to the back of the free queue *keeping its contents and its
key*: it is free, but a later request may still hit it (and take it back out of the queue).
`allocate` takes blocks from the front, the least recently freed first; a taken block that
was cached is evicted from the index then (LRU eviction). A request's blocks are freed last
block first, so the tail of a prompt is evicted before its shared head.

The index is a hash table (`HashIndex`, a dict from key to block) or a radix tree
(`kvlib.engine.radix.RadixIndex`); both answer the same three questions (`child`, `get`,
`put`/`pop`), so the pool runs on either.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from kvlib.errors import KVLibValueError, OutOfBlocksError, check_int

PREFIX_CACHES = (None, "hash", "radix")


def block_hash(parent: str | None, token_ids: tuple[int, ...] | list[int], salt: str | None) -> str:
    """The key of a full block: sha256 of (parent key, the block's token ids, salt), 16 hex.

    Deterministic on every machine (unlike Python's `hash` of a string), so keys can be printed.
    """
    text = f"{parent}|{','.join(str(int(t)) for t in token_ids)}|{salt}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class HashIndex:
    """Prefix index as a hash table: key (a chained `block_hash`) -> block id."""

    def __init__(self) -> None:
        self._table: dict[str, int] = {}
        self.ops = 0  # hashes computed

    def child(self, parent: str | None, token_ids: tuple[int, ...], salt: str | None, create: bool):
        """The key of the block holding `token_ids` after the prefix named `parent`."""
        self.ops += 1
        return block_hash(parent, token_ids, salt)

    def get(self, key: str) -> int | None:
        return self._table.get(key)

    def put(self, key: str, block: int) -> None:
        self._table[key] = block

    def pop(self, key: str) -> None:
        del self._table[key]

    def __len__(self) -> int:
        return len(self._table)


class BlockPool:
    """`num_blocks` block ids of `block_size` slots: refcounts, LRU free queue, prefix index.

    prefix_cache: None (no caching), "hash" or "radix". Counters: `hits` and `queries` (blocks
    found / looked up by `match_prefix`), `evictions` (cached blocks reused for other tokens).
    """

    def __init__(self, num_blocks: int, block_size: int, prefix_cache: str | None = "hash") -> None:
        check_int("num_blocks", num_blocks)
        check_int("block_size", block_size)
        if prefix_cache not in PREFIX_CACHES:
            raise KVLibValueError(
                f"prefix_cache must be one of {PREFIX_CACHES}, got {prefix_cache!r}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_cache = prefix_cache
        if prefix_cache == "radix":
            from kvlib.engine.radix import RadixIndex

            self.index = RadixIndex()
        else:
            self.index = HashIndex()
        self.ref = [0] * num_blocks
        self.free_queue: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.key_of: dict[int, object] = {}  # cached block -> its key in the index
        self.hits = self.queries = self.evictions = 0

    # ---- counts ----------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks no request holds (cached or not): what `allocate` can hand out."""
        return len(self.free_queue)

    @property
    def num_used(self) -> int:
        """Blocks held by at least one request."""
        return self.num_blocks - len(self.free_queue)

    @property
    def num_cached(self) -> int:
        """Blocks in the prefix index (held or free)."""
        return len(self.key_of)

    def blocks_for(self, n_tokens: int) -> int:
        """Blocks that hold n_tokens tokens."""
        return -(-n_tokens // self.block_size)

    # ---- allocation ------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """Take n blocks from the front of the free queue (refcount 1); all or nothing."""
        check_int("n", n, low=0)
        if n > len(self.free_queue):
            raise OutOfBlocksError(
                f"need {n} blocks but only {len(self.free_queue)} of {self.num_blocks} are free "
                "(preempt a request, or make a larger pool)"
            )
        blocks = []
        for _ in range(n):
            b, _ = self.free_queue.popitem(last=False)  # least recently freed first
            if b in self.key_of:  # a cached block is reused: it leaves the index
                self.index.pop(self.key_of.pop(b))
                self.evictions += 1
            self.ref[b] = 1
            blocks.append(b)
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block, last block first; at 0 it joins the free queue."""
        for b in reversed(blocks):
            if self.ref[b] <= 0:
                raise KVLibValueError(f"block {b} is already free (double free)")
        for b in reversed(blocks):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free_queue[b] = None  # the back: evicted last

    # ---- prefix caching --------------------------------------------------------------------
    def match_prefix(
        self, token_ids: list[int], salt: str | None, max_tokens: int
    ) -> tuple[list[int], list]:
        """The cached blocks that start `token_ids`, within its first `max_tokens` tokens.

        Takes a reference to each block found (so eviction cannot take it) and returns
        (blocks, keys). Stops at the first block not in the index.
        """
        if self.prefix_cache is None:
            return [], []
        P = self.block_size
        blocks, keys, parent = [], [], None
        for i in range(max_tokens // P):
            self.queries += 1
            key = self.index.child(parent, tuple(token_ids[i * P : (i + 1) * P]), salt, False)
            block = None if key is None else self.index.get(key)
            if block is None:
                break
            blocks.append(block)
            keys.append(key)
            parent = key
        for b in blocks:
            if self.ref[b] == 0:
                del self.free_queue[b]
            self.ref[b] += 1
        self.hits += len(blocks)
        return blocks, keys

    def register(
        self, token_ids: list[int], n_tokens: int, table: list[int], keys: list, salt: str | None
    ) -> None:
        """Enter the full blocks among the first n_tokens tokens into the index.

        `keys` (the request's keys so far, extended in place) chains the new ones. A key already
        in the index moves to the new block: the copy a running request holds cannot be evicted
        while it runs, so its whole chain stays findable; the older copy stays where it is,
        uncached (freed and reused like any block)."""
        if self.prefix_cache is None:
            return
        P = self.block_size
        for i in range(len(keys), n_tokens // P):
            parent = keys[i - 1] if i else None
            key = self.index.child(parent, tuple(token_ids[i * P : (i + 1) * P]), salt, True)
            keys.append(key)
            block = table[i]
            old = self.index.get(key)
            if old == block or block in self.key_of:
                continue
            if old is not None:
                del self.key_of[old]  # the same tokens computed twice: the newer copy wins
            self.index.put(key, block)
            self.key_of[block] = key

    # ---- checks ----------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise AssertionError unless refcounts, free queue and index agree."""
        for b in range(self.num_blocks):
            assert self.ref[b] >= 0, f"block {b} has refcount {self.ref[b]}"
            assert (self.ref[b] == 0) == (b in self.free_queue), (
                f"block {b}: refcount {self.ref[b]}, "
                f"{'in' if b in self.free_queue else 'not in'} the free queue"
            )
        for b, key in self.key_of.items():
            assert self.index.get(key) == b, f"block {b} is cached under a key that names another"
        assert len(self.index) == len(self.key_of), (
            f"index holds {len(self.index)} blocks, the pool knows {len(self.key_of)}"
        )

    def __repr__(self) -> str:
        return (
            f"BlockPool(num_blocks={self.num_blocks}, block_size={self.block_size}, "
            f"used={self.num_used}, cached={self.num_cached}, prefix_cache={self.prefix_cache!r})"
        )
