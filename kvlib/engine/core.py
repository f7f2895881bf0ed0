"""`Engine`: requests in, one packed forward per step, tokens out (continuous batching).

    engine = Engine(model, num_blocks=64, block_size=16)
    rid = engine.add_request(prompt_ids, SamplingParams(max_new_tokens=20))
    while engine.has_unfinished():
        out = engine.step()          # out.tokens: {request id: new token}; out.finished: [ids]
    engine.requests[rid].output      # the request's tokens

Each `step` asks the scheduler (`kvlib.engine.scheduler`) which requests run and with how many
tokens, packs all their new tokens into one row, runs the model once on it through a
`StepCache` (`kvlib.engine.kv`), and for every request whose last token was in the step samples
one token from its own logits with its own sampling parameters and generator. A request leaves
at EOS or at max_new_tokens, or when `cancel` is called; its blocks go back to the pool (full
ones stay cached for prefix hits). Requests arrive and leave between any two steps, so a
server streams each step's tokens and cancels a request whose client went away.

The clock (default `time.perf_counter`) stamps arrivals and tokens for the latency metrics;
pass `clock=lambda: engine.num_steps`-like callables for runs whose timings must not vary.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvlib.blocks import BlockAllocator
from kvlib.engine.blocks import BlockPool
from kvlib.engine.kv import ATTENTION_METHODS, StepCache
from kvlib.engine.request import Request, SamplingParams, Status
from kvlib.engine.scheduler import Scheduler
from kvlib.errors import KVLibError, KVLibTypeError, KVLibValueError, OutOfBlocksError, check_int
from kvlib.generate import next_token
from kvlib.transformer import Transformer


@dataclass
class StepOutput:
    """What one step produced: a new token per request that sampled, and who finished."""

    tokens: dict[int, int] = field(default_factory=dict)
    finished: list[int] = field(default_factory=list)
    scheduled: list[tuple[int, int]] = field(default_factory=list)  # (request id, new tokens)


class Engine:
    """A serving engine over a paged pool of `num_blocks` blocks of `block_size` tokens.

    max_num_tokens: token budget of one step; max_num_seqs: most requests running at once;
    prefix_cache: None, "hash" or "radix"; preemption: "recompute" or "swap";
    chunked_prefill: split prompts over steps (else a prompt runs in one step, alone in the
    budget); reserve_tokens: reserve that many tokens' blocks per request up front (the
    contiguous baseline; prefix caching is off then); attention: "fused" or "gather"
    (`kvlib.engine.kv`); max_history: keep only the last that many per-step records in
    `history` (None: all of them, 0: none; a long-running server caps it).
    """

    def __init__(
        self,
        model: Transformer,
        *,
        num_blocks: int,
        block_size: int = 16,
        max_num_tokens: int = 256,
        max_num_seqs: int = 64,
        prefix_cache: str | None = "hash",
        preemption: str = "recompute",
        chunked_prefill: bool = True,
        reserve_tokens: int | None = None,
        attention: str = "fused",
        clock: Callable[[], float] = time.perf_counter,
        max_history: int | None = None,
    ) -> None:
        if max_history is not None:
            check_int("max_history", max_history, low=0)
        if not isinstance(model, Transformer):
            raise KVLibTypeError(f"model must be a kvlib Transformer, got {type(model).__name__}")
        self.model = model
        self.pool = BlockPool(num_blocks, block_size, None if reserve_tokens else prefix_cache)
        self.storage = BlockAllocator.from_config(
            model.config, num_blocks, block_size, dtype=model.dtype, device=model.device
        )
        self.scheduler = Scheduler(
            self.pool,
            self.storage,
            max_num_tokens=max_num_tokens,
            max_num_seqs=max_num_seqs,
            chunked_prefill=chunked_prefill,
            preemption=preemption,
            reserve_tokens=reserve_tokens,
        )
        if attention not in ATTENTION_METHODS:
            raise KVLibValueError(
                f"attention must be one of {ATTENTION_METHODS}, got {attention!r}"
            )
        self.attention = attention
        self.clock = clock
        self.requests: dict[int, Request] = {}
        self._ids = itertools.count()
        self.num_steps = 0
        # one record per step: batch, memory, queues (the last max_history of them if capped)
        self.history: list[dict] | deque[dict] = (
            [] if max_history is None else deque(maxlen=max_history)
        )

    # ---- requests ------------------------------------------------------------------------------
    def add_request(
        self,
        token_ids: list[int] | torch.Tensor,
        params: SamplingParams | None = None,
        *,
        salt: str | None = None,
        arrival: float | None = None,
    ) -> int:
        """Queue a request for `token_ids` (its prompt); return its id. Raises, queueing
        nothing, if it could never run: bad tokens, longer than the model's positions, more
        blocks than the whole pool, or (without chunked prefill) more tokens than a step."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise KVLibTypeError(f"params must be SamplingParams, got {type(params).__name__}")
        ids = torch.as_tensor(token_ids).flatten().tolist()
        V, S_max = self.model.config.vocab_size, self.model.config.max_seq_len
        if not ids or not all(isinstance(t, int) and 0 <= t < V for t in ids):
            raise KVLibValueError(
                f"token_ids must be a non-empty list of ints in [0, {V}), got {ids[:8]}..."
            )
        if params.eos_token_id is not None and params.eos_token_id >= V:
            raise KVLibValueError(f"eos_token_id={params.eos_token_id} is outside [0, {V})")
        req = Request(next(self._ids), ids, params, salt=salt)
        if req.max_tokens + 1 > S_max:
            raise KVLibValueError(
                f"prompt ({len(ids)}) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                f"model's max_seq_len={S_max}"
            )
        need = self.pool.blocks_for(max(req.max_tokens, self.scheduler.reserve_tokens or 0))
        if need > self.pool.num_blocks:
            raise OutOfBlocksError(
                f"the request can hold {req.max_tokens} tokens, {need} blocks of "
                f"{self.pool.block_size}; the whole pool has {self.pool.num_blocks}: it can "
                "never run (shorten it or make a larger pool)"
            )
        if not self.scheduler.chunked_prefill and req.max_tokens > self.scheduler.max_num_tokens:
            raise KVLibValueError(
                f"without chunked prefill a request's {req.max_tokens} tokens must fit one "
                f"step's budget of {self.scheduler.max_num_tokens}"
            )
        req.arrival = self.clock() if arrival is None else arrival
        self.requests[req.request_id] = req
        self.scheduler.waiting.append(req)
        return req.request_id

    def cancel(self, request_id: int) -> None:
        """Stop a request now and free its blocks (no-op if it already finished)."""
        req = self._get(request_id)
        if req.finished:
            return
        self.scheduler.release(req)
        req.status, req.finish_reason = Status.FINISHED, "cancelled"

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    def pop(self, request_id: int) -> Request:
        """Remove a finished request from `requests` and return it (a server's last read)."""
        req = self._get(request_id)
        if not req.finished:
            raise KVLibValueError(
                f"request {request_id} is {req.status.value}; cancel it or let it finish first"
            )
        return self.requests.pop(request_id)

    # ---- one step ------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> StepOutput:
        """Schedule, run one forward over every scheduled token, sample, retire finished ones."""
        batch = self.scheduler.schedule()
        out = StepOutput(scheduled=[(r.request_id, n) for r, n in batch])
        if batch:
            rows = [(r.block_table, r.num_computed, n) for r, n in batch]
            fed = [r.tokens[r.num_computed : r.num_computed + n] for r, n in batch]
            tokens = torch.tensor([sum(fed, [])], device=self.model.device)  # (1, T)
            cache = StepCache(self.storage, rows, self.attention)
            logits = self.model(tokens, cache)[0]  # (T, V)
            end, now = 0, None
            for req, n in batch:
                end += n
                req.num_computed += n
                self.scheduler.stats["computed_tokens"] += n
                self.pool.register(
                    req.tokens, req.num_computed, req.block_table, req.block_keys, req.salt
                )
                if req.num_computed < req.num_tokens:
                    continue  # a prefill chunk that is not the last: nothing to sample
                p = req.params
                tok = int(
                    next_token(
                        logits[end - 1 : end], p.temperature, p.top_k, p.top_p, req.generator
                    )[0]
                )
                req.output.append(tok)
                now = self.clock() if now is None else now
                req.token_times.append(now)
                out.tokens[req.request_id] = tok
                if p.eos_token_id is not None and tok == p.eos_token_id:
                    self._finish(req, "eos", out)
                elif len(req.output) == p.max_new_tokens:
                    self._finish(req, "length", out)
        self.num_steps += 1
        self._record(batch)
        return out

    def _finish(self, req: Request, reason: str, out: StepOutput) -> None:
        self.scheduler.release(req)
        req.status, req.finish_reason = Status.FINISHED, reason
        out.finished.append(req.request_id)

    def _record(self, batch: list[tuple[Request, int]]) -> None:
        s = self.scheduler
        self.history.append(
            dict(
                step=self.num_steps,
                time=self.clock(),
                tokens=sum(n for _, n in batch),
                decode_tokens=sum(n for _, n in batch if n == 1),
                running=len(s.running),
                waiting=len(s.waiting),
                swapped=len(s.swapped),
                blocks_used=self.pool.num_used,
                blocks_cached=self.pool.num_cached,
                tokens_held=sum(r.num_computed for r in s.running),
            )
        )

    # ---- conveniences --------------------------------------------------------------------------
    def run(self, max_steps: int | None = None) -> dict[int, list[int]]:
        """Step until every request finished (or max_steps); return id -> output tokens."""
        steps = itertools.count() if max_steps is None else range(max_steps)
        for _ in steps:
            if not self.has_unfinished():
                break
            if not self.step().scheduled:  # cannot happen: a drained pool admits anything
                raise KVLibError(
                    "requests are queued but none could be scheduled: the scheduler is stuck"
                )
        return {i: list(r.output) for i, r in self.requests.items()}

    def check_drained(self) -> None:
        """Raise AssertionError unless no request holds a block and the pool is consistent."""
        self.pool.check_invariants()
        assert not self.has_unfinished(), "requests are still queued or running"
        held = [b for b in range(self.pool.num_blocks) if self.pool.ref[b]]
        assert not held, f"blocks still referenced after every request finished: {held}"

    def _get(self, request_id: int) -> Request:
        if request_id not in self.requests:
            raise KVLibValueError(f"no request with id {request_id!r}")
        return self.requests[request_id]
