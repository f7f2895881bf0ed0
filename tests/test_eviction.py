"""Eviction caches: which tokens each policy keeps, positions, H2O scores, references, misuse."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlib.attention import causal_mask, sliding_window_mask
from kvlib.config import tiny
from kvlib.errors import CacheFullError, KVCacheError
from kvlib.eviction import (
    EVICTION_POLICIES,
    EvictionCache,
    FullCache,
    H2OCache,
    SinkCache,
    SlidingWindowCache,
    attention_received,
)
from kvlib.generate import teacher_forced_logits
from kvlib.kv_cache import KVCache
from kvlib.rope import apply_rope, rope_tables
from tests.models import model_for as make_model

F64 = torch.float64
CONFIG = tiny(max_seq_len=64)  # L=2, H=4, K=2, D=8, V=64


def model_for(config=CONFIG, dtype=F64, **kw):
    return make_model(config, dtype, **kw)


def stream(B=2, N=40, seed=1, V=64):
    return torch.randint(0, V, (B, N), generator=torch.Generator().manual_seed(seed))


def make(policy, budget, B=2, dtype=F64, config=CONFIG, **kw):
    return EVICTION_POLICIES[policy].from_config(config, budget, B, dtype=dtype, **kw)


def feed(cache, N, T=1, seed=0):
    """Stream N random tokens through `cache` at the cache level (no model); return raw k."""
    g = torch.Generator().manual_seed(seed)
    B, K, D = cache.batch_size, cache.n_kv_heads, cache.head_dim
    ks = torch.randn(B, K, N, D, generator=g, dtype=cache.dtype)  # (B, K, N, D)
    for i in range(0, N, T):
        t = min(T, N - i)
        cache.prepare(t)
        for layer in range(cache.n_layers):
            cache.update(layer, ks[:, :, i : i + t], ks[:, :, i : i + t] * 2)
    return ks


# ---- which tokens each policy keeps ------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    budget=st.integers(2, 20),
    N=st.integers(1, 60),
    T=st.integers(1, 4),
    n_sink=st.integers(0, 4),
)
def test_window_and_sinks_keep_exactly_their_tokens(budget, N, T, n_sink):
    T = min(T, budget - n_sink) if n_sink < budget else 1
    window = make("window", budget, B=1)
    feed(window, N, T)
    n_held = min(N, budget) if N <= budget else None
    got = window.kept_positions(1)[0, 0].tolist()
    if n_held is not None:
        assert got == list(range(N)), got
    else:
        # the last prepare freed room for the final chunk of t tokens
        assert got == list(range(N - len(got), N)) and budget - T <= len(got) <= budget, got
    if n_sink >= budget:
        return
    sinks = make("sinks", budget, B=1, n_sink=n_sink)
    feed(sinks, N, T)
    got = sinks.kept_positions(0)[0, 1].tolist()
    if N <= budget:
        assert got == list(range(N)), got
    else:
        n_recent = len(got) - n_sink
        assert got == list(range(n_sink)) + list(range(N - n_recent, N)), got
        assert budget - T <= len(got) <= budget


@pytest.mark.parametrize("N", [5, 16, 17, 50])
def test_decode_keeps_exactly_budget_tokens(N):
    W = 16
    for policy, want in (
        ("window", list(range(max(0, N - W), N))),
        ("sinks", list(range(N)) if N <= W else [0, 1, 2, 3] + list(range(N - W + 4, N))),
    ):
        cache = make(policy, W)
        feed(cache, N)
        for layer in range(CONFIG.n_layers):
            got = cache.kept_positions(layer)
            assert got.shape == (2, CONFIG.n_kv_heads, min(N, W))
            assert (got == torch.tensor(want)).all(), f"{policy} layer {layer}: {got[0, 0]}"
        assert cache.n_seen == N and cache.n_evicted == max(0, N - W)
        assert cache.nbytes_used == 2 * min(N, W) * CONFIG.kv_bytes_per_token(F64)


def h2o_reference(q_steps, ks, budget, n_recent):
    """Float64 H2O by hand for one kv head: kept stream indices and scores after every step."""
    kept, score, history = [], {}, []
    D = ks.shape[-1]
    for t, q in enumerate(q_steps):  # q: (G, D) the group's queries of token t
        if len(kept) + 1 > budget:
            r = min(max(n_recent - 1, 0), budget - 1)
            recent = kept[len(kept) - r :] if r else []
            older = kept[: len(kept) - r]
            heavy = sorted(older, key=lambda s: -score[s])[: budget - 1 - r]
            kept = sorted(heavy) + recent
        kept.append(t)
        score[t] = 0.0
        w = torch.softmax((q @ ks[kept].T) / math.sqrt(D), dim=-1)  # (G, S)
        for s, ws in zip(kept, w.sum(0).tolist(), strict=True):
            score[s] += ws
        history.append((list(kept), [score[s] for s in kept]))
    return history


@pytest.mark.parametrize("n_recent", [0, 3, 8])
def test_h2o_keeps_recent_and_heaviest_tokens_like_a_reference(n_recent):
    B, K, H, D, N, W = 1, 2, 4, 8, 40, 8
    G = H // K
    g = torch.Generator().manual_seed(3)
    ks = torch.randn(B, K, N, D, generator=g, dtype=F64)
    qs = torch.randn(B, H, N, D, generator=g, dtype=F64) * 2
    cache = H2OCache(1, B, K, D, W, positions="original", rope_len=N, dtype=F64, n_recent=n_recent)
    refs = [
        h2o_reference(qs[0, k * G : (k + 1) * G].transpose(0, 1), ks[0, k], W, n_recent)
        for k in range(K)
    ]
    for t in range(N):
        cache.prepare(1)
        k_t = ks[:, :, t : t + 1]  # (B, K, 1, D)
        cache.attend(0, qs[:, :, t : t + 1], k_t, k_t, None)  # scores the kept keys
        for k in range(K):
            want_kept, want_score = refs[k][t]
            got_kept = cache.kept_positions(0)[0, k].tolist()
            assert got_kept == want_kept, f"step {t} head {k}: {got_kept} != {want_kept}"
            got_score = cache.scores[0][0, k, : len(got_kept)].double()
            diff = (got_score - torch.tensor(want_score)).abs().max().item()
            assert diff < 1e-5, f"step {t} head {k}: scores differ by {diff:.2e}"
    tail = cache.kept_positions(0)[0, 0, W - n_recent :].tolist() if n_recent else []
    assert tail == list(range(N - n_recent, N))


# ---- a budget that holds the whole stream changes nothing -------------------------------------


@pytest.mark.parametrize("positions", ["cache", "original"])
@pytest.mark.parametrize("policy", ["window", "sinks", "h2o"])
@pytest.mark.parametrize("prefill", [None, 1, 7])
def test_budget_covering_the_stream_equals_the_full_cache_exactly(policy, positions, prefill):
    model, tokens = model_for(), stream(N=30)
    full = teacher_forced_logits(
        model, tokens, make("full", 30, positions=positions), prefill=prefill
    )
    for budget in (30, 48):
        cache = make(policy, budget, positions=positions)
        got = teacher_forced_logits(model, tokens, cache, prefill=prefill)
        diff = (got - full).abs().max().item()
        # Exact on every CPU: with nothing evicted the cache returns the same slots in the same
        # (B, K, S, D) shapes as the full cache, so the model runs the same ops on the same data.
        assert torch.equal(got, full), f"{policy} budget {budget}: max diff {diff:.3e}"
        assert cache.n_evicted == 0


def test_full_cache_equals_kvcache_and_the_uncached_model():
    model, tokens = model_for(), stream(N=30)
    full = FullCache.from_config(CONFIG, 30, 2, dtype=F64)
    got = teacher_forced_logits(model, tokens, full, prefill=5)
    kv = KVCache.from_config(CONFIG, 2, 30, dtype=F64)
    want = [model(tokens[:, :5], kv)] + [model(tokens[:, i : i + 1], kv) for i in range(5, 30)]
    want = torch.cat(want, dim=1).float()
    # Exact on every CPU: FullCache hands the model the same (B, K, S, D) keys and values as
    # KVCache, step by step, so both runs are the same ops on the same data.
    assert torch.equal(got, want), f"max diff {(got - want).abs().max().item():.3e}"
    ref = model(tokens).float()
    diff = (got - ref).abs().max().item()
    assert diff < 1e-6, f"cached stream vs one uncached forward pass: max diff {diff:.3e}"


# ---- positions ---------------------------------------------------------------------------------


class MaskedKVCache(KVCache):
    """A contiguous cache that also applies a fixed (N, N) mask: one `attend` override."""

    def attend(self, layer, q, k, v, mask):
        T, S = q.shape[2], self.layer_len(layer) + k.shape[2]
        extra = self.extra[S - T : S, :S]  # (T, S) rows of the new queries
        return super().attend(layer, q, k, v, extra if mask is None else mask & extra)


def masked_cache(extra, B, N):
    cache = MaskedKVCache(CONFIG.n_layers, B, CONFIG.n_kv_heads, CONFIG.head_dim, N, dtype=F64)
    cache.extra = extra
    return cache


@pytest.mark.parametrize("policy", ["window", "sinks"])
def test_original_positions_equal_a_masked_full_forward_pass(policy):
    """With stream positions, a window (with sinks) is exactly a sliding-window attention mask."""
    model, tokens, W, N = model_for(), stream(N=50), 12, 50
    cache = make(policy, W, positions="original")
    got = teacher_forced_logits(model, tokens, cache)
    if policy == "window":
        mask = sliding_window_mask(N, N, W)  # (N, N): the last W keys
    else:  # 4 sinks + the last W - 4 keys
        mask = sliding_window_mask(N, N, W - 4) | (causal_mask(N, N) & (torch.arange(N) < 4))
    want = model(tokens, masked_cache(mask, 2, N)).float()  # one pass, positions 0..N-1
    diff = (got - want).abs().max().item()
    assert diff < 1e-6, f"{policy}: stream vs masked forward pass, max diff {diff:.3e}"


@pytest.mark.parametrize("policy", ["window", "sinks", "h2o"])
def test_cache_positions_rotate_keys_to_their_slot(policy):
    """positions='cache': reading equals raw keys rotated at the slot they sit in (StreamingLLM)."""
    W, N, D = 10, 37, CONFIG.head_dim
    cache = make(policy, W, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(2, CONFIG.n_kv_heads, N, D, generator=g, dtype=F64)  # un-rotated keys
    q = torch.randn(2, CONFIG.n_heads, 1, D, generator=g)
    cos, sin = rope_tables(D, CONFIG.max_seq_len, CONFIG.rope_theta)
    cos, sin = cos.double(), sin.double()
    for t in range(N):
        cache.prepare(1)
        s = cache.seq_len  # the slot (and position) the Transformer gives token t
        assert cache.next_positions(1).tolist() == [[s], [s]]
        k = apply_rope(raw[:, :, t : t + 1], cos[s], sin[s]).float()
        for layer in range(CONFIG.n_layers):
            cache.attend(layer, q, k, k, None)
    k_all = cache.read_keys(1)  # (B, K, W, D)
    idx = cache.kept_positions(1)  # (B, K, W)
    kept = torch.gather(raw, 2, idx[..., None].expand(-1, -1, -1, D))  # (B, K, W, D)
    want = apply_rope(kept, cos[:W], sin[:W])  # rotated at slots 0..W-1
    diff = (k_all.double() - want).abs().max().item()
    assert diff < 1e-5, f"{policy}: re-rotated keys vs keys rotated at their slots: {diff:.2e}"
    assert cache.positions == "cache" and cache.rotated_at[1].max() >= W - 1


def test_original_positions_stop_at_the_rope_table_cache_positions_do_not():
    model, tokens = model_for(dtype=torch.float32), stream(B=1, N=80)
    cache = make("window", 16, B=1, dtype=torch.float32, positions="original")
    with pytest.raises(ValueError, match="reach position 79, past config.max_seq_len=64"):
        teacher_forced_logits(model, tokens, cache)
    with pytest.raises(KVCacheError, match="run past the model's RoPE table"):
        cache.next_positions(65)
    cache = make("window", 16, B=1, dtype=torch.float32)
    logits = teacher_forced_logits(model, tokens, cache)
    assert logits.shape == (1, 80, 64) and bool(logits.isfinite().all())
    assert cache.next_positions(1).tolist() == [[16]]


# ---- H2O scores from the model's own attention --------------------------------------------------


def test_attention_received_matches_softmax_by_hand():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 3, 8, generator=g, dtype=F64)
    k = torch.randn(2, 2, 7, 8, generator=g, dtype=F64)
    got = attention_received(q, k)  # (B, K, S)
    scores = q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) / math.sqrt(8)  # (B, H, T, S)
    scores = scores.masked_fill(~causal_mask(3, 7), float("-inf"))
    want = torch.softmax(scores, -1).sum(2).reshape(2, 2, 2, 7).sum(2)  # (B, K, S)
    diff = (got - want).abs().max().item()
    assert diff < 1e-12, f"max diff {diff:.2e}"
    total = got.sum(-1)
    assert torch.allclose(total, torch.full_like(total, 2 * 3)), total  # G * T per kv head


@pytest.mark.parametrize("positions", ["cache", "original"])
def test_h2o_scores_equal_the_models_attention_weights(positions):
    """Scores after a stream that fits equal softmax(q k^T) summed by hand from the model's
    own projections in one uncached forward pass (float64)."""
    model, tokens, N = model_for(), stream(N=20), 20
    H, K, D, L = CONFIG.n_heads, CONFIG.n_kv_heads, CONFIG.head_dim, CONFIG.n_layers
    seen = {}
    handles = [
        proj.register_forward_hook(lambda m, a, out, key=(name, i): seen.__setitem__(key, out))
        for i, blk in enumerate(model.layers)
        for name, proj in (("q", blk.attn.wq), ("k", blk.attn.wk))
    ]
    with torch.inference_mode():
        model(tokens)  # (B, N, V), no cache: every projection of all N tokens at once
    for handle in handles:
        handle.remove()
    cos, sin = rope_tables(D, N, CONFIG.rope_theta)
    cos, sin = cos.double(), sin.double()
    cache = make("h2o", N, positions=positions)
    teacher_forced_logits(model, tokens, cache, prefill=4)
    for layer in range(L):
        q = apply_rope(seen["q", layer].view(2, N, H, D).transpose(1, 2), cos, sin)  # (B,H,N,D)
        k = apply_rope(seen["k", layer].view(2, N, K, D).transpose(1, 2), cos, sin)  # (B,K,N,D)
        scores = q @ k.repeat_interleave(H // K, dim=1).transpose(-1, -2) / math.sqrt(D)
        w = torch.softmax(scores.masked_fill(~causal_mask(N, N), float("-inf")), -1)  # (B,H,N,N)
        want = w.sum(2).reshape(2, K, H // K, N).sum(2)  # (B, K, S)
        diff = (cache.scores[layer].double() - want).abs().max().item()
        assert diff < 1e-5, f"layer {layer}: H2O scores vs the model's weights: {diff:.2e}"


def test_h2o_evicts_in_every_layer_and_head_independently():
    model, tokens = model_for(dtype=torch.float32), stream(N=60)
    cache = make("h2o", 16, dtype=torch.float32, n_recent=4)
    teacher_forced_logits(model, tokens, cache)
    kept = [cache.kept_positions(layer) for layer in range(CONFIG.n_layers)]
    for got in kept:
        assert got.shape == (2, CONFIG.n_kv_heads, 16)
        assert (got[..., -4:] == torch.arange(56, 60)).all()  # the recent window
        assert (got.diff(dim=-1) > 0).all()  # stream order
    rows = [x[b, k] for x in kept for b in (0, 1) for k in range(CONFIG.n_kv_heads)]
    assert not all(torch.equal(rows[0], r) for r in rows), "every head kept the same tokens"


# ---- memory, crop, reset -----------------------------------------------------------------------


def test_memory_accounting_and_crop_reset():
    cache = make("h2o", 16, dtype=torch.float32)
    kv = 2 * CONFIG.n_layers * 2 * CONFIG.n_kv_heads * 16 * CONFIG.head_dim * 4
    assert cache.nbytes_allocated == kv + CONFIG.n_layers * 2 * CONFIG.n_kv_heads * 16 * 4
    window = make("window", 16, dtype=torch.float32)
    assert window.nbytes_allocated == kv
    feed(window, 30)
    window.crop(10)
    assert window.seq_len == 10 and window.n_seen == 24
    assert window.kept_positions(0)[0, 0].tolist() == list(range(14, 24))
    window.reset()
    assert window.seq_len == 0 and window.n_seen == 0 and window.n_evicted == 0
    assert window.next_positions(2).tolist() == [[0, 1], [0, 1]]


# ---- misuse ------------------------------------------------------------------------------------


def test_constructor_misuse():
    with pytest.raises(KVCacheError, match="budget must be an int >= 1"):
        SlidingWindowCache(2, 1, 2, 8, 0)
    with pytest.raises(KVCacheError, match="positions must be one of"):
        SlidingWindowCache(2, 1, 2, 8, 8, positions="absolute")
    with pytest.raises(KVCacheError, match="rope_len"):
        SlidingWindowCache(2, 1, 2, 8, 8, rope_len=4)
    with pytest.raises(KVCacheError, match="n_sink=8 leaves no room"):
        SinkCache(2, 1, 2, 8, 8, n_sink=8)
    with pytest.raises(KVCacheError, match="n_sink must be an int"):
        SinkCache(2, 1, 2, 8, 8, n_sink=-1)
    with pytest.raises(KVCacheError, match=r"n_recent must be an int in \[0, 8\]"):
        H2OCache(2, 1, 2, 8, 8, n_recent=9)
    with pytest.raises(KVCacheError, match=r"budget must be an int in \[1, 64\]"):
        SlidingWindowCache.from_config(CONFIG, 65)
    with pytest.raises(TypeError, match="ModelConfig"):
        SlidingWindowCache.from_config({"dim": 8}, 8)
    with pytest.raises(KVCacheError, match="dtype must be a floating"):
        SlidingWindowCache(2, 1, 2, 8, 8, dtype=torch.int8)


def test_prepare_misuse_changes_nothing():
    full = make("full", 8)
    feed(full, 8)
    with pytest.raises(CacheFullError, match="a full cache never evicts: it holds 8 of 8"):
        full.prepare(1)
    sinks = make("sinks", 8)
    feed(sinks, 8)
    with pytest.raises(ValueError, match="feed at most 4 at a time"):
        sinks.prepare(5)
    window = make("window", 8)
    feed(window, 8)
    with pytest.raises(ValueError, match="cannot fit a budget of 8"):
        window.prepare(9)
    with pytest.raises(TypeError, match="T must be an int"):
        window.prepare(1.0)
    with pytest.raises(ValueError, match="T must be an int >= 1"):
        window.prepare(0)
    assert window.n_evicted == 0 and window.kept_positions(1)[0, 0].tolist() == list(range(8))
    window.prepare(1)
    window.update(0, torch.zeros(2, 2, 1, 8, dtype=F64), torch.zeros(2, 2, 1, 8, dtype=F64))
    with pytest.raises(KVCacheError, match="layers hold different lengths"):
        window.prepare(1)
    assert window.kept_positions(1)[0, 0].tolist() == list(range(1, 8))  # unchanged


def test_original_positions_fail_before_evicting():
    """A step that would run past the RoPE table raises before any token is evicted."""
    cache = SlidingWindowCache(2, 2, 2, 8, 8, positions="original", rope_len=10, dtype=F64)
    feed(cache, 10)
    kept = cache.kept_positions(0).clone()
    with pytest.raises(KVCacheError, match="run past the model's RoPE table"):
        cache.prepare(1)
    assert cache.n_evicted == 2 and torch.equal(cache.kept_positions(0), kept)


def test_update_misuse_leaves_the_cache_unchanged():
    window = make("window", 8)
    feed(window, 8)
    k = torch.zeros(2, 2, 1, 8, dtype=F64)
    with pytest.raises(CacheFullError, match="would overflow"):
        window.update(0, k, k)  # prepare first
    assert window.seq_len == 8 and window.n_seen == 8
    h2o = make("h2o", 8)
    with pytest.raises(KVCacheError, match="needs the queries"):
        h2o.update(0, k, k)
    assert h2o.seq_len == 0 and h2o.n_seen == 0
    with pytest.raises(KVCacheError, match=r"q must be a float tensor of shape \(B=2, H, T=1"):
        h2o.attend(0, torch.zeros(2, 4, 2, 8, dtype=F64), k, k, None)
    with pytest.raises(KVCacheError, match=r"q must be a float tensor of shape \(B=2"):
        h2o.attend(0, torch.zeros(2, 3, 1, 8, dtype=F64), k, k, None)
    with pytest.raises(IndexError, match="layer 5 out of range"):
        h2o.attend(5, torch.zeros(2, 4, 1, 8, dtype=F64), k, k, None)
    assert h2o.seq_len == 0 and h2o.n_seen == 0
    with pytest.raises(KVCacheError, match="holds unpadded streams"):
        window.set_left_padding(torch.tensor([1, 0]))


def test_the_model_and_generate_drive_every_policy_unchanged():
    """No hooks and no loop of their own: the model calls prepare, positions and attend."""
    from kvlib.generate import generate

    model = model_for()
    for policy in EVICTION_POLICIES:
        budget = 40 if policy == "full" else 8
        cache = make(policy, budget)
        out = generate(model, stream(N=3), 20, cache=cache)
        assert out.shape == (2, 23)
        assert cache.n_seen == 22 and cache.seq_len == min(22, budget), policy


def test_stream_misuse():
    model = model_for()
    with pytest.raises(ValueError, match=r"tokens must have shape \(B, T\)"):
        teacher_forced_logits(model, stream()[0], make("window", 8))
    with pytest.raises(TypeError, match="model must be a kvlib Transformer, got Linear"):
        teacher_forced_logits(torch.nn.Linear(2, 2), stream(), make("window", 8))
    with pytest.raises(ValueError, match="prefill=50 is longer than the stream of 40"):
        teacher_forced_logits(model, stream(), make("window", 64), prefill=50)
    with pytest.raises(TypeError, match="kvlib cache"):
        teacher_forced_logits(model, stream(), object())
    cache = make("h2o", 8)
    model(stream(N=3), cache)
    assert cache.seq_len == 3
    assert isinstance(cache, EvictionCache) and "budget=8" in repr(cache)
