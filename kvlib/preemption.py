"""Preemption on a real paged cache: greedy decoding of a batch whose pool may run dry.

`generate_paged` runs a model on a `kvlib.paged.PagedKVCache` too small for all its rows at
once. When a step raises `OutOfBlocksError` (which writes nothing), the most recently started
row is preempted, by swapping its blocks to CPU memory or by dropping them and recomputing
its keys and values from its tokens when it resumes, and the step is retried. It records what
happened as `Event`s. Chapter 5 shows both ways give the tokens of an uninterrupted run;
chapter A's engine (`kvlib.engine`) does this for requests that arrive over time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlib.errors import KVLibValueError, OutOfBlocksError, check_int

PREEMPT_MODES = ("swap", "recompute")


@dataclass(frozen=True)
class Event:
    """One scheduling event of `generate_paged`: what happened to which row, at which step."""

    step: int
    kind: str  # "preempt", "resume" or "finish"
    row: int  # the prompt's row in the batch
    blocks: int  # preempt/resume: blocks released/taken; finish: blocks free afterwards
    recomputed: int = 0  # resume by recompute: tokens prefilled again

    def __str__(self) -> str:
        if self.kind == "finish":
            return f"step {self.step:2d}: row {self.row} finished, blocks free: {self.blocks}"
        what = {"preempt": "preempted, releasing", "resume": "resumed, taking"}[self.kind]
        redo = f", {self.recomputed} tokens recomputed" if self.recomputed else ""
        return f"step {self.step:2d}: row {self.row} {what} {self.blocks} blocks{redo}"


def generate_paged(
    model, cache, prompts: torch.Tensor, n_new: int, *, preempt: str = "swap"
) -> tuple[torch.Tensor, list[Event]]:
    """Greedy decoding of `prompts` (B, T) on a paged cache that may be too small for all rows.

    `cache` is a fresh `kvlib.paged.PagedKVCache` with `batch_size` B. Every step runs the
    rows in the batch; when a step raises `OutOfBlocksError` (which writes nothing), the most
    recently started row is preempted and the step retried. "swap" copies its blocks to CPU
    memory and back; "recompute" drops them and, on resumption, prefills the row's tokens again
    (vLLM V1's only way). A row resumes as soon as its blocks fit with one free block per running
    row to spare. Returns the (B, T + n_new) tokens and the events, in order.
    """
    if preempt not in PREEMPT_MODES:
        raise KVLibValueError(f"preempt must be one of {PREEMPT_MODES}, got {preempt!r}")
    check_int("n_new", n_new)
    B = prompts.shape[0]
    seq_of = dict(enumerate(cache.active))  # row -> sequence id in the cache
    with torch.inference_mode():
        first = model(prompts, cache)[:, -1].argmax(-1)  # (B,) prefill, all rows at once
    out = [prompts[b].tolist() + [int(first[b])] for b in range(B)]
    done_len = prompts.shape[1] + n_new
    running, paused, events, step = list(range(B)), [], [], 0
    while running or paused:
        step += 1
        if running:
            cache.set_active([seq_of[b] for b in running])
            last = torch.tensor([out[b][-1] for b in running], device=prompts.device)  # (B,)
            try:
                with torch.inference_mode():
                    nxt = model(last[:, None], cache)[:, -1].argmax(-1)  # (B,)
            except OutOfBlocksError:
                victim = running.pop()  # the most recently started row
                if running:
                    cache.set_active([seq_of[b] for b in running])
                n_blocks = len(cache.block_table(seq_of[victim]))
                if not running:  # the last row cannot grow on its own: nothing can run
                    raise
                if preempt == "swap":
                    cache.swap_out(seq_of[victim])
                else:
                    cache.free_sequence(seq_of[victim])
                paused.append(victim)
                events.append(Event(step, "preempt", victim, n_blocks))
                continue
            for b, t in zip(running, nxt.tolist(), strict=True):
                out[b].append(t)
            for b in [b for b in running if len(out[b]) == done_len]:
                running.remove(b)
                if running:
                    cache.set_active([seq_of[r] for r in running])
                    cache.free_sequence(seq_of[b])
                else:
                    cache.reset()  # b is the last active row: empty it, releasing its blocks
                events.append(Event(step, "finish", b, cache.allocator.num_free))
        for b in list(paused):
            cached = len(out[b]) - 1  # every token but the last, which the next step feeds
            need = -(-cached // cache.block_size)
            if cache.allocator.num_free < need + len(running):  # room to return and to grow
                continue
            redo = 0
            if preempt == "swap":
                cache.swap_in(seq_of[b])
            else:
                seq_of[b] = cache.add_sequence()
                cache.set_active([seq_of[b]])
                with torch.inference_mode():
                    model(torch.tensor([out[b][:-1]], device=prompts.device), cache)  # (1, T)
                redo = cached
            paused.remove(b)
            running.append(b)
            events.append(Event(step, "resume", b, need, redo))
    return torch.tensor(out, device=prompts.device), events
