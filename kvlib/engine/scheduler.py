"""Iteration-level scheduling: which requests run in the next step, each with how many tokens.

Every step has a budget of `max_num_tokens` tokens (Orca's iteration-level scheduling with
vLLM V1's token budget). The scheduler fills it in three passes:

1. Running requests, oldest first. Each asks for its remaining tokens (1 for a decode, the
   rest of its prompt for a prefill) up to what is left of the budget, so a long prompt is
   *chunked* over several steps while decodes ride along (SARATHI's piggybacking). If the pool
   cannot give the blocks those tokens need, the newest running request is *preempted* until
   it can (possibly the request itself).
2. Swapped-out requests come back (oldest first), if nothing was preempted in this step.
3. Waiting requests are admitted in arrival order while the budget, `max_num_seqs` and the
   pool allow (admission control). A new request first takes its cached prefix blocks
   (prefix caching) and computes only the rest.

Preemption, selectable:
    "recompute"  free the victim's blocks and put it back at the head of the queue; its tokens
                 (prompt and output so far) are prefilled again later (vLLM V1). Cost: those
                 tokens' compute, counted in `stats["recomputed_tokens"]`.
    "swap"       copy the victim's blocks to CPU memory, free them, and copy them back into
                 fresh blocks before it runs again. Cost: the bytes moved, counted in
                 `stats["swap_bytes"]`.

`reserve_tokens` (None: grow block by block, the paged way) makes each admitted request
reserve blocks for that many tokens at once, the way a contiguous cache reserves a
max-length slab per request: the baseline paging is measured against.
"""

from __future__ import annotations

from collections import deque

from kvlib.blocks import BlockAllocator
from kvlib.engine.blocks import BlockPool
from kvlib.engine.kv import swap_in, swap_out
from kvlib.engine.request import Request, Status
from kvlib.errors import KVLibValueError, check_bool, check_int

PREEMPTION = ("recompute", "swap")


