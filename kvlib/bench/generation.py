"""Section "generation": cached vs uncached greedy generation, tokens/s vs tokens generated.

Without a cache every step re-reads the whole prefix (O(n^2) work for n tokens); with one,
each step attends over the cached keys (O(n)). Target: cached >= 20x uncached at 1024 tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvlib.bench.problems import generation_config
from kvlib.bench.report import config_dict, fmt, target
from kvlib.bench.section import Settings
from kvlib.errors import BenchError, check_int
from kvlib.generate import generate
from kvlib.timing import interleaved, median
from kvlib.transformer import Transformer

SPEEDUP_TARGET = 20.0  # cached >= this x uncached ...
TARGET_TOKENS = 1024  # ... at this many generated tokens
PROMPT_LEN = 16


def bench_generation(
    device: torch.device,
    n_tokens: list[int],
    reps: int = 3,
    prompt_len: int = PROMPT_LEN,
    progress: Callable[[], None] | None = None,
) -> dict:
    """Greedy tokens/s with and without the KV cache for each number of generated tokens."""
    if not n_tokens:
        raise BenchError("n_tokens must name at least one number of tokens to generate")
    for n in n_tokens:
        check_int("n_tokens", n, error=BenchError)
    config = generation_config(max(n_tokens), prompt_len)
    torch.manual_seed(0)
    model = Transformer(config).to(device).eval()
    prompt = torch.randint(0, config.vocab_size, (1, prompt_len), device=device)  # (B, T)
    rows = []
    results: dict[str, torch.Tensor] = {}  # the last tokens each path generated
    for n in n_tokens:

        def run_once(use_cache: bool, n: int = n) -> None:
            results[str(use_cache)] = generate(model, prompt, n, use_cache=use_cache)

        # the uncached reference costs O(n^2): half the repetitions at the largest size, and
        # only the first size warms up (the code paths are warm after it)
        r = reps if n < max(n_tokens) else max(reps // 2, 1)
        fns = {"cached": lambda: run_once(True), "uncached": lambda: run_once(False)}
        times = interleaved(fns, r, device, warmup=1 if n == n_tokens[0] else 0)
        cached, uncached = median(times["cached"]), median(times["uncached"])
        rows.append(
            {
                "new_tokens": n,
                "cached_tok_s": n / cached,
                "uncached_tok_s": n / uncached,
                "speedup": uncached / cached,
                "tokens_equal": bool(torch.equal(results["True"], results["False"])),
                "reps": r,
                "cached_s": times["cached"],
                "uncached_s": times["uncached"],
            }
        )
        if progress:
            progress()
    return {"config": config_dict(config), "prompt_len": prompt_len, "rows": rows}


def run(quick: bool, settings: Settings) -> dict:
    """The section: 16 to 128 tokens quick, 16 to 1024 full; the target at the largest."""
    n_tokens = [16, 64, 128] if quick else [16, 64, 256, TARGET_TOKENS]
    figure = bench_generation(settings.device, n_tokens, settings.reps, PROMPT_LEN)
    last = figure["rows"][-1]
    note = f"target is set for {TARGET_TOKENS} tokens" if last["new_tokens"] < TARGET_TOKENS else ""
    figure["targets"] = [
        target(
            "cached vs uncached generation",
            f"speedup at {last['new_tokens']} tokens",
            last["speedup"],
            ">=",
            SPEEDUP_TARGET,
            note,
        )
    ]
    return figure


def format(figure: dict) -> list[str]:
    lines = ["\ncached vs uncached greedy generation (tokens/s)"]
    lines.append(f"{'new tokens':>10} {'cached':>10} {'uncached':>10} {'speedup':>8} equal")
    for r in figure["rows"]:
        lines.append(
            f"{r['new_tokens']:>10} {fmt(r['cached_tok_s']):>10} "
            f"{fmt(r['uncached_tok_s']):>10} {fmt(r['speedup']):>8} {r['tokens_equal']}"
        )
    return lines
