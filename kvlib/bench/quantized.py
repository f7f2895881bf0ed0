"""Section "quantized": does a quantized cache make decode faster? Measured side by side.

    python -m kvlib.bench --sections quantized [--quick]

1. Decode attention (one query token per kv-head group, one layer: B=1, K=8, G=4, D=128, as
   in Llama-3-8B) at S = 2k, 8k, 32k cached tokens, through each cache's `attend`: fp32
   contiguous (`KVCache`), int8 and FP8 (`QuantizedKVCache`, whose decode steps run the compiled
   loop of `kvlib.quant_kernel`). Bytes read per step and the GB/s they imply, against the
   machine's copy bandwidth.
2. Whole-model decode tokens/s for every cache at a long context. The model is chosen so the
   cache dominates what a step reads: 2 layers of C=1024 (H=K=8, D=128, no grouping, so every
   query head has its own cache) and a small vocabulary, about 21M weights (84 MB in fp32),
   against 16 KB of fp32 cache per token: at 16k tokens the cache is three quarters of the
   step's bytes (`kvlib.roofline`). The caches are filled with random keys and values (a
   prefill of 16k tokens would need the naive attention's 16k x 16k scores), then each timed
   step runs the model on one token and crops back.

Timings are medians of interleaved repetitions (`kvlib.timing.interleaved`), compared only as
ratios on the same machine; the report gives the load average. `run(quick)` returns the rows
(figure, metric, value, target, status) and the measurements; `--quick` runs small sizes.
"""

from __future__ import annotations

import os

import torch

from kvlib.bench.report import fmt, target
from kvlib.config import ModelConfig
from kvlib.kv_cache import KVCache
from kvlib.paged import PagedKVCache
from kvlib.paged_quant import PagedQuantKVCache
from kvlib.quant import SCHEMES, QuantizedKVCache
from kvlib.roofline import decode_step, matmul_params
from kvlib.timing import copy_bandwidth, interleaved, median
from kvlib.transformer import Transformer

K, G, D = 8, 4, 128  # one Llama-3-8B layer's kv heads, group and head dim
ATTENTION_CACHES = {
    "fp32": lambda S: KVCache(1, 1, K, D, S + 1),
    "int8": lambda S: QuantizedKVCache(1, 1, K, D, S + 1, "int8 per-token"),
    "FP8": lambda S: QuantizedKVCache(1, 1, K, D, S + 1, "FP8 per-head"),
}
MODEL = ModelConfig(
    vocab_size=256, dim=1024, n_layers=2, n_heads=8, n_kv_heads=8, ffn_dim=2048, max_seq_len=32768
)
BLOCK = 16  # tokens per block of the paged caches


