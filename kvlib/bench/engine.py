"""Section "engine": static vs continuous batching, contiguous vs paged, prefix caching.

`python -m kvlib.bench --sections engine [--quick]` replays ShareGPT-like traces (log-normal
lengths, Poisson arrivals; `kvlib.engine.trace`) at several request rates on the book's trained
model and on a larger random-init model where compute dominates, every contender with the same
KV memory budget (`budget_tokens` slots):

    static       batches of budget // max_len requests, padded, served to completion
    contiguous   the engine, each request reserving max_len slots at admission
    paged        the engine, blocks allocated as requests grow
    prefix       paged plus prefix caching, on a trace whose prompts share a system prompt
                 (against paged without it on the same trace)

It reports throughput, TTFT and TPOT (p50/p99) and the KV memory held over time, and checks two
targets: paged throughput >= 2x static at the highest rate, and prefix caching skipping >= 90%
of the shared prompt's prefill tokens while cutting TTFT. Replays run on a virtual clock (the
measured time of each forward pass; idle gaps skipped), and contenders take turns, so a busy
machine slows them alike.
"""

from __future__ import annotations

import torch

from kvlib.bench.report import fmt, format_targets, machine_info, target
from kvlib.bench.section import Settings
from kvlib.config import ModelConfig
from kvlib.engine.core import Engine
from kvlib.engine.replay import serve_static, serve_trace
from kvlib.engine.trace import VirtualClock, sharegpt_like, summarize
from kvlib.pretrained import load_pretrained
from kvlib.transformer import Transformer

BLOCK_SIZE = 16
MAX_PROMPT, MAX_OUTPUT = 128, 96
MAX_LEN = MAX_PROMPT + MAX_OUTPUT  # the longest request: what a contiguous slab reserves
SYSTEM_PROMPT = 96  # shared by every prompt of the prefix-caching trace (6 full blocks)


def large_config() -> ModelConfig:
    """A random-init model where the matrix products, not Python, take the time."""
    return ModelConfig(
        vocab_size=1024,
        dim=256,
        n_layers=8,
        n_heads=8,
        n_kv_heads=2,
        ffn_dim=704,
        max_seq_len=256,
        name="engine-bench-large",
    )


def _models(quick: bool) -> dict[str, Transformer]:
    book, _ = load_pretrained()
    torch.manual_seed(0)
    large = Transformer(large_config(), init_std=0.02).eval()
    return {"book": book, "large": large}


def _plan(quick: bool) -> dict:
    return dict(
        n_requests={"book": 24, "large": 12} if quick else {"book": 160, "large": 48},
        rates={"book": [400.0], "large": [100.0]}
        if quick
        else {"book": [25.0, 100.0, 400.0], "large": [2.0, 8.0, 100.0]},
        budget_tokens=4 * MAX_LEN,  # the KV memory every contender gets
    )


def _engine(model: Transformer, clock: VirtualClock, budget: int, **kw) -> Engine:
    return Engine(
        model,
        num_blocks=budget // BLOCK_SIZE,
        block_size=BLOCK_SIZE,
        max_num_tokens=256,
        max_num_seqs=64,
        clock=clock,
        **kw,
    )


