"""Autoregressive generation: greedy or sampled, with or without a KV cache.

Shapes:
    prompt: (B, T) int64, rows left-padded when `attention_mask` (B, T) of 0/1 is given
    logits of the next token: (B, V), turned into fp32 probabilities for sampling
    result: (B, T + n) int64, n <= max_new_tokens (fewer when every row hit EOS)

Two paths give the same tokens:
    use_cache=False  the reference: re-run the whole sequence for every new token
    use_cache=True   prefill the prompt once into a cache, then feed one token per step
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from kvlib.cache import Cache
from kvlib.errors import KVLibTypeError, KVLibValueError, check_int
from kvlib.kv_cache import KVCache
from kvlib.transformer import Transformer, check_tokens, pad_lengths

# ---- batching helpers --------------------------------------------------------------------------


def pad_prompts(
    prompts: Sequence[Sequence[int] | torch.Tensor],
    pad_id: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts of different lengths into tokens (B, T) and attention_mask (B, T)."""
    if len(prompts) == 0:
        raise KVLibValueError("pad_prompts needs at least one prompt")
    rows = [torch.as_tensor(p, dtype=torch.long).flatten() for p in prompts]
    if any(r.numel() == 0 for r in rows):
        raise KVLibValueError("every prompt needs at least one token")
    T = max(r.numel() for r in rows)
    tokens = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), T), dtype=torch.long)  # (B, T)
    for b, r in enumerate(rows):
        tokens[b, T - r.numel() :] = r
        mask[b, T - r.numel() :] = 1
    return tokens.to(device), mask.to(device)


# ---- sampling ----------------------------------------------------------------------------------


def filter_logits(
    logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """(B, V) logits with every token outside the top-k / the top-p nucleus set to -inf.

    top-p keeps the smallest set of most likely tokens whose probabilities sum to >= top_p
    (always at least the most likely token). Works in fp32.
    """
    logits = logits.float()
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = torch.softmax(sorted_logits, dim=-1)  # (B, V) fp32
        before = probs.cumsum(-1) - probs  # (B, V) mass of strictly more likely tokens
        drop_sorted = before >= top_p  # (B, V); position 0 is never dropped
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # (B, V)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, V) logits -> (B,) next tokens: argmax when temperature == 0, else a sample."""
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)  # (B, V) fp32
    return torch.multinomial(probs, 1, generator=generator)[:, 0]  # (B,)


# ---- checks ------------------------------------------------------------------------------------


def _check_args(
    model, prompt, max_new_tokens, temperature, top_k, top_p, generator, seed, eos_token_id
):
    if not isinstance(model, Transformer):
        raise KVLibTypeError(f"model must be a kvlib Transformer, got {type(model).__name__}")
    check_tokens(prompt, model.config.vocab_size, "prompt")
    check_int("max_new_tokens", max_new_tokens)
    total = prompt.shape[1] + max_new_tokens
    if total > model.config.max_seq_len:
        raise KVLibValueError(
            f"prompt ({prompt.shape[1]}) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
            f"config.max_seq_len={model.config.max_seq_len}"
        )
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature):
        raise KVLibValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if temperature < 0:
        raise KVLibValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None:
        check_int("top_k", top_k)
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0):
        raise KVLibValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
    if generator is not None and seed is not None:
        raise KVLibValueError("pass either generator or seed, not both")
    if eos_token_id is not None:
        V = model.config.vocab_size
        check_int("eos_token_id", eos_token_id, low=0, high=V - 1)


# ---- generate ----------------------------------------------------------------------------------


