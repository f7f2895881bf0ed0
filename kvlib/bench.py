"""Every optimization in kvlib measured side by side: `python -m kvlib.bench`.

One run measures, on one device and one thread count:

    generation   cached vs uncached greedy generation, tokens/s vs tokens generated
    hf           kvlib `generate` vs Hugging Face `generate` on the same random-init Llama
                 (weights copied with `kvlib.hf.from_hf_llama`), identical tokens checked
    paged        decode attention: contiguous `attention` vs `paged_attention` (gather, blocks)
    bandwidth    decode attention's K/V bytes read per second vs a large tensor copy
    memory       bytes per token and sequences that fit a memory budget, per cache strategy,
                 from the cache objects' own `nbytes_allocated` / `nbytes_used`
    pretrained   the shipped model (`kvlib.load_pretrained`) decoding with each cache (if shipped)

Timing rules: every contender runs once to warm up, then the contenders take turns
(interleaved repetitions, the order rotated each round) and the median wins; on CUDA the
device is synchronized before and after each timed call. Ratios compare medians of the same
run, so a busy machine slows both sides. Each figure has a target, printed PASS or MISS.

Tensor layout of the attention inputs, as everywhere in kvlib:
    q: (B, H, T, D)   k, v: (B, K, S, D)   pool: (num_blocks, K, block_size, D)

`run(quick=True)` returns the whole result as a dict (chapter 8 plots it); `main` prints a
table and writes JSON (machine, versions, date, command) to --out.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from kvlib.attention import attention
from kvlib.cache import KVCache
from kvlib.config import ModelConfig, tiny
from kvlib.generate import generate
from kvlib.paged import BlockAllocator, PagedKVCache, paged_attention
from kvlib.timing import (
    BenchError,
    copy_bandwidth,
    fmt,
    format_targets,
    interleaved,
    machine_info,
    median,
    resolve_device,
    target,
    versions,
)
from kvlib.transformer import Transformer

SCHEMA = "kvlib.bench/1"
DEFAULT_OUT = Path("_build") / "bench" / "bench.json"
DEFAULT_GPU_OUT = DEFAULT_OUT.with_name("gpu.json")  # python -m kvlib.bench --gpu
SECTIONS = ("generation", "hf", "paged", "bandwidth", "memory", "pretrained")
PAGED_BLOCK_SIZES = (16, 128)  # kvlib's default block, and a large one (fewer, longer visits)
PAGED_TARGET = "paged_fused"  # the path the paged target is for: reads blocks in place (CPU)
PAGED_RATIO_TARGET = 1.3  # paged decode attention time <= this x contiguous
# kvlib's generate at least as fast as Hugging Face's on a 125M-class model, where the model's
# own work dominates; on the tiny preset the figure is printed without a target (per-step Python
# overhead decides it, not the cache)
HF_SPEEDUP_TARGETS = {"125m": 1.0}
GROUPED_TOKENS = 512  # "blocks" with blocks_per_step: visit this many tokens' blocks per step


# ---- models ------------------------------------------------------------------------------------


def generation_config(max_new_tokens: int, prompt_len: int = 16) -> ModelConfig:
    """A small GQA model whose max_seq_len admits prompt + max_new_tokens (for cached/uncached)."""
    return ModelConfig(
        vocab_size=512,
        dim=128,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=prompt_len + max_new_tokens,
        name="bench-small",
    )


def hf_fields(config: ModelConfig) -> dict:
    """The `transformers.LlamaConfig` fields of a kvlib `ModelConfig` (same shapes)."""
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.dim,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        intermediate_size=config.ffn_dim,
        max_position_embeddings=config.max_seq_len,
        rope_theta=config.rope_theta,
        rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings,
    )


HF_CONFIGS: dict[str, dict] = {
    # kvlib's tiny preset: per-step overhead dominates, so the decode loop itself is measured
    "tiny": hf_fields(tiny()),
    # a 125M-class model (GPT-2 small / Llama shapes, GQA): matmuls dominate
    "125m": hf_fields(
        ModelConfig(
            vocab_size=32000,
            dim=768,
            n_layers=12,
            n_heads=12,
            n_kv_heads=4,
            ffn_dim=2048,
            max_seq_len=512,
            name="125m",
        )
    ),
}


def _hf_llama(fields: dict, seed: int, attn_implementation: str | None):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**fields, bos_token_id=None, eos_token_id=None)
    model = transformers.LlamaForCausalLM(cfg).eval()
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


# ---- figure 1: cached vs uncached generation ---------------------------------------------------


def bench_generation(
    device: torch.device,
    n_tokens: list[int],
    reps: int = 3,
    prompt_len: int = 16,
    progress: Callable[[], None] | None = None,
) -> dict:
    """Greedy tokens/s with and without the KV cache for each number of generated tokens."""
    if not n_tokens or any(not isinstance(n, int) or n < 1 for n in n_tokens):
        raise BenchError(f"n_tokens must be a non-empty list of ints >= 1, got {n_tokens!r}")
    config = generation_config(max(n_tokens), prompt_len)
    torch.manual_seed(0)
    model = Transformer(config).to(device).eval()
    prompt = torch.randint(0, config.vocab_size, (1, prompt_len), device=device)  # (B, T)
    rows = []
    results: dict[str, torch.Tensor] = {}  # the last tokens each path generated
    for n in n_tokens:

        def run(use_cache: bool, n: int = n) -> None:
            results[str(use_cache)] = generate(model, prompt, n, use_cache=use_cache)

        # the uncached reference costs O(n^2): half the repetitions at the largest size, and
        # only the first size warms up (the code paths are warm after it)
        r = reps if n < max(n_tokens) else max(reps // 2, 1)
        fns = {"cached": lambda: run(True), "uncached": lambda: run(False)}
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
    return {"config": _config_dict(config), "prompt_len": prompt_len, "rows": rows}


# ---- figure 2: kvlib vs Hugging Face -----------------------------------------------------------


def bench_hf(
    device: torch.device,
    config_name: str,
    new_tokens: int,
    reps: int = 3,
    prompt_len: int = 16,
    progress: Callable[[], None] | None = None,
) -> dict:
    """kvlib `generate` vs HF `generate` (default attention, and sdpa/eager), same weights."""
    if config_name not in HF_CONFIGS:
        raise BenchError(f"unknown HF config {config_name!r}; known: {sorted(HF_CONFIGS)}")
    try:
        import transformers
    except ImportError:
        return {"skipped": "transformers is not installed"}
    fields = HF_CONFIGS[config_name]
    hf_default = _hf_llama(fields, seed=0, attn_implementation=None).to(device)
    default_impl = hf_default.config._attn_implementation
    impls = {f"hf_{default_impl}": hf_default}
    for other in ("sdpa", "eager"):
        if other != default_impl:
            m = _hf_llama(fields, seed=0, attn_implementation=other).to(device)
            m.load_state_dict(hf_default.state_dict())
            impls[f"hf_{other}"] = m
    from kvlib.hf import from_hf_llama

    model = from_hf_llama(hf_default)  # the same weights, on the same device
    torch.manual_seed(1)
    prompt = torch.randint(0, fields["vocab_size"], (1, prompt_len), device=device)  # (B, T)
    outputs: dict[str, torch.Tensor] = {}

    def kv() -> None:
        outputs["kvlib"] = generate(model, prompt, new_tokens)

    def hf_fn(name: str, m) -> Callable[[], None]:
        def call() -> None:
            with torch.inference_mode():
                outputs[name] = m.generate(
                    prompt,
                    attention_mask=torch.ones_like(prompt),
                    max_new_tokens=new_tokens,
                    do_sample=False,
                )

        return call

    fns = {"kvlib": kv} | {name: hf_fn(name, m) for name, m in impls.items()}
    times = interleaved(fns, reps, device)
    med = {name: median(ts) for name, ts in times.items()}
    equal = {
        name: bool(
            outputs[name].shape == outputs["kvlib"].shape
            and torch.equal(outputs[name].cpu(), outputs["kvlib"].cpu())
        )
        for name in impls
    }
    if progress:
        progress()
    return {
        "config": config_name,
        "hf_config": fields,
        "n_params": model.config.n_params,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "default_attn": default_impl,
        "transformers": transformers.__version__,
        "tok_s": {name: new_tokens / t for name, t in med.items()},
        "speedup": {name: med[name] / med["kvlib"] for name in impls},
        "tokens_equal": equal,
        "times_s": times,
    }


# ---- figure 3: paged vs contiguous decode attention ---------------------------------------------


def _decode_problem(
    B: int, H: int, K: int, S: int, D: int, dtype: torch.dtype, device: torch.device, seed: int
):
    """A decode step: q (B, H, 1, D), contiguous k, v (B, K, S, D), and the same K/V in a pool."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, 1, D, generator=g).to(device=device, dtype=dtype)  # (B, H, T=1, D)
    k = torch.randn(B, K, S, D, generator=g).to(device=device, dtype=dtype)  # (B, K, S, D)
    v = torch.randn(B, K, S, D, generator=g).to(device=device, dtype=dtype)  # (B, K, S, D)
    return q, k, v


