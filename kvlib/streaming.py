"""Perplexity of a long stream read through a cache, a chunk of tokens at a time.

`stream_nll(model, tokens, cache, chunk_size)` feeds a stream of token ids (B, S) through any
kvlib cache the way a reader of a long document would: chunk after chunk of `chunk_size`
tokens, each one a forward pass that appends to the cache. Before each chunk the cache's
`prepare` hook runs (inside the model), so an evicting cache (`kvlib.eviction`) makes room
for the chunk there and keeps its budget. Every token but the last is fed once; the logits of
a chunk score the next token of each of its positions, so the result holds the negative
log-likelihood (NLL) of tokens 1 .. S-1, each predicted from what the cache kept of the
tokens before it.

Chunks trade accuracy of the eviction schedule for speed. With a budget of W tokens and
chunks of T, an evicting cache keeps W - T old tokens when a chunk arrives, so the chunk's
first query sees W - T + 1 keys and its last sees W; one token at a time (`chunk_size=1`)
every query sees W. A forward pass over T tokens costs about as much as T decode steps in
arithmetic but far less in overhead, which is what makes a stream of hundreds of tokens
through a 135M-parameter model affordable on a CPU.

`bucket_perplexity(nll, bucket)` turns the (B, S - 1) NLL into perplexity per run of `bucket`
consecutive predictions (all rows together): the curve of perplexity as the stream grows.

Shapes: tokens (B, S), logits of a chunk (B, T, V), nll (B, S - 1) fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvlib.cache import Cache
from kvlib.errors import KVLibTypeError, KVLibValueError, check_int
from kvlib.transformer import Transformer, check_tokens


@torch.inference_mode()
def stream_nll(
    model: Transformer, tokens: torch.Tensor, cache: Cache, chunk_size: int
) -> torch.Tensor:
    """(B, S - 1) fp32: the NLL of each next token of `tokens` (B, S), fed through `cache` in
    chunks of `chunk_size` tokens (the last chunk may be shorter). nll[:, i] scores token i + 1.

    A failed call (a cache that cannot take a chunk, a stream past the model's positions)
    leaves the cache as it was.
    """
    if not isinstance(model, Transformer):
        raise KVLibTypeError(f"model must be a kvlib Transformer, got {type(model).__name__}")
    check_tokens(tokens, model.config.vocab_size)  # (B, S)
    check_int("chunk_size", chunk_size, 1)
    B, S = tokens.shape
    if S < 2:
        raise KVLibValueError(f"a stream needs at least 2 tokens to score one, got S={S}")
    model.check_cache(cache, B, S - 1)  # the last token is a target only
    tokens = tokens.to(model.device)
    nll = torch.empty(B, S - 1, dtype=torch.float32, device=model.device)  # (B, S - 1)
    state = cache.checkpoint()
    try:
        for i in range(0, S - 1, chunk_size):
            T = min(chunk_size, S - 1 - i)
            logits = model(tokens[:, i : i + T], cache).float()  # (B, T, V)
            targets = tokens[:, i + 1 : i + T + 1]  # (B, T)
            nll[:, i : i + T] = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    except BaseException:
        cache.rollback(state)
        raise
    return nll


def bucket_perplexity(nll: torch.Tensor, bucket: int) -> torch.Tensor:
    """(S // bucket,) fp32: exp of the mean NLL over each run of `bucket` consecutive
    predictions of `nll` (B, S), all rows together; a last partial run is left out."""
    if not isinstance(nll, torch.Tensor) or nll.ndim != 2 or not nll.dtype.is_floating_point:
        got = tuple(nll.shape) if isinstance(nll, torch.Tensor) else type(nll).__name__
        raise KVLibTypeError(f"nll must be a (B, S) float tensor, got {got}")
    check_int("bucket", bucket, 1)
    B, S = nll.shape
    if S < bucket:
        raise KVLibValueError(f"a bucket of {bucket} predictions is longer than the S={S} given")
    n = S // bucket * bucket
    runs = nll[:, :n].float().reshape(B, n // bucket, bucket)  # (B, S // bucket, bucket)
    return runs.mean(dim=(0, 2)).exp()  # (S // bucket,)
