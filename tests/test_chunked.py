"""Online-softmax attention and chunked prefill against the full reference; measured memory."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlib.attention import attention, causal_mask, padding_mask, reference_attention
from kvlib.chunked import (
    allocation_profile,
    chunk_bounds,
    chunked_prefill,
    online_softmax_attention,
)
from kvlib.config import tiny
from kvlib.errors import CacheFullError, KVCacheError
from kvlib.generate import generate, pad_prompts
from kvlib.kv_cache import KVCache
from tests.models import model_for as make_model

F64 = torch.float64
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def qkv(B=2, H=4, K=2, T=13, S=20, D=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g).to(dtype)
    k = torch.randn(B, K, S, D, generator=g).to(dtype)
    v = torch.randn(B, K, S, D, generator=g).to(dtype)
    return q, k, v


def model_for(config, dtype=torch.float64, **kw):
    return make_model(config, dtype, **kw)  # fp64 unless a test asks for less


def tokens(B=2, T=23, seed=1, V=64):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ---- online-softmax attention ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("block_size", [1, 3, 7, 16, 20, 64])
@pytest.mark.parametrize("K", [4, 2, 1])
def test_online_softmax_equals_full_attention_causal(dtype, block_size, K):
    q, k, v = qkv(K=K, dtype=dtype)
    ref = attention(q, k, v, causal_mask(13, 20)[None, None])
    out = online_softmax_attention(q, k, v, causal=True, block_size=block_size)
    diff = (out - ref).abs().max().item()
    assert out.dtype == dtype and out.shape == ref.shape
    assert diff <= TOL[dtype], f"block {block_size}, K={K}, {dtype}: max diff {diff:.3e}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_online_softmax_with_padding_and_per_head_masks(dtype):
    q, k, v = qkv(dtype=dtype)
    valid = torch.ones(2, 20, dtype=torch.bool)
    valid[1, :6] = False  # row 1 is left-padded by 6 slots
    heads = torch.rand(2, 4, 13, 20, generator=torch.Generator().manual_seed(3)) > 0.3
    for mask in (padding_mask(valid), heads, heads & padding_mask(valid)):
        ref = reference_attention(q, k, v, mask & causal_mask(13, 20))
        out = online_softmax_attention(q, k, v, mask, causal=True, block_size=6)
        diff = (out - ref).abs().max().item()
        assert diff <= TOL[dtype], f"mask {tuple(mask.shape)}: max diff {diff:.3e}"


def test_online_softmax_lse_matches_logsumexp_and_empty_rows():
    q, k, v = qkv()
    mask = causal_mask(13, 20)[None, None].expand(2, 4, 13, 20).clone()
    mask[0, 1, 4] = False  # a query row that may attend to nothing
    out, lse = online_softmax_attention(q, k, v, mask, block_size=5, return_lse=True)
    kr = k.repeat_interleave(2, dim=1)  # (B, H, S, D)
    scores = (q @ kr.transpose(-1, -2)) / math.sqrt(8)  # (B, H, T, S)
    want = torch.logsumexp(scores.masked_fill(~mask, float("-inf")), dim=-1)  # (B, H, T)
    diff = (lse - want)[mask.any(-1)].abs().max().item()
    assert diff <= 1e-12, f"log-sum-exp max diff {diff:.3e}"
    assert lse[0, 1, 4] == float("-inf"), f"empty row lse {lse[0, 1, 4]}"
    assert torch.equal(out[0, 1, 4], torch.zeros(8, dtype=out.dtype)), "empty row must be zero"


def test_online_softmax_half_precision_accumulates_in_fp32():
    q, k, v = qkv(dtype=torch.float16)
    ref = reference_attention(q.double(), k.double(), v.double(), causal_mask(13, 20))
    out = online_softmax_attention(q, k, v, causal=True, block_size=4)
    diff = (out.double() - ref).abs().max().item()
    assert out.dtype == torch.float16
    assert diff <= 2e-3, f"fp16 max diff {diff:.3e} against the fp64 reference"


def test_online_softmax_survives_large_scores():
    # exp(1000) overflows; the running max keeps every exponent <= 0
    q, k, v = qkv()
    ref = attention(q * 300, k, v, causal_mask(13, 20))
    out = online_softmax_attention(q * 300, k, v, causal=True, block_size=4)
    diff = (out - ref).abs().max().item()
    assert torch.isfinite(out).all() and diff <= 1e-12, f"max diff {diff:.3e}"


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 2),
    K=st.integers(1, 3),
    G=st.integers(1, 3),
    T=st.integers(1, 9),
    extra=st.integers(0, 9),
    block=st.integers(1, 20),
    causal=st.booleans(),
)
def test_online_softmax_property(B, K, G, T, extra, block, causal):
    S = T + extra
    q, k, v = qkv(B=B, H=K * G, K=K, T=T, S=S, D=4)
    mask = causal_mask(T, S) if causal else None
    ref = reference_attention(q, k, v, mask)
    out = online_softmax_attention(q, k, v, causal=causal, block_size=block)
    diff = (out - ref).abs().max().item()
    assert diff <= 1e-12, f"B={B} K={K} G={G} T={T} S={S} block={block}: max diff {diff:.3e}"


def test_online_softmax_misuse():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="block_size must be an int >= 1"):
        online_softmax_attention(q, k, v, block_size=0)
    with pytest.raises(TypeError, match="block_size must be an int"):
        online_softmax_attention(q, k, v, block_size=4.0)
    with pytest.raises(TypeError, match="causal must be True or False"):
        online_softmax_attention(q, k, v, causal="yes")
    with pytest.raises(ValueError, match="does not broadcast"):
        online_softmax_attention(q, k, v, torch.ones(13, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="S >= T"):
        online_softmax_attention(q, k[:, :, :5], v[:, :, :5])


# ---- chunked prefill ---------------------------------------------------------------------------


def test_chunk_bounds_cover_the_prompt():
    assert chunk_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    for n in range(0, 12):
        for c in range(1, 13):
            b = chunk_bounds(n, c)
            covered = [i for s, e in b for i in range(s, e)]
            assert covered == list(range(n)), f"n={n} c={c}: {b}"
            assert all(0 < e - s <= c for s, e in b)
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1"):
        chunk_bounds(10, 0)
    with pytest.raises(ValueError, match="n_tokens must be an int >= 0"):
        chunk_bounds(-1, 4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunked_prefill_equals_full_prefill_for_every_chunk_size(dtype):
    config = tiny(max_seq_len=64)
    model = model_for(config, dtype)
    x = tokens(T=23)
    full_cache = KVCache.from_config(config, 2, dtype=dtype)
    with torch.no_grad():
        full = model(x, full_cache)  # (B, T, V)
    for chunk in range(1, 26):  # every size, most of which do not divide 23
        cache = KVCache.from_config(config, 2, dtype=dtype)
        logits = chunked_prefill(model, x, cache, chunk, all_logits=True)
        diff = (logits - full).abs().max().item()
        assert logits.shape == full.shape
        assert diff <= TOL[dtype], f"chunk {chunk}, {dtype}: logits max diff {diff:.3e}"
        last = chunked_prefill(model, x, KVCache.from_config(config, 2, dtype=dtype), chunk)
        ldiff = (last - full[:, -1:]).abs().max().item()
        assert last.shape == (2, 1, 64) and ldiff <= TOL[dtype], f"chunk {chunk}: last {ldiff:.3e}"
        assert cache.seq_len == 23
        for layer in range(config.n_layers):
            kdiff = (cache.keys[layer][:, :, :23] - full_cache.keys[layer][:, :, :23]).abs().max()
            assert kdiff <= TOL[dtype], f"chunk {chunk} layer {layer}: cached keys differ {kdiff}"


@pytest.mark.parametrize("kind", ["MHA", "MQA"])
def test_chunked_prefill_other_head_layouts(kind):
    config = tiny(max_seq_len=64, n_kv_heads=4 if kind == "MHA" else 1)
    model = model_for(config)
    x = tokens(T=17)
    with torch.no_grad():
        full = model(x)
    logits = chunked_prefill(
        model, x, KVCache.from_config(config, 2, dtype=F64), 5, all_logits=True
    )
    diff = (logits - full).abs().max().item()
    assert diff <= 1e-12, f"{kind}: max diff {diff:.3e}"


def test_chunked_prefill_with_left_padding_and_a_cached_prefix():
    config = tiny(max_seq_len=64)
    model = model_for(config)
    x, mask = pad_prompts([tokens(1, 9, seed=2)[0], tokens(1, 20, seed=3)[0]])
    with torch.no_grad():
        full = model(x, attention_mask=mask)  # (B, T, V)
    cache = KVCache.from_config(config, 2, dtype=F64)
    logits = chunked_prefill(model, x, cache, 6, attention_mask=mask, all_logits=True)
    real = mask.bool()  # padding queries see nothing; compare the real ones
    diff = (logits - full)[real].abs().max().item()
    assert diff <= 1e-12, f"padded batch: max diff {diff:.3e}"
    assert torch.equal(cache.start, torch.tensor([11, 0]))
    # continue a cache that already holds a prefix
    y = tokens(2, 30, seed=4)
    with torch.no_grad():
        full = model(y)
    cache = KVCache.from_config(config, 2, dtype=F64)
    with torch.no_grad():
        model(y[:, :10], cache)
    logits = chunked_prefill(model, y[:, 10:], cache, 7, all_logits=True)
    diff = (logits - full[:, 10:]).abs().max().item()
    assert diff <= 1e-12, f"after a cached prefix: max diff {diff:.3e}"


def greedy_from_cache(model, cache, logits, n):
    """Greedy decoding by hand: feed each argmax back into the cache."""
    out = []
    with torch.no_grad():
        for _ in range(n):
            tok = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            out.append(tok)
            logits = model(tok, cache)
    return torch.cat(out, dim=1)  # (B, n)


@pytest.mark.parametrize("chunk", [1, 4, 7, 24, 100])
def test_generated_tokens_identical_after_chunked_prefill(chunk):
    config = tiny(max_seq_len=64)
    model = model_for(config, torch.float32)
    x = tokens(T=24)
    ref = generate(model, x, 20)[:, 24:]  # full prefill, then decode
    cache = KVCache.from_config(config, 2, 44)
    new = greedy_from_cache(model, cache, chunked_prefill(model, x, cache, chunk), 20)
    assert torch.equal(new, ref), f"chunk {chunk}: {new.tolist()} vs {ref.tolist()}"
    # generate() continues from a chunk-prefilled prefix as well
    cache = KVCache.from_config(config, 2, 44)
    chunked_prefill(model, x[:, :-1], cache, chunk)
    cont = generate(model, x[:, -1:], 20, cache=cache)[:, 1:]
    assert torch.equal(cont, ref), f"chunk {chunk}: {cont.tolist()} vs {ref.tolist()}"
    assert len(set(ref.flatten().tolist())) > 3, "degenerate test: one repeated token"


def test_chunked_prefill_misuse_leaves_the_cache_alone():
    config = tiny(max_seq_len=64)
    model = model_for(config)
    cache = KVCache.from_config(config, 2, 30, dtype=F64)
    with torch.no_grad():
        model(tokens(T=10), cache)
    before = cache.keys[0].clone()
    bad = tokens(T=12)
    bad[1, 11] = 64  # out of the vocabulary, in the second chunk
    cases = [
        (ValueError, "token ids must be in", dict(tokens=bad, chunk_size=4)),
        (
            CacheFullError,
            "holds 10 of 30 slots; 21 new tokens",
            dict(tokens=tokens(T=21), chunk_size=4),
        ),
        (ValueError, "chunk_size must be an int >= 1", dict(tokens=tokens(T=4), chunk_size=0)),
        (TypeError, "chunk_size must be an int", dict(tokens=tokens(T=4), chunk_size=2.5)),
        (TypeError, "int64 token ids", dict(tokens=tokens(T=4).float(), chunk_size=2)),
        (ValueError, r"shape \(B, T\)", dict(tokens=tokens(T=4)[0], chunk_size=2)),
        (KVCacheError, "cache holds 2 rows", dict(tokens=tokens(B=3, T=4), chunk_size=2)),
        (
            KVCacheError,
            "needs an empty cache",
            dict(tokens=tokens(T=4), chunk_size=2, attention_mask=torch.ones(2, 4)),
        ),
        (
            ValueError,
            "shape of tokens",
            dict(tokens=tokens(T=4), chunk_size=2, attention_mask=torch.ones(2, 5)),
        ),
    ]
    for exc, match, kwargs in cases:
        with pytest.raises(exc, match=match):
            chunked_prefill(model, cache=cache, **kwargs)
        assert cache.seq_len == 10 and torch.equal(cache.keys[0], before), match
    with pytest.raises(TypeError, match="kvlib Transformer"):
        chunked_prefill(torch.nn.Linear(2, 2), tokens(T=4), cache, 2)


# ---- measured memory ---------------------------------------------------------------------------


def test_allocation_profile_sees_known_allocations():
    def fn():
        a = torch.empty(1000, dtype=torch.float32)  # 4000 bytes
        b = torch.empty(3000, dtype=torch.float64)  # 24000 bytes, alive with a
        del a, b
        c = torch.empty(2000, dtype=torch.float32)  # 8000 bytes, after both are freed
        return c

    prof = allocation_profile(fn)
    assert prof.largest_bytes == 24000, prof
    assert prof.largest_op == "empty", prof
    assert prof.peak_bytes == 28000, f"peak {prof.peak_bytes}, expected 4000 + 24000"
    with pytest.raises(TypeError, match="callable"):
        allocation_profile(42)


def test_allocation_profile_views_and_in_place_results_allocate_nothing():
    x = torch.ones(100)  # made before the call: never counted

    def fn():
        y = x.view(10, 10)  # a view of an older tensor
        x.add_(1)  # in place
        z = x * 2  # 400 bytes
        w = z[:5]  # a view keeps z's 400 bytes alive after `del z`
        del z
        u = torch.empty(50, dtype=torch.float32)  # 200 bytes, while z's storage lives
        del w
        v = torch.empty(300, dtype=torch.float32)  # 1200 bytes after z's storage is freed
        return y, u, v

    prof = allocation_profile(fn)
    assert prof.n_allocations == 3, prof
    assert prof.peak_bytes == 200 + 1200, f"peak {prof.peak_bytes}, expected 200 + 1200"
    assert (prof.largest_bytes, prof.largest_op) == (1200, "empty"), prof


def test_allocation_profile_of_attention_counts_its_score_sized_tensors():
    q, k, v = qkv(B=1, H=4, K=2, T=32, S=32, D=8, dtype=torch.float32)
    prof = allocation_profile(lambda: attention(q, k, v, causal_mask(32, 32)[None, None]))
    scores = 4 * 32 * 32 * 4  # (B, H, T, S) fp32
    assert prof.largest_bytes == scores, f"{prof}, expected the {scores}-byte scores"
    assert scores * 2 <= prof.peak_bytes, f"{prof}: scores and weights are alive together"


def test_chunked_prefill_shrinks_the_measured_scores_by_the_chunk_ratio():
    config = tiny(max_seq_len=512, dim=32, n_heads=4, n_kv_heads=2)
    model = model_for(config, torch.float32)
    T = 256
    x = tokens(B=1, T=T)
    profiles = {}
    for chunk in (T, T // 8):
        cache = KVCache.from_config(config, 1, T)  # allocated before: not counted
        profiles[chunk] = allocation_profile(
            lambda c=cache, n=chunk: chunked_prefill(model, x, c, n)
        )
    full, small = profiles[T], profiles[T // 8]
    scores = config.n_heads * T * T * 4  # (B, H, T, S) fp32 scores of the full prefill
    assert full.largest_bytes == scores, f"{full}, expected the {scores}-byte scores tensor"
    assert small.largest_bytes * 8 == full.largest_bytes, f"{small} vs {full}"
    ratio = full.peak_bytes / small.peak_bytes
    assert 6 < ratio <= 8.5, f"peak {full.peak_bytes} vs {small.peak_bytes}: ratio {ratio:.2f}"


def test_allocation_profile_needs_a_callable():
    with pytest.raises(TypeError, match="fn must be a callable taking no arguments, got int"):
        allocation_profile(3)