def _paged_copy(k: torch.Tensor, v: torch.Tensor, block_size: int, seed: int):
    """Put k, v (B, K, S, D) into a pool of shuffled blocks; return (pool, tables, seq_lens)."""
    B, K, S, D = k.shape
    M = -(-S // block_size)
    pool = BlockAllocator(
        1, B * M, block_size, K, D, dtype=k.dtype, device=k.device
    )  # one layer is enough
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(B * M, generator=g).reshape(B, M)  # (B, M) scattered blocks
    pad = M * block_size - S
    kp = torch.nn.functional.pad(k, (0, 0, 0, pad))  # (B, K, M*P, D)
    vp = torch.nn.functional.pad(v, (0, 0, 0, pad))  # (B, K, M*P, D)
    kb = kp.reshape(B, K, M, block_size, D).permute(0, 2, 1, 3, 4)  # (B, M, K, P, D)
    vb = vp.reshape(B, K, M, block_size, D).permute(0, 2, 1, 3, 4)  # (B, M, K, P, D)
    flat = ids.reshape(-1).to(k.device)  # (B*M,)
    pool.k_pool[0][flat] = kb.reshape(B * M, K, block_size, D)
    pool.v_pool[0][flat] = vb.reshape(B * M, K, block_size, D)
    seq_lens = torch.full((B,), S, dtype=torch.long, device=k.device)  # (B,)
    return pool, ids.to(k.device), seq_lens


def bench_paged(
    device: torch.device,
    S: int,
    B: int = 4,
    H: int = 8,
    K: int = 2,
    D: int = 64,
    block_size: int = 16,
    reps: int = 5,
    dtype: torch.dtype = torch.float32,
    threads: int | None = None,
    progress: Callable[[], None] | None = None,
) -> dict:
    """Time of one decode attention (T=1) over S cached tokens: contiguous vs paged paths.

    paged_fused (kvlib.paged_kernel) runs only on the CPU in float32. threads: torch CPU
    threads for this figure (default: as set); restored afterwards.
    """
    q, k, v = _decode_problem(B, H, K, S, D, dtype, device, seed=0)
    pool, tables, seq_lens = _paged_copy(k, v, block_size, seed=1)
    per_step = max(GROUPED_TOKENS // block_size, 1)  # blocks visited per step when grouped
    methods = {
        "paged_gather": {"method": "gather"},
        "paged_blocks": {"method": "blocks"},
        "paged_blocks_grouped": {"method": "blocks", "blocks_per_step": per_step},
    }
    if device.type == "cpu" and dtype == torch.float32:
        methods["paged_fused"] = {"method": "fused"}
    outs: dict[str, torch.Tensor] = {}

    def contender(name: str) -> Callable[[], None]:
        if name == "contiguous":
            return lambda: outs.__setitem__(name, attention(q, k, v))
        kw = methods[name]
        return lambda: outs.__setitem__(name, paged_attention(q, pool, tables, seq_lens, 0, **kw))

    previous = torch.get_num_threads()
    torch.set_num_threads(previous if threads is None else threads)
    try:
        fns = {name: contender(name) for name in ("contiguous", *methods)}
        times = interleaved(fns, reps, device)
    finally:
        torch.set_num_threads(previous)
    med = {name: median(ts) for name, ts in times.items()}
    max_diff = {
        name: float((outs[name].float() - outs["contiguous"].float()).abs().max())
        for name in methods
    }
    if progress:
        progress()
    return {
        "shape": {"B": B, "H": H, "K": K, "S": S, "D": D, "block_size": block_size},
        "dtype": str(dtype),
        "threads": torch.get_num_threads() if threads is None else threads,
        "median_s": med,
        "ratio": {name: med[name] / med["contiguous"] for name in methods},
        "blocks_per_step_grouped": per_step,
        "max_abs_diff": max_diff,
        "times_s": times,
    }


# ---- figure 4: decode attention bandwidth ------------------------------------------------------


def bench_bandwidth(
    device: torch.device,
    kv_bytes: int,
    B: int = 4,
    H: int = 32,
    K: int = 8,
    D: int = 128,
    reps: int = 5,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[], None] | None = None,
) -> dict:
    """Decode attention's achieved bandwidth (K/V bytes read / s) as a fraction of copy's."""
    el = torch.empty((), dtype=dtype).element_size()
    S = max(kv_bytes // (2 * B * K * D * el), 1)
    q, k, v = _decode_problem(B, H, K, S, D, dtype, device, seed=2)
    t_attn = median(interleaved({"attn": lambda: attention(q, k, v)}, reps, device)["attn"])
    read = 2 * B * K * S * D * el  # every key and value read once
    copy = copy_bandwidth(device, read, reps)
    attn_bw = read / t_attn
    if progress:
        progress()
    return {
        "shape": {"B": B, "H": H, "K": K, "S": S, "D": D},
        "dtype": str(dtype),
        "kv_bytes_read": read,
        "attention_s": t_attn,
        "attention_bytes_per_s": attn_bw,
        "copy": copy,
        "fraction_of_copy": attn_bw / copy["bytes_per_s"],
        "note": "copy bandwidth counts bytes read + written; attention counts K/V bytes read",
    }


# ---- figure 5: memory per strategy -------------------------------------------------------------


def _fill(cache, n_tokens: int, K: int, D: int, dtype: torch.dtype, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for layer in range(cache.n_layers):
        k = torch.randn(1, K, n_tokens, D, generator=g).to(dtype)  # (B=1, K, T, D)
        v = torch.randn(1, K, n_tokens, D, generator=g).to(dtype)  # (B=1, K, T, D)
        cache.update(layer, k, v)


def bench_memory(
    config: ModelConfig,
    budget_bytes: int,
    lengths: list[int],
    block_size: int = 16,
    dtype: torch.dtype = torch.float16,
    progress: Callable[[], None] | None = None,
) -> dict:
    """Bytes per token and sequences fitting `budget_bytes` for each cache strategy.

    Each sequence of the workload (`lengths`, tokens each) is written into a fresh cache and
    measured with the cache's own accounting. Contiguous reserves config.max_seq_len slots per
    sequence (nbytes_allocated); paged holds whole blocks (nbytes_allocated); quantized caches
    count what their codes, scales and residuals take (nbytes_used), as a pool of quantized
    blocks would hold them.
    """
    if not lengths or max(lengths) > config.max_seq_len or min(lengths) < 1:
        raise BenchError(
            f"lengths must be in [1, {config.max_seq_len}] (config.max_seq_len), got "
            f"{min(lengths, default=None)}..{max(lengths, default=None)}"
        )
    K, D, S_max = config.n_kv_heads, config.head_dim, config.max_seq_len

    def contiguous(n: int) -> tuple[int, int]:
        c = KVCache.from_config(config, 1, S_max, dtype=dtype)
        _fill(c, n, K, D, dtype, n)
        return c.nbytes_allocated, c.nbytes_used

    def paged(n: int) -> tuple[int, int]:
        c = PagedKVCache.from_config(
            config, 1, num_blocks=-(-n // block_size), block_size=block_size, dtype=dtype
        )
        _fill(c, n, K, D, dtype, n)
        return c.nbytes_allocated, c.nbytes_used

    strategies: dict[str, Callable[[int], tuple[int, int]]] = {
        "contiguous (max-length reservation)": contiguous,
        f"paged (block {block_size})": paged,
    }
    try:
        from kvlib import quant
    except ImportError:  # the quantized cache is optional
        quant = None
    if quant is not None:
        R = 32 if S_max % 32 == 0 else 0
        schemes = {"int8": quant.SCHEMES["int8 per-token"], "int4": quant.SCHEMES["int4 per-token"]}
        if R:
            schemes["KIVI-4"] = quant.kivi(4, residual=R)
            schemes["KIVI-2"] = quant.kivi(2, residual=R)

        def quantized(scheme) -> Callable[[int], tuple[int, int]]:
            def measure(n: int) -> tuple[int, int]:
                c = quant.QuantizedKVCache.from_config(config, 1, S_max, scheme, dtype=dtype)
                _fill(c, n, K, D, dtype, n)
                return c.nbytes_used, c.nbytes_used

            return measure

        for name, scheme in schemes.items():
            strategies[f"{name} ({scheme.label()})"] = quantized(scheme)

    rows = []
    total_tokens = sum(lengths)
    for name, measure in strategies.items():
        held = [measure(n) for n in lengths]  # (bytes held, bytes used) per sequence
        per_seq = sum(h for h, _ in held) / len(lengths)
        rows.append(
            {
                "strategy": name,
                "bytes_per_token": sum(h for h, _ in held) / total_tokens,
                "bytes_per_token_used": sum(u for _, u in held) / total_tokens,
                "bytes_per_sequence": per_seq,
                "sequences_in_budget": int(budget_bytes // per_seq),
            }
        )
        if progress:
            progress()
    base = rows[0]["sequences_in_budget"]
    for row in rows:
        row["vs_contiguous"] = row["sequences_in_budget"] / base if base else math.inf
    return {
        "config": _config_dict(config),
        "dtype": str(dtype),
        "budget_bytes": budget_bytes,
        "lengths": {"n": len(lengths), "mean": total_tokens / len(lengths), "max": max(lengths)},
        "rows": rows,
    }


# ---- the shipped model -------------------------------------------------------------------------


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
        "config": _config_dict(c),
        "new_tokens": n,
        "tok_s": {name: n / t for name, t in med.items()},
        "vs_contiguous": {name: med["contiguous"] / t for name, t in med.items()},
        "tokens_equal_contiguous": {
            name: bool(torch.equal(out.cpu(), ref.cpu())) for name, out in outs.items()
        },
        "times_s": times,
    }


# ---- the run -----------------------------------------------------------------------------------


def _config_dict(config: ModelConfig) -> dict:
    return {
        "vocab_size": config.vocab_size,
        "dim": config.dim,
        "n_layers": config.n_layers,
        "n_heads": config.n_heads,
        "n_kv_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "max_seq_len": config.max_seq_len,
        "n_params": config.n_params,
    }


def _plan(quick: bool) -> dict:
    """Sizes of each section: quick (under a minute on 2 cores) or full."""
    if quick:
        return {
            "reps": 3,
            "gen_tokens": [16, 64, 128],
            "hf": [("tiny", 32)],
            "paged_S": 512,
            "bandwidth_bytes": 32 * 2**20,
            "memory_config": generation_config(1008, 16).replace(name="bench-memory"),
            "memory_n": 16,
            "pretrained_tokens": 32,
        }
    return {
        "reps": 5,
        "gen_tokens": [16, 64, 256, 1024],
        "hf": [("tiny", 64), ("125m", 32)],
        "paged_S": 2048,
        "bandwidth_bytes": 256 * 2**20,
        "memory_config": ModelConfig(
            vocab_size=32000,
            dim=768,
            n_layers=12,
            n_heads=12,
            n_kv_heads=4,
            ffn_dim=2048,
            max_seq_len=2048,
            name="125m",
        ),
        "memory_n": 64,
        "pretrained_tokens": 128,
    }


def run(
    quick: bool = False,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    sections: Iterable[str] | None = None,
    quiet: bool = True,
    reps: int | None = None,
    command: str | None = None,
) -> dict:
    """Run the benchmark; return every measurement, the targets with PASS/MISS, and metadata.

    sections: a subset of SECTIONS (default all). threads: torch CPU threads (default: all
    cores). reps: timed repetitions per contender (default 3 quick, 5 full). command: what to
    record as the command that ran (default: this call, spelled out).
    """
    dev = resolve_device(device)
    sections = list(SECTIONS if sections is None else sections)
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise BenchError(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    if threads is None:
        threads = os.cpu_count() or 1
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise BenchError(f"threads must be an int >= 1, got {threads!r}")
    plan = _plan(quick)
    reps = plan["reps"] if reps is None else reps
    if not isinstance(reps, int) or isinstance(reps, bool) or reps < 1:
        raise BenchError(f"reps must be an int >= 1, got {reps!r}")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    steps = {
        "generation": len(plan["gen_tokens"]),
        "hf": len(plan["hf"]),
        "paged": 1,
        "bandwidth": 1,
        "memory": 4 + 2,
        "pretrained": 1,
    }
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(steps[s] for s in sections), disable=quiet, desc="kvlib.bench")
    tick = bar.update
    result: dict = {
        "schema": SCHEMA,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": command
        or f"kvlib.bench.run(quick={quick}, device={str(dev)!r}, threads={threads}, "
        f"sections={sections}, reps={reps})",
        "machine": machine_info(dev, threads),
        "versions": versions(),
        "settings": {"quick": quick, "reps": reps, "device": str(dev), "threads": threads},
        "figures": {},
        "targets": [],
    }
    figs, targets = result["figures"], result["targets"]
    t_start = time.perf_counter()
    try:
        with torch.inference_mode():
            if "generation" in sections:
                bar.set_postfix_str("cached vs uncached")
                g = figs["generation"] = bench_generation(dev, plan["gen_tokens"], reps, 16, tick)
                last = g["rows"][-1]
                targets.append(
                    target(
                        "cached vs uncached generation",
                        f"speedup at {last['new_tokens']} tokens",
                        last["speedup"],
                        ">=",
                        20.0,
                        "target is set for 1024 tokens" if last["new_tokens"] < 1024 else "",
                    )
                )
            if "hf" in sections:
                figs["hf"] = {}
                for name, n in plan["hf"]:
                    bar.set_postfix_str(f"vs transformers ({name})")
                    h = figs["hf"][name] = bench_hf(dev, name, n, reps, 16, tick)
                    if "skipped" in h or name not in HF_SPEEDUP_TARGETS:
                        continue
                    for impl, ratio in h["speedup"].items():
                        same = "tokens identical" if h["tokens_equal"][impl] else "TOKENS DIFFER"
                        targets.append(
                            target(
                                f"kvlib vs HF generate ({name})",
                                f"speedup over {impl}",
                                ratio,
                                ">=",
                                HF_SPEEDUP_TARGETS[name],
                                same,
                            )
                        )
            if "paged" in sections:
                bar.set_postfix_str("paged attention")
                figs["paged"] = {}
                for P in PAGED_BLOCK_SIZES:
                    # one thread: torch's OpenMP pool and Numba's are separate pools, and on
                    # few cores they contend; the figure is about the layout, not the pools
                    p = figs["paged"][str(P)] = bench_paged(
                        dev, plan["paged_S"], block_size=P, reps=reps, threads=1
                    )
                    name = PAGED_TARGET if PAGED_TARGET in p["ratio"] else "paged_gather"
                    targets.append(
                        target(
                            "paged vs contiguous decode attention",
                            f"{name} (block {P}, 1 thread) time / contiguous",
                            p["ratio"][name],
                            "<=",
                            PAGED_RATIO_TARGET,
                            "" if name == PAGED_TARGET else "no fused paged path on this device",
                        )
                    )
                    if threads > 1:
                        figs["paged"][f"{P}, {threads} threads"] = bench_paged(
                            dev, plan["paged_S"], block_size=P, reps=reps, threads=threads
                        )
                tick()
            if "bandwidth" in sections:
                bar.set_postfix_str("bandwidth")
                b = figs["bandwidth"] = bench_bandwidth(
                    dev, plan["bandwidth_bytes"], reps=reps, progress=tick
                )
                targets.append(
                    target(
                        "decode attention bandwidth",
                        "fraction of copy bandwidth",
                        b["fraction_of_copy"],
                        ">=",
                        0.5,
                    )
                )
            if "memory" in sections:
                bar.set_postfix_str("memory")
                cfg = plan["memory_config"]
                g = torch.Generator().manual_seed(0)
                lengths = torch.randint(
                    32, cfg.max_seq_len + 1, (plan["memory_n"],), generator=g
                ).tolist()
                figs["memory"] = bench_memory(cfg, 2**30, lengths, progress=tick)
            if "pretrained" in sections:
                bar.set_postfix_str("shipped model")
                figs["pretrained"] = bench_pretrained(dev, plan["pretrained_tokens"], reps, tick)
    finally:
        torch.set_num_threads(previous_threads)
        bar.close()
    result["elapsed_s"] = time.perf_counter() - t_start
    return result


# ---- report ------------------------------------------------------------------------------------


def format_report(result: dict) -> str:
    """The printed tables: each figure's numbers, then every target with PASS or MISS."""
    lines = []
    m, s = result["machine"], result["settings"]
    lines.append(
        f"kvlib.bench on {m['device']} ({m['device_name']}), {s['threads']} threads, "
        f"reps={s['reps']}, quick={s['quick']}, load average {m.get('load_average')}"
    )
    figs = result["figures"]
    if "generation" in figs:
        lines.append("\ncached vs uncached greedy generation (tokens/s)")
        lines.append(f"{'new tokens':>10} {'cached':>10} {'uncached':>10} {'speedup':>8} equal")
        for r in figs["generation"]["rows"]:
            lines.append(
                f"{r['new_tokens']:>10} {fmt(r['cached_tok_s']):>10} "
                f"{fmt(r['uncached_tok_s']):>10} {fmt(r['speedup']):>8} {r['tokens_equal']}"
            )
    for name, h in figs.get("hf", {}).items():
        lines.append(f"\nkvlib vs Hugging Face generate, {name} config")
        if "skipped" in h:
            lines.append(f"  skipped: {h['skipped']}")
            continue
        lines.append(f"{'contender':>12} {'tokens/s':>10} {'kvlib speedup':>14} tokens equal")
        for impl, tps in h["tok_s"].items():
            ratio = h["speedup"].get(impl)
            eq = h["tokens_equal"].get(impl, "-")
            lines.append(
                f"{impl:>12} {fmt(tps):>10} {'-' if ratio is None else fmt(ratio):>14} {eq}"
            )
    for p in figs.get("paged", {}).values():
        lines.append(f"\ndecode attention, {p['shape']}, {p['threads']} thread(s)")
        for name, t in p["median_s"].items():
            ratio = p["ratio"].get(name)
            lines.append(
                f"{name:>20} {t * 1e6:10.1f} us  {'' if ratio is None else 'x' + fmt(ratio)}"
            )
    if "bandwidth" in figs:
        b = figs["bandwidth"]
        lines.append(
            f"\nbandwidth: attention reads {b['kv_bytes_read'] / 2**20:.0f} MiB of K/V at "
            f"{b['attention_bytes_per_s'] / 1e9:.2f} GB/s; copy moves "
            f"{b['copy']['bytes_per_s'] / 1e9:.2f} GB/s; fraction {b['fraction_of_copy']:.2f}"
        )
    if "memory" in figs:
        mem = figs["memory"]
        lines.append(
            f"\nmemory ({mem['dtype']}, {mem['lengths']['n']} sequences, mean "
            f"{mem['lengths']['mean']:.0f} tokens, budget {mem['budget_bytes'] / 2**30:.1f} GiB)"
        )
        lines.append(f"{'strategy':<48} {'bytes/token':>12} {'seqs':>6} {'vs contig':>9}")
        for r in mem["rows"]:
            lines.append(
                f"{r['strategy']:<48} {fmt(r['bytes_per_token']):>12} "
                f"{r['sequences_in_budget']:>6} {fmt(r['vs_contiguous']):>9}"
            )
    if "pretrained" in figs:
        p = figs["pretrained"]
        lines.append("\nshipped model, decode with each cache")
        if "skipped" in p:
            lines.append(f"  skipped: {p['skipped']}")
        else:
            for name, tps in p["tok_s"].items():
                lines.append(
                    f"{name:>12} {fmt(tps):>10} tok/s  x{fmt(p['vs_contiguous'][name])} "
                    f"tokens as contiguous: {p['tokens_equal_contiguous'][name]}"
                )
    lines += format_targets(result["targets"])
    lines.append(f"\nelapsed {result.get('elapsed_s', 0):.1f} s")
    return "\n".join(lines)


def write_json(result: dict, path: str | Path) -> Path:
    """Write the result as JSON (parent folders created); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return path


def main(argv: list[str] | None = None) -> dict:
    """Command line: `python -m kvlib.bench [--gpu] [--quick] [--device D] [--out F] ...`."""
    parser = argparse.ArgumentParser(
        prog="python -m kvlib.bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (under a minute)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: all cores)"
    )
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per contender")
    parser.add_argument(
        "--sections", nargs="+", choices=SECTIONS, default=None, help="run only these sections"
    )
    parser.add_argument(
        "--out",
        default=None,
        help=f"JSON path (default {DEFAULT_OUT}; {DEFAULT_GPU_OUT} with --gpu)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--gpu", action="store_true", help="chapter 10's CUDA kernels instead (kvlib.gpu.bench)"
    )
    args = parser.parse_args(argv)
    command = " ".join(["python -m kvlib.bench", *(sys.argv[1:] if argv is None else argv)])
    if args.gpu:
        from kvlib.gpu import bench as gpu_bench

        if args.sections is not None or args.threads is not None or args.device != "cpu":
            raise BenchError(
                "--sections, --threads and --device belong to the CPU bench, not to --gpu"
            )
        result = gpu_bench.run_gpu(
            quick=args.quick, reps=args.reps, quiet=args.quiet, command=command
        )
        report, out = gpu_bench.format_gpu(result), args.out or DEFAULT_GPU_OUT
    else:
        result = run(
            quick=args.quick,
            device=args.device,
            threads=args.threads,
            sections=args.sections,
            quiet=args.quiet,
            reps=args.reps,
            command=command,
        )
        report, out = format_report(result), args.out or DEFAULT_OUT
    print(report)
    print(f"wrote {write_json(result, out)}")
    return result


if __name__ == "__main__":
    try:
        main()
    except BenchError as err:  # a request the machine cannot meet: say so, without a traceback
        sys.exit(f"python -m kvlib.bench: {err}")