def kv_over_time(samples: list[tuple[float, int]], points: int = 64) -> dict:
    """Peak and time-weighted mean of (time, slots held from then on) samples, and the series
    itself thinned to at most `points` samples (for a plot of memory over time)."""
    peak = max(m for _, m in samples)
    span = samples[-1][0] - samples[0][0]
    area = sum(m * (t1 - t0) for (t0, m), (t1, _) in zip(samples, samples[1:], strict=False))
    every = -(-len(samples) // points)
    series = [(round(t, 6), m) for t, m in samples[::every]]
    return dict(kv_peak=peak, kv_mean=area / span if span > 0 else float(peak), kv_series=series)


def _contender(name: str, model: Transformer, trace: list, budget: int) -> dict:
    clock = VirtualClock()
    if name == "static":
        records, memory = serve_static(model, trace, budget // MAX_LEN, clock)
        return summarize(records) | kv_over_time(memory) | dict(steps=None)
    kw = dict(
        contiguous=dict(reserve_tokens=MAX_LEN, prefix_cache=None),
        paged=dict(prefix_cache=None),
        prefix=dict(prefix_cache="hash"),
    )[name]
    engine = _engine(model, clock, budget, **kw)
    records = serve_trace(engine, trace, clock)
    # the blocks held after each step, from the step's end on
    held = [(0.0, 0)] + [(h["time"], h["blocks_used"] * BLOCK_SIZE) for h in engine.history]
    out = summarize(records) | kv_over_time(held) | dict(steps=engine.num_steps)
    # the first request must compute the shared prompt; every later one could skip it
    shared = SYSTEM_PROMPT * (len(records) - 1)
    out["shared_prefill_skipped"] = sum(min(r["cached"], SYSTEM_PROMPT) for r in records) / shared
    return out


def run(quick: bool, settings: Settings) -> dict:
    """The section: every contender on every model and rate, on the run's torch threads."""
    return measure(quick, settings.threads)


def measure(quick: bool = False, threads: int | None = None, command: str = "") -> dict:
    """Every contender on every model and rate; returns {rows, targets, machine, ...}."""
    if threads is not None:
        torch.set_num_threads(threads)
    plan, models = _plan(quick), _models(quick)
    budget, rows, targets = plan["budget_tokens"], [], []
    for mname, model in models.items():
        V, n = model.config.vocab_size, plan["n_requests"][mname]
        for rate in plan["rates"][mname]:
            trace = sharegpt_like(
                n, rate, vocab_size=V, max_prompt=MAX_PROMPT, max_output=MAX_OUTPUT
            )
            shared = sharegpt_like(
                n,
                rate,
                vocab_size=V,
                max_prompt=MAX_PROMPT,
                max_output=MAX_OUTPUT,
                system_prompt=SYSTEM_PROMPT,
                mean_prompt=24.0,
            )
            res = {}
            for name in ("static", "contiguous", "paged"):  # turns: the same machine state
                res[name] = _contender(name, model, trace, budget)
            res["paged_shared"] = _contender("paged", model, shared, budget)
            res["prefix"] = _contender("prefix", model, shared, budget)
            for name, r in res.items():
                rows.append(dict(model=mname, rate=rate, contender=name) | r)
        top = max(plan["rates"][mname])
        got = {r["contender"]: r for r in rows if r["model"] == mname and r["rate"] == top}
        speedup = got["paged"]["throughput"] / got["static"]["throughput"]
        targets.append(
            target(
                f"{mname} model",
                "paged / static throughput",
                speedup,
                ">=",
                2.0,
                f"rate {top}/s, KV budget {budget} tokens, {n} requests",
            )
        )
        targets.append(
            target(
                f"{mname} model",
                "shared prefill skipped",
                got["prefix"]["shared_prefill_skipped"],
                ">=",
                0.9,
                f"{SYSTEM_PROMPT}-token system prompt",
            )
        )
        ttft = got["prefix"]["ttft_p50"] / got["paged_shared"]["ttft_p50"]
        targets.append(
            target(f"{mname} model", "TTFT p50 with / without prefix caching", ttft, "<=", 0.8)
        )
    return dict(
        quick=quick,
        command=command,
        budget_tokens=budget,
        block_size=BLOCK_SIZE,
        rows=rows,
        targets=targets,
        machine=machine_info(torch.device("cpu"), torch.get_num_threads()),
    )


def format_report(result: dict) -> str:
    head = (
        f"{'model':<6} {'rate':>6} {'contender':<13} {'tok/s':>8} {'TTFT p50':>9} {'p99':>8} "
        f"{'TPOT p50':>9} {'p99':>8} {'KV peak':>8} {'KV mean':>8}"
    )
    lines = [f"serving on a KV budget of {result['budget_tokens']} tokens", head]
    for r in result["rows"]:
        lines.append(
            f"{r['model']:<6} {r['rate']:>6g} {r['contender']:<13} {fmt(r['throughput']):>8} "
            f"{fmt(r['ttft_p50']):>9} {fmt(r['ttft_p99']):>8} {fmt(r['tpot_p50']):>9} "
            f"{fmt(r['tpot_p99']):>8} {r['kv_peak']:>8} {fmt(r['kv_mean']):>8}"
        )
    if result["targets"]:
        lines += format_targets(result["targets"])
    return "\n".join(lines)


def format(figure: dict) -> list[str]:
    """The section's lines of the bench report (targets are in the run's table)."""
    return ["", *format_report(figure | {"targets": []}).splitlines()]
