"""Serving under memory pressure, simulated: the KV memory a trace of requests reserves and uses.

`simulate` replays a trace of request lengths under an allocation policy and counts, step by
step, the KV memory reserved and used; no model runs (chapter 5). A real model on a paged cache
that runs dry is `kvlib.preemption.generate_paged`; a full serving engine is `kvlib.engine`.

Unit of memory: one token slot (the K and V of one token over all layers; multiply by
`kvlib.memory.kv_bytes_per_token` for bytes). A trace is a list of requests, each a prompt
length p and an output length o, all queued at step 0 and served first come, first served
with iteration-level (continuous) batching: at every step each running request appends one
token, so after s steps it caches p + s tokens and it leaves after step o. The KV memory is a
pool of `budget` slots.

Policies (Kwon et al. 2023, section 6.1 and Fig. 2, compare the same three as "Orca"):

    "max"     contiguous: reserve max_len slots per request when it is admitted
    "pow2"    contiguous: reserve p + the next power of two >= o (outputs over-reserved by
              less than 2x: an output of 25 tokens gets 32 slots, the paper's example)
    "exact"   contiguous: reserve exactly p + o (an oracle that knows the output length)
    "paged"   blocks of `block_size` slots, one more when the last is full; when the pool
              runs dry the most recently admitted request is preempted: its blocks are freed
              and its p + s cached tokens are recomputed (a prefill) when it is readmitted

Contiguous reservations live in one address range [0, budget), so holes between them
(external fragmentation) are modelled too. `allocator` places them: "buddy" (the paper's
assumption for its baselines) rounds each reservation up to a power of two and places it at
the lowest offset aligned to that size; "first-fit" places exactly the reservation at the
lowest offset where it fits. Per step the simulation records the slots holding tokens (used)
and the slots reserved (contiguous) or held in blocks (paged).

Work: every admitted prompt is prefilled once (p tokens) and every step decodes one token per
running request; a preempted request is recomputed when readmitted. `SimResult.token_work`
counts all three, so a policy's steps and its recomputation can be weighed together.

Lengths come from `sharegpt_like_trace`: log-normal with the means of the ShareGPT trace in
Kwon et al. 2023, Fig. 11 (input 161.31 tokens, output 337.99 tokens on average); the spread
(sigma) is a choice of this module, since the paper shows histograms, not parameters.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from kvlib.errors import KVLibValueError, NotFinishedError, check_int

SHAREGPT_MEAN_INPUT = 161.31  # Kwon et al. 2023, Fig. 11(a), input length, mean (tokens)
SHAREGPT_MEAN_OUTPUT = 337.99  # Kwon et al. 2023, Fig. 11(a), output length, mean (tokens)
RESERVATIONS = ("max", "pow2", "exact", "paged")
ALLOCATORS = ("buddy", "first-fit")


@dataclass(frozen=True)
class Trace:
    """Request lengths: prompt_lens[i] and output_lens[i] (int64 arrays of equal length)."""

    prompt_lens: np.ndarray
    output_lens: np.ndarray

    def __post_init__(self) -> None:
        p, o = np.asarray(self.prompt_lens), np.asarray(self.output_lens)
        if p.ndim != 1 or p.shape != o.shape or p.size == 0:
            raise KVLibValueError(
                f"prompt_lens and output_lens must be non-empty 1-D arrays of equal length, "
                f"got shapes {p.shape} and {o.shape}"
            )
        if (p < 1).any() or (o < 1).any():
            raise KVLibValueError("every prompt and output length must be at least 1 token")

    def __len__(self) -> int:
        return len(self.prompt_lens)


def sharegpt_like_trace(
    n_requests: int, *, seed: int = 0, max_len: int = 2048, sigma: float = 1.0
) -> Trace:
    """n_requests log-normal (prompt, output) lengths with ShareGPT's means, p + o <= max_len.

    Each length is exp(N(mu, sigma^2)) with mu = ln(mean) - sigma^2 / 2 (so the untruncated
    mean is the published one), rounded, then clipped: p to [1, max_len - 1] and o to
    [1, max_len - p]. Clipping lowers the sample means a little; print them to see.
    """
    check_int("n_requests", n_requests)
    check_int("max_len", max_len, low=2)  # a prompt and an output
    if not sigma > 0:
        raise KVLibValueError(f"sigma must be positive, got {sigma!r}")
    rng = np.random.default_rng(seed)
    mu_in = math.log(SHAREGPT_MEAN_INPUT) - sigma**2 / 2
    mu_out = math.log(SHAREGPT_MEAN_OUTPUT) - sigma**2 / 2
    p = np.rint(rng.lognormal(mu_in, sigma, n_requests)).astype(np.int64)
    o = np.rint(rng.lognormal(mu_out, sigma, n_requests)).astype(np.int64)
    p = np.clip(p, 1, max_len - 1)
    o = np.clip(o, 1, max_len - p)
    return Trace(p, o)


@dataclass(frozen=True)
class SimResult:
    """Per-step series of one simulated run, plus the summary numbers the chapter prints."""

    policy: str
    block_size: int | None
    budget: int
    used: np.ndarray  # (steps,) slots holding tokens
    reserved: np.ndarray  # (steps,) slots reserved or held in blocks
    running: np.ndarray  # (steps,) requests in the batch
    waiting: np.ndarray  # (steps,) requests queued after admission
    preemptions: int
    prompt_tokens: int  # tokens prefilled once per request
    recomputed_tokens: int  # tokens prefilled again after a preemption

    @property
    def steps(self) -> int:
        """Steps to serve the whole trace."""
        return len(self.used)

    @property
    def waste(self) -> float:
        """Share of reserved slots not holding tokens: 1 - sum(used) / sum(reserved)."""
        return 1.0 - float(self.used.sum()) / float(self.reserved.sum())

    @property
    def pool_utilization(self) -> float:
        """Share of the pool holding tokens while requests were waiting (memory was the limit)."""
        busy = self.waiting > 0
        if not busy.any():
            return float("nan")
        return float(self.used[busy].sum()) / (self.budget * int(busy.sum()))

    @property
    def decode_tokens(self) -> int:
        """Tokens decoded: one per running request per step (the output tokens)."""
        return int(self.running.sum())

    @property
    def token_work(self) -> int:
        """Tokens the model processes: prompts + decoded tokens + recomputed tokens."""
        return self.prompt_tokens + self.decode_tokens + self.recomputed_tokens

    @property
    def mean_batch(self) -> float:
        """Requests served concurrently, averaged over steps."""
        return float(self.running.mean())

    @property
    def label(self) -> str:
        return f"paged (block {self.block_size})" if self.policy == "paged" else self.policy


def _pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


def _reservation(policy: str, p: int, o: int, max_len: int) -> int:
    if policy == "max":
        return max_len
    if policy == "pow2":
        return min(p + _pow2(o), max_len)
    return p + o  # "exact"


def _buddy_fit(spans: list[tuple[int, int]], size: int, budget: int) -> int | None:
    """Lowest offset aligned to `size` (a power of two) where `size` slots fit between spans."""
    candidates = sorted({0} | {-(-(off + n) // size) * size for off, n in spans})
    for at in candidates:
        if at + size > budget:
            return None
        if all(off + n <= at or at + size <= off for off, n in spans):
            return at
    return None


def _first_fit(spans: list[tuple[int, int]], size: int, budget: int) -> int | None:
    """Lowest offset where `size` slots fit between the sorted (offset, size) spans."""
    at = 0
    for off, n in spans:
        if off - at >= size:
            return at
        at = off + n
    return at if budget - at >= size else None


def simulate(
    trace: Trace,
    policy: str,
    *,
    budget: int = 16384,
    max_len: int = 2048,
    block_size: int = 16,
    allocator: str = "buddy",
    watermark: float = 0.01,
    max_steps: int = 10**6,
) -> SimResult:
    """Serve `trace` with `policy` in a pool of `budget` slots; record memory every step.

    Contiguous policies place reservations with `allocator` ("buddy" or "first-fit"). Paged
    admission keeps `watermark` (a share of the blocks) free for the running requests to grow
    into, as vLLM does, so that admitting one request rarely forces a preemption.
    """
    if policy not in RESERVATIONS:
        raise KVLibValueError(f"policy must be one of {RESERVATIONS}, got {policy!r}")
    if allocator not in ALLOCATORS:
        raise KVLibValueError(f"allocator must be one of {ALLOCATORS}, got {allocator!r}")
    check_int("max_len", max_len, low=2)
    check_int("budget", budget, low=max_len)  # room for one request
    check_int("block_size", block_size, high=max_len)
    check_int("max_steps", max_steps)
    total = trace.prompt_lens + trace.output_lens
    if int(total.max()) > max_len:
        raise KVLibValueError(
            f"a request needs {int(total.max())} slots, more than max_len={max_len}"
        )
    if not 0 <= watermark < 1:
        raise KVLibValueError(f"watermark must be a share of the pool in [0, 1), got {watermark!r}")
    paged = policy == "paged"
    P = block_size
    n_blocks = budget // P
    if paged and n_blocks * P < max_len:
        raise KVLibValueError(
            f"{n_blocks} blocks of {P} slots cannot hold one request of max_len={max_len}"
        )
    reserve = int(watermark * n_blocks)
    prompt = [int(x) for x in trace.prompt_lens]
    final = [int(x) for x in total]
    length = list(prompt)  # tokens cached when (re)admitted; grows by one per step
    waiting = deque(range(len(trace)))
    running: list[int] = []  # in admission order
    spans: dict[int, tuple[int, int]] = {}  # contiguous: request -> (offset, size)
    blocks: dict[int, int] = {}  # paged: request -> blocks held
    free_blocks = n_blocks
    used, reserved, n_running, n_waiting = [], [], [], []
    preemptions = recomputed = 0
    while waiting or running:
        if len(used) >= max_steps:
            raise NotFinishedError(f"trace not served within max_steps={max_steps}")
        # 1. admit from the head of the queue while the next request fits
        while waiting:
            r = waiting[0]
            if paged:
                need = -(-(length[r] + 1) // P)  # the cached tokens and this step's token
                if need > free_blocks - (reserve if running else 0):
                    break
                free_blocks -= need
                blocks[r] = need
            else:
                size = _reservation(policy, prompt[r], final[r] - prompt[r], max_len)
                ordered = sorted(spans.values())
                if allocator == "buddy":
                    size = _pow2(size)
                    at = _buddy_fit(ordered, size, budget)
                else:
                    at = _first_fit(ordered, size, budget)
                if at is None:
                    break
                spans[r] = (at, size)
            waiting.popleft()
            running.append(r)
        # 2. paged: every request whose last block is full takes one more, preempting if needed
        if paged:
            for r in list(running):
                if r not in blocks:  # preempted earlier in this loop
                    continue
                while (length[r] + 1) > blocks[r] * P:
                    if free_blocks == 0:
                        victim = running.pop()  # the most recently admitted
                        free_blocks += blocks.pop(victim)
                        waiting.appendleft(victim)
                        preemptions += 1
                        recomputed += length[victim]  # its cache is rebuilt on readmission
                        if victim == r:
                            break
                        continue
                    free_blocks -= 1
                    blocks[r] += 1
        # 3. one token per running request; record memory; retire finished requests
        for r in running:
            length[r] += 1
        used.append(sum(length[r] for r in running))
        if paged:
            reserved.append(sum(blocks[r] for r in running) * P)
        else:
            reserved.append(sum(spans[r][1] for r in running))
        n_running.append(len(running))
        n_waiting.append(len(waiting))
        for r in [r for r in running if length[r] >= final[r]]:
            running.remove(r)
            if paged:
                free_blocks += blocks.pop(r)
            else:
                del spans[r]
    return SimResult(
        policy=policy,
        block_size=P if paged else None,
        budget=budget,
        used=np.array(used, dtype=np.int64),
        reserved=np.array(reserved, dtype=np.int64),
        running=np.array(n_running, dtype=np.int64),
        waiting=np.array(n_waiting, dtype=np.int64),
        preemptions=preemptions,
        prompt_tokens=int(trace.prompt_lens.sum()),
        recomputed_tokens=recomputed,
    )


def fragmentation_study(
    trace: Trace,
    *,
    budget: int = 16384,
    max_len: int = 2048,
    block_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64),
    allocator: str = "buddy",
    progress: bool = False,
) -> list[SimResult]:
    """Run "max", "pow2", "exact" and "paged" at each block size on the same trace."""
    from tqdm.auto import tqdm

    runs = [("max", 1), ("pow2", 1), ("exact", 1)] + [("paged", b) for b in block_sizes]
    return [
        simulate(trace, policy, budget=budget, max_len=max_len, block_size=bs, allocator=allocator)
        for policy, bs in tqdm(runs, desc="policies", disable=not progress)
    ]