class Scheduler:
    """Request queues, the block pool, and the policy that fills each step."""

    def __init__(
        self,
        pool: BlockPool,
        storage: BlockAllocator,
        *,
        max_num_tokens: int = 256,
        max_num_seqs: int = 64,
        chunked_prefill: bool = True,
        preemption: str = "recompute",
        reserve_tokens: int | None = None,
    ) -> None:
        check_int("max_num_tokens", max_num_tokens)
        check_int("max_num_seqs", max_num_seqs)
        check_bool("chunked_prefill", chunked_prefill)
        if preemption not in PREEMPTION:
            raise KVLibValueError(f"preemption must be one of {PREEMPTION}, got {preemption!r}")
        if reserve_tokens is not None:
            check_int("reserve_tokens", reserve_tokens)
        self.pool, self.storage = pool, storage
        self.max_num_tokens, self.max_num_seqs = max_num_tokens, max_num_seqs
        self.chunked_prefill, self.preemption = chunked_prefill, preemption
        self.reserve_tokens = reserve_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.swapped: deque[Request] = deque()
        self.stats = dict(
            preemptions=0, recomputed_tokens=0, swap_bytes=0, cached_tokens=0, computed_tokens=0
        )

    # ---- blocks ----------------------------------------------------------------------------
    def blocks_needed(self, req: Request, n: int) -> int:
        """New blocks `req` needs to hold n more tokens (its reservation, if any, counts)."""
        target = req.num_computed + n
        if self.reserve_tokens is not None:
            target = max(target, self.reserve_tokens)
        return max(self.pool.blocks_for(target) - len(req.block_table), 0)

    def _grant(self, req: Request, n: int) -> None:
        req.block_table += self.pool.allocate(self.blocks_needed(req, n))

    # ---- the step ----------------------------------------------------------------------------
    def schedule(self) -> list[tuple[Request, int]]:
        """The requests of the next step and their numbers of new tokens, in packing order."""
        budget, out, preempted = self.max_num_tokens, [], False
        i = 0
        while i < len(self.running) and budget > 0:  # 1. running: decodes and prefill chunks
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed, budget)
            while self.blocks_needed(req, n) > self.pool.num_free:
                victim = self.running[-1]  # the newest request gives way
                self.preempt(victim)
                preempted = True
                if victim is req:
                    break
            if req.status is not Status.RUNNING:
                break
            self._grant(req, n)
            out.append((req, n))
            budget -= n
            i += 1
        while not preempted and self.swapped and budget > 0:  # 2. swapped requests come back
            req = self.swapped[0]
            n = min(req.num_tokens - req.num_computed, budget)
            saved = req.swapped_kv[0][0].shape[0]  # blocks it held
            need = max(saved, self.pool.blocks_for(req.num_computed + n))
            if len(self.running) >= self.max_num_seqs or need > self.pool.num_free:
                break
            self.swapped.popleft()
            req.block_table = self.pool.allocate(saved)
            swap_in(self.storage, req.block_table, req.swapped_kv)
            self.stats["swap_bytes"] += saved * self.storage.block_nbytes
            req.swapped_kv, req.block_keys = None, []
            self.pool.register(
                req.tokens, req.num_computed, req.block_table, req.block_keys, req.salt
            )
            self._grant(req, n)
            req.status = Status.RUNNING
            self.running.append(req)
            out.append((req, n))
            budget -= n
        while not preempted and not self.swapped and self.waiting and budget > 0:  # 3. admit
            if len(self.running) >= self.max_num_seqs or not self._admit(
                self.waiting[0], budget, out
            ):
                break
            budget -= out[-1][1]
        return out

    def _admit(self, req: Request, budget: int, out: list) -> bool:
        """Start `req` (cached prefix first) if its first chunk fits; False: it waits."""
        hit_blocks, hit_keys = [], []
        if self.reserve_tokens is None:  # the last token is always computed: it gives logits
            hit_blocks, hit_keys = self.pool.match_prefix(req.tokens, req.salt, req.num_tokens - 1)
        hit = len(hit_blocks) * self.pool.block_size
        n = req.num_tokens - hit
        if n > budget and not self.chunked_prefill:
            self.pool.free(hit_blocks)
            return False
        n = min(n, budget)
        req.block_table, req.block_keys, req.num_computed = hit_blocks, hit_keys, hit
        if self.blocks_needed(req, n) > self.pool.num_free:
            self.pool.free(hit_blocks)
            req.block_table, req.block_keys, req.num_computed = [], [], 0
            return False
        self._grant(req, n)
        self.waiting.popleft()
        req.status = Status.RUNNING
        if req.num_preemptions == 0:
            req.num_cached = hit
        self.stats["cached_tokens"] += hit
        self.running.append(req)
        out.append((req, n))
        return True

    # ---- preemption and release ---------------------------------------------------------------
    def preempt(self, req: Request) -> None:
        """Take a running request off the pool, by recompute or by swap."""
        self.running.remove(req)
        req.num_preemptions += 1
        self.stats["preemptions"] += 1
        if self.preemption == "swap" and req.num_computed > 0:
            kept = req.block_table[: self.pool.blocks_for(req.num_computed)]
            req.swapped_kv = swap_out(self.storage, kept)
            self.stats["swap_bytes"] += len(kept) * self.storage.block_nbytes
            self.pool.free(req.block_table)
            req.block_table = []
            req.status = Status.SWAPPED
            self.swapped.append(req)
            return
        self.stats["recomputed_tokens"] += req.num_computed
        self.pool.free(req.block_table)
        req.block_table, req.block_keys, req.num_computed = [], [], 0
        req.status = Status.WAITING
        self.waiting.appendleft(req)

    def release(self, req: Request) -> None:
        """Drop a request from whichever queue holds it and free its blocks."""
        if req.status is Status.RUNNING:
            self.running.remove(req)
        elif req.status is Status.WAITING:
            self.waiting.remove(req)
        elif req.status is Status.SWAPPED:
            self.swapped.remove(req)
        self.pool.free(req.block_table)
        req.block_table, req.swapped_kv = [], None

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)
