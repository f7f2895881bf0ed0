"""Streaming perplexity: chunked feeding through a cache against references that feed the same
stream another way (one token per step, one uncached pass, a masked pass), and misuse."""

import math

import pytest
import torch
import torch.nn.functional as F

from kvlib.attention import causal_mask
from kvlib.config import tiny
from kvlib.errors import CacheFullError, KVLibTypeError, KVLibValueError
from kvlib.eviction import EVICTION_POLICIES
from kvlib.generate import teacher_forced_logits
from kvlib.kv_cache import KVCache
from kvlib.streaming import bucket_perplexity, stream_nll
from tests.models import model_for

F64 = torch.float64
CONFIG = tiny(max_seq_len=64)  # L=2, H=4, K=2, D=8, V=64


def stream(B=2, N=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CONFIG.vocab_size, (B, N), generator=g)


def make(policy, budget, B=2, **kw):
    return EVICTION_POLICIES[policy].from_config(CONFIG, budget, B, dtype=F64, **kw)


def nll_of(logits, tokens):
    """(B, N - 1) NLL of tokens 1.. from the logits (B, N - 1, V) of tokens 0..N-2."""
    return F.cross_entropy(logits.transpose(1, 2).double(), tokens[:, 1:], reduction="none")


@pytest.mark.parametrize("chunk", [1, 5, 16, 39, 64])
def test_a_cache_that_holds_the_stream_equals_one_uncached_pass(chunk):
    model, tokens = model_for(CONFIG, F64), stream()
    want = nll_of(model(tokens[:, :-1]), tokens)  # (B, N - 1) one pass, no cache
    for cache in (KVCache.from_config(CONFIG, 2, 40, dtype=F64), make("full", 40)):
        got = stream_nll(model, tokens, cache, chunk)
        diff = (got.double() - want).abs().max().item()
        assert got.shape == (2, 39) and diff < 1e-5, f"chunks of {chunk}: max diff {diff:.3e}"
        assert cache.seq_len == 39  # every token but the last was fed


@pytest.mark.parametrize("policy", ["window", "sinks", "h2o"])
@pytest.mark.parametrize("positions", ["cache", "original"])
def test_one_token_per_chunk_equals_teacher_forcing_through_the_same_policy(policy, positions):
    model, tokens, W = model_for(CONFIG, F64), stream(N=50), 12
    got = stream_nll(model, tokens, make(policy, W, positions=positions), 1)
    cache = make(policy, W, positions=positions)
    want = nll_of(teacher_forced_logits(model, tokens[:, :-1], cache, prefill=1), tokens)
    diff = (got.double() - want).abs().max().item()
    assert diff < 1e-5, f"{policy}, {positions}: max diff {diff:.3e}"
    assert cache.n_evicted > 0  # the stream overflowed the budget: eviction was exercised


class MaskedKVCache(KVCache):
    """A contiguous cache that also applies a fixed (N, N) mask: one `attend` override."""

    def attend(self, layer, q, k, v, mask):
        T, S = q.shape[2], self.layer_len(layer) + k.shape[2]
        extra = self.extra[S - T : S, :S]  # (T, S) rows of the new queries
        return super().attend(layer, q, k, v, extra if mask is None else mask & extra)


@pytest.mark.parametrize("chunk", [1, 4, 5])
def test_chunks_through_a_window_see_the_keys_the_prose_says(chunk):
    """With stream positions, a window of W read in chunks of T is one masked pass: a chunk
    that starts at c sees the W - T tokens before it (fewer for a short last chunk: W - T')."""
    model, tokens, W, N = model_for(CONFIG, F64), stream(N=41), 12, 41
    got = stream_nll(model, tokens, make("window", W, positions="original"), chunk)
    mask = causal_mask(N - 1, N - 1).clone()  # (N - 1, N - 1) queries x keys, the fed tokens
    for c in range(0, N - 1, chunk):
        T = min(chunk, N - 1 - c)
        if c + T > W:  # the cache was full: it kept the last W - T tokens before the chunk
            mask[c : c + T, : c - (W - T)] = False
    extra = MaskedKVCache(CONFIG.n_layers, 2, CONFIG.n_kv_heads, CONFIG.head_dim, N, dtype=F64)
    extra.extra = mask
    logits = model(tokens[:, :-1], extra)  # (B, N - 1, V)
    want = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
    diff = (got.double() - want).abs().max().item()
    assert diff < 1e-5, f"chunks of {chunk}: max diff {diff:.3e}"


def test_eviction_changes_the_result_so_the_references_can_fail():
    model, tokens = model_for(CONFIG, F64), stream(N=50)
    full = stream_nll(model, tokens, make("full", 50), 8)
    window = stream_nll(model, tokens, make("window", 12), 8)
    assert torch.equal(window[:, :8], full[:, :8])  # the first chunk: the same ops
    assert (window - full).abs().max().item() > 1e-3  # after it: other keys, other numbers


def test_bucket_perplexity_by_hand():
    nll = torch.tensor([[0.0, 1.0, 2.0, 3.0, 9.0], [2.0, 1.0, 0.0, 1.0, 9.0]])  # (B, N)
    got = bucket_perplexity(nll, 2)
    want = torch.tensor([math.exp(1.0), math.exp(1.5)])  # means of (0, 1, 2, 1), (2, 3, 0, 1)
    assert torch.allclose(got, want), f"{got} != {want}"
    assert bucket_perplexity(nll, 5).shape == (1,)


def test_misuse_raises_and_leaves_the_cache_unchanged():
    model, tokens = model_for(CONFIG, F64), stream(N=30)
    cache = make("sinks", 12, n_sink=4)
    stream_nll(model, tokens[:, :20], cache, 4)
    before = (cache.seq_len, cache.n_seen, [k.clone() for k in cache.keys])
    with pytest.raises(KVLibValueError, match="feed at most 8"):
        stream_nll(model, tokens, cache, 9)  # 9 new tokens beside 4 sinks in a budget of 12
    assert (cache.seq_len, cache.n_seen) == before[:2]
    assert all(torch.equal(a, b) for a, b in zip(cache.keys, before[2], strict=True))
    with pytest.raises(CacheFullError):
        stream_nll(model, tokens, make("full", 20), 4)  # 29 tokens to feed, room for 20
    with pytest.raises(KVLibValueError, match="at least 2 tokens"):
        stream_nll(model, tokens[:, :1], make("window", 8), 1)
    with pytest.raises(KVLibTypeError):
        stream_nll(model, tokens, make("window", 8), 2.0)
    with pytest.raises(KVLibValueError):
        stream_nll(model, tokens, make("window", 8), 0)
    with pytest.raises(KVLibTypeError):
        stream_nll("model", tokens, make("window", 8), 1)
    with pytest.raises(KVLibValueError):
        bucket_perplexity(torch.zeros(2, 3), 4)
    with pytest.raises(KVLibTypeError):
        bucket_perplexity(torch.zeros(3), 1)
