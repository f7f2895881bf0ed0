"""Synthetic serving workloads and the latency metrics of serving them.

`sharegpt_like` draws a trace the way serving papers do: prompt and output lengths from
log-normal distributions (ShareGPT conversations: long-tailed, outputs about as long as
prompts), arrivals from a Poisson process at `rate` requests per second (exponential gaps),
and optionally one shared system prompt in front of every prompt (what prefix caching saves).

`summarize` turns what each request saw into the serving metrics:

    throughput   output tokens per second, from the first arrival to the last token
    TTFT         time to first token: first token's time - arrival (queueing + prefill)
    TPOT         time per output token after the first: (last - first) / (n - 1)

reported as p50 and p99 over requests. `VirtualClock` lets a replay skip idle time: it
runs only while work runs, and jumps to the next arrival when nothing does.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

from kvlib.errors import KVLibValueError, check_int


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace: when it arrives, its prompt, how many tokens it wants."""

    arrival: float
    prompt: tuple[int, ...]
    max_new_tokens: int


def _lognormal_int(rng: random.Random, mean: float, sigma: float, low: int, high: int) -> int:
    mu = math.log(mean) - sigma**2 / 2  # the mean of the log-normal is `mean`
    return min(max(int(round(rng.lognormvariate(mu, sigma))), low), high)


def sharegpt_like(
    n: int,
    rate: float,
    *,
    vocab_size: int,
    mean_prompt: float = 48.0,
    mean_output: float = 40.0,
    max_prompt: int = 128,
    max_output: int = 96,
    sigma: float = 0.8,
    system_prompt: int = 0,
    seed: int = 0,
) -> list[TraceRequest]:
    """n requests: log-normal lengths, Poisson arrivals at `rate` per second, random token ids,
    each prompt behind the same `system_prompt` tokens (0: none; its length counts in
    max_prompt)."""
    check_int("n", n)
    check_int("vocab_size", vocab_size)
    check_int("system_prompt", system_prompt, low=0)
    if not isinstance(rate, (int, float)) or not rate > 0:
        raise KVLibValueError(f"rate must be a number > 0 (requests per second), got {rate!r}")
    if system_prompt >= max_prompt:
        raise KVLibValueError(
            f"system_prompt ({system_prompt}) must leave room in max_prompt ({max_prompt})"
        )
    rng = random.Random(seed)
    system = tuple(rng.randrange(vocab_size) for _ in range(system_prompt))
    out, t = [], 0.0
    for _ in range(n):
        t += rng.expovariate(rate)
        own = _lognormal_int(rng, mean_prompt, sigma, 1, max_prompt - system_prompt)
        prompt = system + tuple(rng.randrange(vocab_size) for _ in range(own))
        out.append(TraceRequest(t, prompt, _lognormal_int(rng, mean_output, sigma, 1, max_output)))
    return out


class VirtualClock:
    """A clock that runs only while work runs (between `start` and `stop`, at the speed of
    `time.perf_counter`) and jumps over idle time (`jump`). Read inside the work, it gives the
    moment of the reading, so a token is stamped when it exists."""

    def __init__(self) -> None:
        self.now = 0.0
        self._since: float | None = None  # perf_counter() when the running work started

    def __call__(self) -> float:
        if self._since is None:
            return self.now
        return self.now + time.perf_counter() - self._since

    def start(self) -> None:
        self._since = time.perf_counter()

    def stop(self) -> None:
        self.now, self._since = self(), None

    def jump(self, t: float) -> None:
        """Skip idle time up to t (never backwards)."""
        self.now = max(self(), t)
        if self._since is not None:
            self._since = time.perf_counter()


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between order statistics."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(records: list[dict]) -> dict:
    """Serving metrics from per-request records {arrival, token_times}: throughput (tokens/s),
    TTFT and TPOT p50/p99 (seconds), requests and output tokens."""
    done = [r for r in records if r["token_times"]]
    if not done:
        raise KVLibValueError("no request produced a token: nothing to summarize")
    ttft = [r["token_times"][0] - r["arrival"] for r in done]
    tpot = [
        (r["token_times"][-1] - r["token_times"][0]) / (len(r["token_times"]) - 1)
        for r in done
        if len(r["token_times"]) > 1
    ]
    n_out = sum(len(r["token_times"]) for r in done)
    span = max(r["token_times"][-1] for r in done) - min(r["arrival"] for r in records)
    return dict(
        requests=len(done),
        output_tokens=n_out,
        throughput=n_out / span if span > 0 else float("inf"),
        ttft_p50=percentile(ttft, 50),
        ttft_p99=percentile(ttft, 99),
        tpot_p50=percentile(tpot, 50),
        tpot_p99=percentile(tpot, 99),
    )
