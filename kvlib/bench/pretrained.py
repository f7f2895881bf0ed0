"""Section "pretrained": the shipped model (`kvlib.load_pretrained`) decoding with each cache.

Tokens/s with a contiguous, a paged and two quantized caches (int8, KIVI-4), and whether each
generated the same tokens as the contiguous cache. Skipped when no model is shipped.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvlib.bench.report import config_dict, fmt
from kvlib.bench.section import Settings
from kvlib.generate import generate
from kvlib.kv_cache import KVCache
from kvlib.paged import PagedKVCache
from kvlib.timing import interleaved, median


def bench_pretrained(
    device: torch.device,
    new_tokens: int,
    reps: int = 3,
    progress: Callable[[], None] | None = None,
) -> dict:
    """Decode tokens/s of the shipped model with a contiguous, paged and quantized cache."""
    try:
        from kvlib.pretrained import load_pretrained

        model, tokenizer = load_pretrained(device=device)
    except (ImportError, FileNotFoundError, ValueError) as err:
        return {"skipped": f"no shipped model: {err}"}
    prompt_ids = tokenizer.encode("The key and the value")
    prompt = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (B=1, T)
    n = min(new_tokens, model.config.max_seq_len - prompt.shape[1])
    S = prompt.shape[1] + n
    c = model.config
    makers: dict[str, Callable[[], object]] = {
        "contiguous": lambda: KVCache.from_config(c, 1, S, dtype=model.dtype, device=device),
        "paged": lambda: PagedKVCache.from_config(
            c, 1, num_blocks=-(-S // 16), block_size=16, dtype=model.dtype, device=device
        ),
    }
    try:
        from kvlib import quant

        R = 32
        S_q = -(-S // R) * R
        for name, scheme in (("int8", "int8 per-token"), ("KIVI-4", quant.kivi(4, residual=R))):
            makers[name] = lambda scheme=scheme: quant.QuantizedKVCache.from_config(
                c, 1, S_q, scheme, dtype=model.dtype, device=device
            )
    except ImportError:
        pass
    outs: dict[str, torch.Tensor] = {}

    def runner(name: str) -> Callable[[], None]:
        return lambda: outs.__setitem__(name, generate(model, prompt, n, cache=makers[name]()))

    times = interleaved({name: runner(name) for name in makers}, reps, device)
    med = {name: median(ts) for name, ts in times.items()}
    ref = outs["contiguous"]
    if progress:
        progress()
    return {
        "config": config_dict(c),
        "new_tokens": n,
        "tok_s": {name: n / t for name, t in med.items()},
        "vs_contiguous": {name: med["contiguous"] / t for name, t in med.items()},
        "tokens_equal_contiguous": {
            name: bool(torch.equal(out.cpu(), ref.cpu())) for name, out in outs.items()
        },
        "times_s": times,
    }


def run(quick: bool, settings: Settings) -> dict:
    """The section: 32 new tokens quick, 128 full."""
    return bench_pretrained(settings.device, 32 if quick else 128, settings.reps)


def format(figure: dict) -> list[str]:
    p = figure
    lines = ["\nshipped model, decode with each cache"]
    if "skipped" in p:
        return lines + [f"  skipped: {p['skipped']}"]
    for name, tps in p["tok_s"].items():
        lines.append(
            f"{name:>12} {fmt(tps):>10} tok/s  x{fmt(p['vs_contiguous'][name])} "
            f"tokens as contiguous: {p['tokens_equal_contiguous'][name]}"
        )
    return lines