@torch.inference_mode()
def generate(
    model: Transformer,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    use_cache: bool = True,
    cache=None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    attention_mask: torch.Tensor | None = None,
    eos_token_id: int | None = None,
    stream: Callable[[int, torch.Tensor], None] | None = None,
    cache_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Extend `prompt` (B, T) by up to `max_new_tokens` tokens; return (B, T + n).

    Greedy when temperature == 0, else sampling (temperature, then top-k, then top-p) drawn
    from `generator` or a fresh generator seeded with `seed`. Rows that emit `eos_token_id`
    are padded with it; generation stops early once every row has. `stream(step, tokens)`
    is called with each new column (B,). With use_cache, `cache` (any kvlib cache, empty or
    holding a prefix of `prompt`'s rows) is used, else a `KVCache` of `cache_dtype`
    (default: the model's dtype) is allocated for exactly T + max_new_tokens slots.
    """
    _check_args(
        model, prompt, max_new_tokens, temperature, top_k, top_p, generator, seed, eos_token_id
    )
    B, T = prompt.shape
    device = model.device
    prompt = prompt.to(device)
    if attention_mask is not None:
        pad_lengths(attention_mask)  # validate before any work
        attention_mask = attention_mask.to(device)
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    if not use_cache and (cache is not None or cache_dtype is not None):
        raise KVLibValueError("cache and cache_dtype need use_cache=True")
    if use_cache:
        if cache is None:
            cache = KVCache.from_config(
                model.config,
                B,
                T + max_new_tokens,
                dtype=cache_dtype or model.dtype,
                device=device,
            )
        elif cache_dtype is not None:
            raise KVLibValueError("pass cache_dtype or a ready-made cache, not both")
        model.check_cache(cache, B, T + max_new_tokens - 1)  # the last token is not fed

    out = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=device)  # (B, T + n)
    out[:, :T] = prompt
    done = torch.zeros(B, dtype=torch.bool, device=device)  # (B,) rows that emitted EOS
    pick = lambda logits: next_token(logits, temperature, top_k, top_p, generator)  # noqa: E731
    mask = attention_mask
    if not use_cache and mask is not None:
        ones = torch.ones(B, max_new_tokens, dtype=mask.dtype, device=device)
        mask = torch.cat([mask, ones], dim=1)  # (B, T + n)

    state = cache.checkpoint() if use_cache else None
    try:
        if use_cache:  # prefill: the whole prompt in one forward pass
            logits = model(prompt, cache, attention_mask, last_only=True)[:, -1]  # (B, V)
        else:
            logits = model(prompt, attention_mask=attention_mask, last_only=True)[:, -1]
        n = max_new_tokens
        for i in range(max_new_tokens):
            tok = pick(logits)  # (B,)
            if eos_token_id is not None:
                tok = tok.masked_fill(done, eos_token_id)
                done = done | (tok == eos_token_id)
            out[:, T + i] = tok
            if stream is not None:
                stream(i, tok)
            if i == max_new_tokens - 1 or (eos_token_id is not None and bool(done.all())):
                n = i + 1
                break
            if use_cache:  # decode: one token per row; the cache gives positions and padding
                logits = model(tok[:, None], cache)[:, -1]  # (B, V)
            else:
                sub = None if mask is None else mask[:, : T + i + 1]
                logits = model(out[:, : T + i + 1], attention_mask=sub, last_only=True)[:, -1]
    except BaseException:
        if use_cache:
            cache.rollback(state)  # a failed generate leaves the cache as it was
        raise
    return out[:, : T + n]


@torch.inference_mode()
def teacher_forced_logits(
    model: Transformer,
    tokens: torch.Tensor,
    cache: Cache,
    *,
    prefill: int | None = None,
    chunk: int = 1,
) -> torch.Tensor:
    """The logits (B, N, V) fp32 of a given stream `tokens` (B, N) fed through `cache` the way
    generation feeds it: the first `prefill` tokens in one forward pass (default: as many as
    the cache can take at once), then one token per step.

    `chunk` > 1 feeds the rest `chunk` tokens per forward pass instead (the last pass takes
    what is left): each chunk attends to the cached history as the cache stores it, and to
    itself, the way chunked prefill feeds a long prompt. One token per step is the reference;
    chunks cost a fraction of the passes, which is what a large model measured on a CPU needs.

    The cache's own hooks do the rest (an evicting cache makes room before each step and
    numbers the positions), so this runs on any kvlib cache. A failed call leaves the cache
    as it was.
    """
    if not isinstance(model, Transformer):
        raise KVLibTypeError(f"model must be a kvlib Transformer, got {type(model).__name__}")
    check_tokens(tokens, model.config.vocab_size)  # (B, N): the whole stream
    B, N = tokens.shape
    model.check_cache(cache, B, N)
    room = N if cache.capacity is None else cache.capacity - cache.seq_len
    first = max(1, min(N, room)) if prefill is None else prefill
    check_int("prefill", first, 1)
    check_int("chunk", chunk, 1)
    if first > N:
        raise KVLibValueError(f"prefill={first} is longer than the stream of {N} tokens")
    out = torch.empty(B, N, model.config.vocab_size, dtype=torch.float32, device=model.device)
    tokens = tokens.to(model.device)
    state = cache.checkpoint()
    try:
        i = 0
        while i < N:
            T = first if i == 0 else min(chunk, N - i)
            out[:, i : i + T] = model(tokens[:, i : i + T], cache).float()  # (B, T, V)
            i += T
    except BaseException:
        cache.rollback(state)
        raise
    return out
