"""Tests for kvlib.attention: grouped vs reference vs torch SDPA, masks, dtypes, errors.

Shapes follow the module: q (B, H, T, D), k and v (B, K, S, D), masks broadcast to (B, H, T, S).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import kvlib.attention as attn_mod
from kvlib import KVCache
from kvlib.attention import (
    attention,
    causal_mask,
    padding_mask,
    reference_attention,
    repeat_kv,
    sliding_window_mask,
)

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
KINDS = {"MHA": (4, 4), "GQA": (4, 2), "MQA": (4, 1)}  # name -> (H, K)


def make_qkv(B, H, K, T, S, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, K, S, D, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, K, S, D, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def left_padding_valid(B: int, S: int, seed: int = 0) -> torch.Tensor:
    """(B, S) bool: row b has n_pad[b] leading padding slots (at least one real slot)."""
    g = torch.Generator().manual_seed(seed)
    n_pad = torch.randint(0, S, (B,), generator=g)  # (B,)
    return torch.arange(S)[None, :] >= n_pad[:, None]  # (B, S)


def build_mask(kind: str, B: int, H: int, T: int, S: int, seed: int = 0) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "causal":
        return causal_mask(T, S)  # (T, S)
    if kind == "padding":
        return padding_mask(left_padding_valid(B, S, seed))  # (B, 1, 1, S)
    if kind == "window":
        return sliding_window_mask(T, S, window=max(1, S // 2))  # (T, S)
    if kind == "causal+padding":
        return causal_mask(T, S) & padding_mask(left_padding_valid(B, S, seed))  # (B, 1, T, S)
    if kind == "per-head":
        g = torch.Generator().manual_seed(seed)
        return torch.rand(B, H, T, S, generator=g) > 0.3  # (B, H, T, S), some rows all False
    raise AssertionError(kind)


MASK_KINDS = ["none", "causal", "padding", "window", "causal+padding", "per-head"]


# ---- grouped attention == reference (repeat_kv) ------------------------------------------------
@settings(max_examples=120, deadline=None)
@given(
    B=st.integers(1, 3),
    K=st.integers(1, 3),
    G=st.integers(1, 4),
    T=st.integers(1, 5),
    extra=st.integers(0, 6),
    D=st.integers(1, 16),
    kind=st.sampled_from(MASK_KINDS),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_grouped_matches_reference(B, K, G, T, extra, D, kind, dtype, seed):
    H, S = K * G, T + extra
    q, k, v = make_qkv(B, H, K, T, S, D, dtype, seed)
    mask = build_mask(kind, B, H, T, S, seed)
    out = attention(q, k, v, mask)
    ref = reference_attention(q, k, v, mask)
    assert out.shape == (B, H, T, D) and out.dtype == dtype
    d = max_diff(out, ref)
    assert d < TOL[dtype], f"{kind} B={B} H={H} K={K} T={T} S={S} D={D} {dtype}: max diff {d:.3g}"


@pytest.mark.parametrize("name", KINDS)
def test_reference_is_per_head_attention_on_repeated_kv(name):
    """The reference reads kv head h // G for query head h (checked head by head)."""
    H, K = KINDS[name]
    G = H // K
    q, k, v = make_qkv(2, H, K, 3, 7, 8, torch.float64)
    out = reference_attention(q, k, v, causal_mask(3, 7))
    for h in range(H):
        one = reference_attention(
            q[:, h : h + 1], k[:, h // G : h // G + 1], v[:, h // G : h // G + 1], causal_mask(3, 7)
        )
        d = max_diff(out[:, h : h + 1], one)
        assert d < 1e-12, f"{name} head {h}: max diff {d:.3g}"


def test_attention_never_materializes_repeated_kv(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("attention() called repeat_kv")

    monkeypatch.setattr(attn_mod, "repeat_kv", forbidden)
    q, k, v = make_qkv(1, 8, 2, 2, 5, 4)
    out = attention(q, k, v, causal_mask(2, 5))
    assert out.shape == (1, 8, 2, 4)


def test_repeat_kv_copies_each_kv_head_for_its_group():
    x = torch.randn(2, 3, 5, 4)  # (B, K, S, D)
    y = repeat_kv(x, 4)  # (B, H, S, D)
    assert y.shape == (2, 12, 5, 4)
    for h in range(12):
        assert torch.equal(y[:, h], x[:, h // 4]), f"query head {h} should read kv head {h // 4}"
    assert repeat_kv(x, 1) is x


def test_explicit_scale_matches_reference():
    q, k, v = make_qkv(2, 4, 2, 3, 6, 8)
    out = attention(q, k, v, causal_mask(3, 6), scale=0.3)
    ref = reference_attention(q, k, v, causal_mask(3, 6), scale=0.3)
    d = max_diff(out, ref)
    assert d < 1e-5, f"max diff {d:.3g}"
    default = attention(q, k, v, causal_mask(3, 6))
    assert max_diff(out, default) > 1e-3, "scale=0.3 should differ from 1/sqrt(8)"


# ---- cross-check with torch SDPA ------------------------------------------------------------
def sdpa(q, k, v, mask=None, is_causal=False, scale=None):
    G = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, G), repeat_kv(v, G)  # (B, H, S, D)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)


@pytest.mark.parametrize("name", KINDS)
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("T,S", [(1, 1), (1, 9), (4, 9), (9, 9)])
def test_matches_torch_sdpa_with_explicit_masks(name, kind, T, S):
    H, K = KINDS[name]
    B, D = 3, 8
    q, k, v = make_qkv(B, H, K, T, S, D, torch.float64, seed=T * 31 + S)
    mask = build_mask(kind, B, H, T, S, seed=S)
    out = attention(q, k, v, mask)
    ref = sdpa(q, k, v, mask)
    # Rows with no visible key are defined as zeros here; backends disagree there, so skip them.
    full = torch.ones(B, H, T, S, dtype=torch.bool) if mask is None else mask.expand(B, H, T, S)
    rows = full.any(-1)  # (B, H, T)
    assert rows.any(), "test setup: every row masked"
    d = max_diff(out[rows], ref[rows])
    assert d < 1e-12, f"{name} {kind} T={T} S={S}: max diff vs SDPA {d:.3g}"


@pytest.mark.parametrize("T,S", [(1, 8), (3, 8), (7, 8)])
def test_sdpa_is_causal_is_top_left_and_wrong_with_a_cache(T, S):
    """Pitfall: with a cache (T < S), SDPA's is_causal=True hides keys the queries must see."""
    q, k, v = make_qkv(2, 4, 2, T, S, 8, torch.float64)
    ours = attention(q, k, v, causal_mask(T, S))  # bottom-right aligned
    theirs = sdpa(q, k, v, is_causal=True)
    d = max_diff(ours, theirs)
    assert d > 1e-2, f"T={T} < S={S}: is_causal=True should differ from bottom-right, diff {d:.3g}"
    top_left = torch.ones(T, S, dtype=torch.bool).tril()  # (T, S) query t sees slots <= t
    d_tl = max_diff(attention(q, k, v, top_left), theirs)
    assert d_tl < 1e-12, f"is_causal=True should be the top-left mask, max diff {d_tl:.3g}"


@pytest.mark.parametrize("T", [1, 5])
def test_sdpa_is_causal_is_right_without_a_cache(T):
    q, k, v = make_qkv(2, 4, 2, T, T, 8, torch.float64)
    d = max_diff(attention(q, k, v, causal_mask(T, T)), sdpa(q, k, v, is_causal=True))
    assert d < 1e-12, f"T == S = {T}: max diff {d:.3g}"


# ---- masks ------------------------------------------------------------------------------------
@pytest.mark.parametrize("T,S", [(0, 0), (0, 4), (1, 1), (1, 6), (3, 6), (6, 6)])
def test_causal_mask_is_bottom_right(T, S):
    m = causal_mask(T, S)
    assert m.shape == (T, S) and m.dtype == torch.bool
    for t in range(T):
        for s in range(S):
            assert bool(m[t, s]) == (s <= S - T + t), f"T={T} S={S} (t={t}, s={s})"


@pytest.mark.parametrize("T,S,window", [(1, 6, 3), (4, 6, 2), (6, 6, 1), (6, 6, 10), (2, 9, 4)])
def test_sliding_window_mask(T, S, window):
    m = sliding_window_mask(T, S, window)
    assert m.shape == (T, S) and m.dtype == torch.bool
    for t in range(T):
        pos = S - T + t
        for s in range(S):
            assert bool(m[t, s]) == (pos - window < s <= pos), f"t={t} s={s} window={window}"
    assert int(m.sum(-1).max()) == min(window, S)


def test_sliding_window_wider_than_sequence_is_causal():
    assert torch.equal(sliding_window_mask(3, 7, window=100), causal_mask(3, 7))


def test_padding_mask_broadcasts_over_heads_and_queries():
    valid = left_padding_valid(3, 5)
    m = padding_mask(valid)
    assert m.shape == (3, 1, 1, 5)
    assert torch.equal(m.expand(3, 4, 2, 5)[:, 2, 1], valid)


# ---- cached / decode attention: prefix invariance ------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", KINDS)
@pytest.mark.parametrize("T", [1, 3, 10])
def test_last_T_queries_equal_last_rows_of_full_causal(dtype, name, T):
    H, K = KINDS[name]
    S = 10
    q, k, v = make_qkv(2, H, K, S, S, 16, dtype)
    full = attention(q, k, v, causal_mask(S, S))  # (B, H, S, D)
    tail = attention(q[:, :, S - T :], k, v, causal_mask(T, S))  # (B, H, T, D)
    d = max_diff(tail, full[:, :, S - T :])
    assert d < TOL[dtype], f"{name} {dtype} T={T}: max diff {d:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", KINDS)
def test_decode_token_by_token_through_kv_cache(dtype, name):
    """Prefill 3 tokens, then decode one at a time: every step matches full causal attention."""
    H, K = KINDS[name]
    B, S, D, prefill = 2, 9, 8, 3
    q, k, v = make_qkv(B, H, K, S, S, D, dtype, seed=1)
    full = reference_attention(q, k, v, causal_mask(S, S))  # (B, H, S, D)
    cache = KVCache(1, B, K, D, max_seq_len=S, dtype=dtype)
    k_all, v_all = cache.update(0, k[:, :, :prefill], v[:, :, :prefill])
    outs = [attention(q[:, :, :prefill], k_all, v_all, causal_mask(prefill, prefill))]
    for t in range(prefill, S):
        k_all, v_all = cache.update(0, k[:, :, t : t + 1], v[:, :, t : t + 1])  # (B, K, t+1, D)
        outs.append(attention(q[:, :, t : t + 1], k_all, v_all, causal_mask(1, t + 1)))
    d = max_diff(torch.cat(outs, dim=2), full)
    assert d < TOL[dtype], f"{name} {dtype}: cached decode vs full causal max diff {d:.3g}"


@settings(max_examples=60, deadline=None)
@given(T=st.integers(1, 8), extra=st.integers(0, 8), G=st.integers(1, 3), seed=st.integers(0, 999))
def test_prefix_invariance_property(T, extra, G, seed):
    S = T + extra
    q, k, v = make_qkv(1, 2 * G, 2, S, S, 4, torch.float64, seed)
    full = attention(q, k, v, causal_mask(S, S))
    tail = attention(q[:, :, S - T :], k, v, causal_mask(T, S))
    d = max_diff(tail, full[:, :, S - T :])
    assert d < 1e-12, f"T={T} S={S} G={G}: max diff {d:.3g}"


# ---- low precision ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 4e-2)])
@pytest.mark.parametrize("fn", [attention, reference_attention])
def test_half_precision_close_to_float64(dtype, tol, fn):
    q, k, v = make_qkv(2, 8, 2, 4, 64, 32, dtype)
    mask = causal_mask(4, 64) & padding_mask(left_padding_valid(2, 64))
    out = fn(q, k, v, mask)
    assert out.dtype == dtype, f"output dtype {out.dtype}, expected {dtype}"
    ref = reference_attention(q.double(), k.double(), v.double(), mask)  # same inputs, fp64
    d = max_diff(out, ref)
    assert d < tol, f"{fn.__name__} {dtype}: max diff vs fp64 {d:.3g} (tolerance {tol})"
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("fn", [attention, reference_attention])
def test_softmax_runs_in_fp32_or_wider(monkeypatch, dtype, fn):
    seen = []
    real_softmax = torch.softmax

    def spy(x, *args, **kwargs):
        seen.append(x.dtype)
        return real_softmax(x, *args, **kwargs)

    monkeypatch.setattr(torch, "softmax", spy)
    q, k, v = make_qkv(1, 4, 2, 2, 5, 8, dtype)
    out = fn(q, k, v, causal_mask(2, 5))
    expected = torch.float64 if dtype == torch.float64 else torch.float32
    assert seen == [expected], f"{fn.__name__} {dtype}: softmax ran in {seen}, expected {expected}"
    assert out.dtype == dtype


# ---- fully masked rows ------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [attention, reference_attention])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_fully_masked_rows_are_zero_not_nan(fn, dtype):
    """Left-padded prompt: a padding query sees no real key, so its row is all zeros."""
    B, H, K, S = 2, 4, 2, 6
    n_pad = torch.tensor([3, 0])
    valid = torch.arange(S)[None, :] >= n_pad[:, None]  # (B, S)
    mask = causal_mask(S, S) & padding_mask(valid)  # (B, 1, S, S)
    q, k, v = make_qkv(B, H, K, S, S, 8, dtype)
    out = fn(q, k, v, mask)
    assert not torch.isnan(out).any(), f"{fn.__name__} {dtype}: NaN in output"
    assert torch.equal(out[0, :, :3], torch.zeros_like(out[0, :, :3])), "padding queries not zero"
    assert out[0, :, 3:].abs().sum() > 0 and out[1].abs().sum() > 0, "real queries lost"


def test_nan_inputs_are_not_hidden_by_masking():
    q, k, v = make_qkv(1, 2, 2, 2, 4, 4)
    q[0, 0, 1, 0] = float("nan")
    out = attention(q, k, v, causal_mask(2, 4))
    assert torch.isnan(out[0, 0, 1]).all(), "a NaN query must propagate, not become zeros"
    assert not torch.isnan(out[0, 1]).any()


# ---- error paths -------------------------------------------------------------------------------
FNS = [attention, reference_attention]


@pytest.mark.parametrize("fn", FNS)
def test_error_not_4d(fn):
    q, k, v = make_qkv(1, 4, 2, 2, 5, 8)
    with pytest.raises(ValueError, match="must be 4-D"):
        fn(q[0], k, v)
    with pytest.raises(ValueError, match="must be 4-D"):
        fn(q, k[0], v[0])


@pytest.mark.parametrize("fn", FNS)
def test_error_not_a_tensor(fn):
    q, k, v = make_qkv(1, 4, 2, 2, 5, 8)
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        fn(q, k.numpy(), v)


@pytest.mark.parametrize("fn", FNS)
def test_error_k_v_shape_mismatch(fn):
    q, k, v = make_qkv(1, 4, 2, 2, 5, 8)
    with pytest.raises(ValueError, match="k and v shapes differ"):
        fn(q, k, v[:, :, :4])


@pytest.mark.parametrize("fn", FNS)
def test_error_batch_or_head_dim_mismatch(fn):
    q, k, v = make_qkv(2, 4, 2, 2, 5, 8)
    with pytest.raises(ValueError, match="disagree on B or D"):
        fn(q[:1], k, v)
    with pytest.raises(ValueError, match="disagree on B or D"):
        fn(q[..., :4], k, v)


@pytest.mark.parametrize("fn", FNS)
def test_error_heads_not_divisible(fn):
    q, k, v = make_qkv(1, 4, 3, 2, 5, 8)
    with pytest.raises(ValueError, match="4 query heads cannot be grouped over 3 kv heads"):
        fn(q, k, v)
    with pytest.raises(ValueError, match="cannot be grouped over 0 kv heads"):
        fn(q, k[:, :0], v[:, :0])


@pytest.mark.parametrize("fn", FNS)
def test_error_fewer_keys_than_queries(fn):
    q, k, v = make_qkv(1, 4, 2, 6, 5, 8)
    with pytest.raises(ValueError, match="6 queries but only 5 keys"):
        fn(q, k, v)


@pytest.mark.parametrize("fn", FNS)
def test_error_dtype_mismatch(fn):
    q, k, v = make_qkv(1, 4, 2, 2, 5, 8)
    with pytest.raises(ValueError, match="share one floating dtype"):
        fn(q.half(), k, v)
    with pytest.raises(ValueError, match="share one floating dtype"):
        fn(q.long(), k.long(), v.long())


@pytest.mark.parametrize("fn", FNS)
def test_error_device_mismatch(fn):
    q, k, v = make_qkv(1, 4, 2, 2, 5, 8)
    with pytest.raises(ValueError, match="must be on one device"):
        fn(q.to("meta"), k, v)
    with pytest.raises(ValueError, match="mask is on meta"):
        fn(q, k, v, causal_mask(2, 5, device="meta"))


@pytest.mark.parametrize("fn", FNS)
def test_error_bad_mask(fn):
    q, k, v = make_qkv(2, 4, 2, 2, 5, 8)
    with pytest.raises(ValueError, match="mask must be bool"):
        fn(q, k, v, causal_mask(2, 5).float())
    with pytest.raises(TypeError, match="mask must be a bool torch.Tensor"):
        fn(q, k, v, [[True] * 5] * 2)
    with pytest.raises(ValueError, match="at most 4 dims"):
        fn(q, k, v, causal_mask(2, 5)[None, None, None])
    with pytest.raises(ValueError, match=r"does not broadcast to \(B, H, T, S\)"):
        fn(q, k, v, causal_mask(2, 4))  # S=4, keys S=5
    with pytest.raises(ValueError, match="does not broadcast"):
        fn(q, k, v, causal_mask(5, 5))  # T=5, queries T=2
    with pytest.raises(ValueError, match="does not broadcast"):
        fn(q, k, v, torch.ones(3, 1, 2, 5, dtype=torch.bool))  # B=3 vs 2
    with pytest.raises(ValueError, match="does not broadcast"):
        fn(q, k, v, torch.ones(2, 2, 2, 5, dtype=torch.bool))  # per kv head, not per query head


def test_error_causal_mask_arguments():
    with pytest.raises(ValueError, match=r"0 <= T <= S, got T=3, S=2"):
        causal_mask(3, 2)
    with pytest.raises(ValueError, match=r"T must be an int >= 0, got -1"):
        causal_mask(-1, 2)
    with pytest.raises(TypeError, match="T must be an int"):
        causal_mask(1.5, 2)
    with pytest.raises(TypeError, match="S must be an int"):
        causal_mask(1, torch.tensor(2.0))


def test_error_sliding_window_arguments():
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        sliding_window_mask(2, 4, 0)
    with pytest.raises(TypeError, match="window must be an int"):
        sliding_window_mask(2, 4, 2.0)
    with pytest.raises(ValueError, match=r"0 <= T <= S"):
        sliding_window_mask(5, 4, 2)


def test_error_padding_mask_arguments():
    with pytest.raises(ValueError, match=r"valid must be a \(B, S\) bool tensor"):
        padding_mask(torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"valid must be a \(B, S\) bool tensor"):
        padding_mask(torch.ones(5, dtype=torch.bool))
    with pytest.raises(TypeError, match="valid must be a"):
        padding_mask([[True, False]])


def test_error_repeat_kv_arguments():
    x = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="n_rep must be an int >= 1"):
        repeat_kv(x, 0)
    with pytest.raises(TypeError, match="n_rep must be an int"):
        repeat_kv(x, 2.0)
    with pytest.raises(ValueError, match=r"4-D \(B, K, S, D\)"):
        repeat_kv(x[0], 2)
    with pytest.raises(TypeError, match="expects a torch.Tensor"):
        repeat_kv(x.numpy(), 2)


def test_real_slots_marks_slots_at_or_after_each_rows_start():
    from kvlib.attention import real_slots

    got = real_slots(torch.tensor([0, 2, 4]), 4)
    want = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(got, want)
