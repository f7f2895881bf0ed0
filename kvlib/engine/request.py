"""A request to the engine: its sampling parameters, its tokens, and where it stands.

A request's tokens are `prompt + output`. `num_computed` of them have their K/V in the pool
(in the blocks of `block_table`, token i in block `block_table[i // P]`, slot `i % P`). Each
engine step feeds the next `n` uncomputed tokens; when that reaches the last token, its logits
give the next output token. A prefill, a chunk of a prefill, a decode and a recompute after
preemption are all the same operation: feed tokens[num_computed : num_computed + n].

    WAITING  -> RUNNING -> FINISHED            (stop on EOS or length, or cancel)
    RUNNING  -> WAITING  (preempted, recompute: blocks freed, num_computed back to 0)
    RUNNING  -> SWAPPED  (preempted, swap: K/V copied to CPU memory, blocks freed)
    SWAPPED  -> RUNNING  (swapped back in)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

import torch

from kvlib.errors import KVLibTypeError, KVLibValueError, check_int


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops.

    temperature 0 is greedy; otherwise temperature, then top_k, then top_p, drawn from the
    request's own generator seeded with `seed` (so its tokens do not depend on the batch).
    It stops after `max_new_tokens` tokens, or on `eos_token_id` (which is emitted).
    """

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        check_int("max_new_tokens", self.max_new_tokens)
        t = self.temperature
        if not isinstance(t, (int, float)) or isinstance(t, bool):
            raise KVLibTypeError(f"temperature must be a number, got {type(t).__name__}")
        if not math.isfinite(t) or t < 0:
            raise KVLibValueError(f"temperature must be a finite number >= 0, got {t}")
        if self.top_k is not None:
            check_int("top_k", self.top_k)
        p = self.top_p
        if p is not None and (
            not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 < p <= 1.0
        ):
            raise KVLibValueError(f"top_p must be None or a number in (0, 1], got {p!r}")
        if self.seed is not None:
            check_int("seed", self.seed, low=0)
        if self.eos_token_id is not None:
            check_int("eos_token_id", self.eos_token_id, low=0)


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"
    FINISHED = "finished"


@dataclass
class Request:
    """One request inside the engine (the engine creates it; callers read it)."""

    request_id: int
    prompt: list[int]
    params: SamplingParams
    arrival: float = 0.0  # when it was added (the engine's clock: steps or seconds)
    salt: str | None = None  # keeps its cached blocks apart from other tenants' (prefix cache)
    output: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "eos", "length" or "cancelled"
    num_computed: int = 0  # tokens whose K/V is in the pool
    block_table: list[int] = field(default_factory=list)
    block_keys: list = field(default_factory=list)  # prefix-index key of each full block
    num_cached: int = 0  # prompt tokens found in the prefix cache when it was admitted
    num_preemptions: int = 0
    swapped_kv: list | None = None  # per layer (k, v) (M, K, P, D) on the CPU while swapped
    generator: torch.Generator | None = None
    token_times: list[float] = field(default_factory=list)  # clock when each output appeared

    def __post_init__(self) -> None:
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def tokens(self) -> list[int]:
        """prompt + output: every token the model has seen or will see."""
        return self.prompt + self.output

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def max_tokens(self) -> int:
        """The most tokens it can ever hold: prompt + max_new_tokens - 1 (the last is never fed)."""
        return len(self.prompt) + self.params.max_new_tokens - 1

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def __repr__(self) -> str:
        return (
            f"Request(id={self.request_id}, {self.status.value}, prompt={len(self.prompt)}, "
            f"output={len(self.output)}, computed={self.num_computed}, "
            f"blocks={len(self.block_table)})"
        )