def model_caches(S: int) -> dict:
    """name -> a cache of MODEL for one sequence of S + 1 tokens."""
    c, n_blocks = MODEL, -(-(S + 1) // BLOCK)
    R = 32
    return {
        "contiguous": lambda: KVCache.from_config(c, 1, S + 1),
        "paged": lambda: PagedKVCache.from_config(c, 1, num_blocks=n_blocks, block_size=BLOCK),
        "int8": lambda: QuantizedKVCache.from_config(c, 1, S + 1, "int8 per-token"),
        "FP8": lambda: QuantizedKVCache.from_config(c, 1, S + 1, "FP8 per-head"),
        "KIVI-4": lambda: QuantizedKVCache.from_config(c, 1, -(-(S + 1) // R) * R, "KIVI-4"),
        "paged+int8": lambda: PagedQuantKVCache.from_config(
            c, 1, num_blocks=n_blocks, block_size=BLOCK, scheme="int8 per-token"
        ),
    }


def stored_bytes(name: str, S: int, n_layers: int = 1) -> float:
    """Bytes a decode step reads from a cache of S tokens (K and V, K heads, D channels)."""
    per_token = {"fp32": 4 * D, "int8": D + 4, "FP8": D}  # one head: codes + per-token scale
    kind = {"contiguous": "fp32", "paged": "fp32", "paged+int8": "int8"}.get(name, name)
    if kind == "KIVI-4":
        per_token_kivi = SCHEMES["KIVI-4"].bytes_per_token(D)  # K and V together
        return n_layers * K * S * per_token_kivi
    return 2 * n_layers * K * S * per_token[kind]


def _fill(cache, S: int, n_layers: int, g: torch.Generator) -> None:
    for layer in range(n_layers):
        k, v = torch.randn(1, K, S, D, generator=g), torch.randn(1, K, S, D, generator=g)
        cache.update(layer, k, v)


def attention_times(sizes: list[int], reps: int) -> dict:
    """Median seconds of one decode attention step per cache and S."""
    out = {}
    g = torch.Generator().manual_seed(0)
    q, k1 = torch.randn(1, K * G, 1, D, generator=g), torch.randn(1, K, 1, D, generator=g)
    for S in sizes:
        caches = {name: make(S) for name, make in ATTENTION_CACHES.items()}
        for cache in caches.values():
            _fill(cache, S, 1, torch.Generator().manual_seed(S))

        def step(cache, S=S):
            def run():
                cache.attend(0, q, k1, k1, None)
                cache.crop(S)

            return run

        times = interleaved({n: step(c) for n, c in caches.items()}, reps, "cpu")
        out[S] = {name: median(ts) for name, ts in times.items()}
        del caches
    return out


def model_times(S: int, reps: int) -> dict:
    """Median seconds of one whole-model decode step per cache at S cached tokens."""
    torch.manual_seed(0)
    model = Transformer(MODEL).eval()
    caches = {name: make() for name, make in model_caches(S).items()}
    for cache in caches.values():
        _fill(cache, S, MODEL.n_layers, torch.Generator().manual_seed(1))
    x = torch.tensor([[1]])

    def step(cache):
        def run():
            with torch.no_grad():
                model(x, cache)
            cache.crop(S)

        return run

    times = interleaved({n: step(c) for n, c in caches.items()}, reps, "cpu")
    return {name: median(ts) for name, ts in times.items()}


def run(
    quick: bool = False,
    *,
    sizes: list[int] | None = None,
    S_model: int | None = None,
    reps: int | None = None,
) -> dict:
    """All figures, side by side: rows of (figure, metric, value, target, status).

    sizes (attention S), S_model (whole-model context) and reps default by `quick`."""
    sizes = sizes or ([2048, 8192] if quick else [2048, 8192, 32768])
    S_model = S_model or (4096 if quick else 16384)
    reps = reps or (3 if quick else 7)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # one core: the 2-core machine is shared, ratios stay comparable
    try:
        bw = copy_bandwidth("cpu", (32 if quick else 256) * 2**20, reps=reps)["bytes_per_s"]
        attn = attention_times(sizes, reps)
        model = model_times(S_model, reps)
    finally:
        torch.set_num_threads(previous)
    rows = []
    for S, t in attn.items():
        for name in ("int8", "FP8"):
            ratio = t[name] / t["fp32"]
            if S >= 8192:
                rows.append(
                    target(f"decode attention S={S}", f"{name} / fp32 time", ratio, "<=", 0.5)
                )
    ratio_int8 = model["contiguous"] / model["int8"]
    rows.append(
        target(f"model decode S={S_model}", "int8 / contiguous tokens/s", ratio_int8, ">=", 1.0)
    )
    paged_ratio = model["paged+int8"] / model["int8"]
    rows.append(
        target(f"model decode S={S_model}", "paged+int8 / int8 time", paged_ratio, "<=", 1.1)
    )
    attention = {
        S: {
            name: {
                "time_s": t[name],
                "vs_fp32": t[name] / t["fp32"],
                "bytes": stored_bytes(name, S),
                "GB_s": stored_bytes(name, S) / t[name] / 1e9,
                "of_copy_bandwidth": stored_bytes(name, S) / t[name] / bw,
            }
            for name in t
        }
        for S, t in attn.items()
    }
    step = decode_step(MODEL, 1, S_model, bandwidth=bw, peak_flops=1e12, weight_dtype=torch.float32)
    weight_bytes = matmul_params(MODEL) * 4
    whole = {
        name: {
            "time_s": t,
            "tokens_per_s": 1 / t,
            "vs_contiguous": model["contiguous"] / t,
            "bytes": weight_bytes + stored_bytes(name, S_model, MODEL.n_layers),
            "GB_s": (weight_bytes + stored_bytes(name, S_model, MODEL.n_layers)) / t / 1e9,
        }
        for name, t in model.items()
    }
    return {
        "quick": quick,
        "load_average": list(os.getloadavg()),
        "copy_bandwidth_GB_s": bw / 1e9,
        "attention": attention,
        "model": {"S": S_model, "kv_share_fp32": step.kv_share, "caches": whole},
        "rows": rows,
    }


def report(result: dict) -> list[str]:
    """The result as lines of text."""
    lines = [
        f"load average {result['load_average']}, copy bandwidth "
        f"{fmt(result['copy_bandwidth_GB_s'])} GB/s (1 thread)",
        "decode attention, B=1 K=8 G=4 D=128: time, vs fp32, MB read, GB/s",
    ]
    for S, row in result["attention"].items():
        for name, m in row.items():
            lines.append(
                f"  S={S:>6} {name:<5} {fmt(m['time_s'] * 1e3)} ms  x{fmt(m['vs_fp32'])}  "
                f"{fmt(m['bytes'] / 1e6)} MB  {fmt(m['GB_s'])} GB/s"
            )
    mod = result["model"]
    lines.append(
        f"whole-model decode at S={mod['S']} (cache {fmt(100 * mod['kv_share_fp32'])}% of an "
        "fp32 step's bytes): tokens/s, vs contiguous, GB/s"
    )
    for name, m in mod["caches"].items():
        lines.append(
            f"  {name:<11} {fmt(m['tokens_per_s'])} tok/s  x{fmt(m['vs_contiguous'])}  "
            f"{fmt(m['GB_s'])} GB/s"
        )
    for t in result["rows"]:
        lines.append(
            f"{t['status']:<4} {t['figure']}: {t['metric']} = {fmt(t['value'])} "
            f"(target {t['op']} {t['target']})"
        )
    return lines


def format(figure: dict) -> list[str]:
    """The section's lines of the bench report."""
    return ["", "quantized cache: decode attention and whole-model decode", *report(figure)]
