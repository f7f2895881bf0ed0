"""Serving a trace: through the engine, or with static batching (the baseline).

Both replays run on a `VirtualClock` (`kvlib.engine.trace`): the clock runs during each
forward pass (and sampling) and jumps over idle gaps, so a trace's arrivals are honoured
without sleeping. Each returns per-request records {arrival, token_times, prompt, cached} for
`kvlib.engine.trace.summarize`, and the memory held over time.

static batching: take up to `batch_size` requests that have arrived, left-pad their prompts,
and generate until the longest output is done (`kvlib.generate` on a contiguous cache of
batch_size x (longest prompt + longest output) slots); only then start the next batch.
"""

from __future__ import annotations

import torch

from kvlib.engine.core import Engine
from kvlib.engine.request import SamplingParams
from kvlib.engine.trace import TraceRequest, VirtualClock
from kvlib.generate import generate, pad_prompts
from kvlib.transformer import Transformer


def serve_trace(engine: Engine, trace: list[TraceRequest], clock: VirtualClock) -> list[dict]:
    """Replay `trace` through `engine` (built with `clock=clock`); one record per request."""
    pending, ids = sorted(trace, key=lambda r: r.arrival), []
    i = 0
    while i < len(pending) or engine.has_unfinished():
        if not engine.has_unfinished() and i < len(pending):
            clock.jump(pending[i].arrival)  # idle: skip to the next arrival
        while i < len(pending) and pending[i].arrival <= clock.now:
            r = pending[i]
            params = SamplingParams(max_new_tokens=r.max_new_tokens)
            ids.append(engine.add_request(list(r.prompt), params, arrival=r.arrival))
            i += 1
        clock.start()
        engine.step()  # the engine stamps each token with clock() as it samples it
        clock.stop()
    return [
        dict(
            arrival=engine.requests[j].arrival,
            token_times=list(engine.requests[j].token_times),
            prompt=len(engine.requests[j].prompt),
            cached=engine.requests[j].num_cached,
        )
        for j in ids
    ]


def serve_static(
    model: Transformer, trace: list[TraceRequest], batch_size: int, clock: VirtualClock
) -> tuple[list[dict], list[tuple[float, int]]]:
    """Replay `trace` with static batches of up to `batch_size`; records and (time, slots held)."""
    pending = sorted(trace, key=lambda r: r.arrival)
    records, memory, i = [], [], 0
    while i < len(pending):
        clock.jump(pending[i].arrival)
        batch = []
        while i < len(pending) and len(batch) < batch_size and pending[i].arrival <= clock.now:
            batch.append(pending[i])
            i += 1
        tokens, mask = pad_prompts([list(r.prompt) for r in batch])  # (B, T) each
        n = max(r.max_new_tokens for r in batch)
        memory.append((clock.now, len(batch) * (tokens.shape[1] + n)))
        times: list[list[float]] = [[] for _ in batch]

        def stream(step: int, _tok: torch.Tensor, times=times, batch=batch) -> None:
            now = clock()
            for b, r in enumerate(batch):
                if step < r.max_new_tokens:
                    times[b].append(now)

        clock.start()
        generate(
            model, tokens.to(model.device), n, attention_mask=mask.to(model.device), stream=stream
        )
        clock.stop()
        memory.append((clock.now, 0))
        for r, t in zip(batch, times, strict=True):
            records.append(dict(arrival=r.arrival, token_times=t, prompt=len(r.prompt), cached=0))
    return records, memory
