import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlib import CacheFullError, ConcatKVCache, KVCache, KVCacheError
from kvlib.config import tiny

L, B, K, D, S_MAX = 2, 3, 2, 4, 16


def make(cls=KVCache, **kw):
    args = dict(dtype=torch.float32, device="cpu") | kw
    return cls(L, B, K, D, S_MAX, **args)


def kv(T, dtype=torch.float32, b=B):
    return torch.randn(b, K, T, D, dtype=dtype), torch.randn(b, K, T, D, dtype=dtype)


def snapshot(cache):
    return (
        list(cache._len),
        cache.start.clone(),
        [t.clone() for t in cache.keys],
        [t.clone() for t in cache.values],
    )


def assert_unchanged(cache, before):
    after = snapshot(cache)
    assert after[0] == before[0]
    assert torch.equal(after[1], before[1])
    for x, y in zip(after[2] + after[3], before[2] + before[3], strict=True):
        assert torch.equal(x, y)


def test_update_returns_all_tokens_so_far():
    cache = make()
    k1, v1 = kv(5)
    k2, v2 = kv(1)
    for layer in range(L):
        cache.update(layer, k1, v1)
    assert cache.seq_len == 5
    ks, vs = cache.update(0, k2, v2)
    assert ks.shape == (B, K, 6, D)
    assert torch.equal(ks, torch.cat([k1, k2], dim=2))
    assert torch.equal(vs, torch.cat([v1, v2], dim=2))
    # layer 0 ran ahead: the cache's length is what every layer holds
    assert cache.seq_len == 5 and cache.layer_len(0) == 6


def test_update_is_in_place_no_reallocation():
    cache = make()
    ptr = cache.keys[0].data_ptr()
    for _ in range(S_MAX):
        cache.update(0, *kv(1))
    assert cache.keys[0].data_ptr() == ptr


@settings(max_examples=25, deadline=None)
@given(chunks=st.lists(st.integers(1, 4), min_size=1, max_size=4))
def test_preallocated_matches_concat_reference(chunks):
    fast, ref = make(), make(ConcatKVCache)
    for T in chunks:
        k, v = kv(T)
        for layer in range(L):
            a = fast.update(layer, k, v)
            b = ref.update(layer, k, v)
            for x, y in zip(a, b, strict=True):
                diff = (x - y).abs().max().item()
                assert diff == 0, f"preallocated vs concat differ by {diff}"
    assert fast.seq_len == ref.seq_len == sum(chunks)
    assert fast.nbytes_used == ref.nbytes_used


def test_from_config_shapes_and_memory():
    cfg = tiny()
    cache = KVCache.from_config(cfg, batch_size=2, dtype=torch.float16)
    assert cache.keys[0].shape == (2, cfg.n_kv_heads, cfg.max_seq_len, cfg.head_dim)
    assert cache.nbytes_allocated == 2 * cfg.max_seq_len * cfg.kv_bytes_per_token(torch.float16)
    assert cache.nbytes_used == 0
    cache2 = KVCache.from_config(cfg, batch_size=1, max_seq_len=10)
    assert cache2.max_seq_len == 10


def test_memory_accounting_counts_only_real_tokens():
    cache = make()
    cache.set_left_padding(torch.tensor([0, 2, 4]))
    for layer in range(L):
        cache.update(layer, *kv(6))
    assert cache.lengths.tolist() == [6, 4, 2]
    per_token = 2 * L * K * D * 4
    assert cache.nbytes_used == 12 * per_token
    assert cache.nbytes_allocated == B * S_MAX * per_token


def test_valid_mask_marks_padding():
    cache = make()
    cache.set_left_padding(torch.tensor([0, 1, 3]))
    mask = cache.valid_mask(4)
    assert mask.tolist() == [
        [True, True, True, True],
        [False, True, True, True],
        [False, False, False, True],
    ]


def test_crop_rolls_back_and_next_update_overwrites():
    cache = make()
    k, v = kv(8)
    for layer in range(L):
        cache.update(layer, k, v)
    cache.crop(5)
    assert cache.seq_len == 5
    k2, v2 = kv(1)
    ks, _ = cache.update(0, k2, v2)
    assert torch.equal(ks[:, :, :5], k[:, :, :5])
    assert torch.equal(ks[:, :, 5:], k2)


def test_reset_empties_and_clears_padding():
    cache = make()
    cache.set_left_padding(torch.tensor([1, 0, 0]))
    cache.update(0, *kv(2))
    cache.reset()
    assert cache.seq_len == 0
    assert cache.start.tolist() == [0, 0, 0]
    cache.set_left_padding(torch.tensor([0, 0, 1]))  # allowed again once empty


# ---- misuse: each error, and the cache unchanged afterwards ------------------------------------


def filled():
    cache = make()
    for layer in range(L):
        cache.update(layer, *kv(3))
    return cache


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda c: c.update(0, *kv(S_MAX)), CacheFullError, "would overflow"),
        (lambda c: c.update(0, *kv(2, b=B + 1)), KVCacheError, "must have shape"),
        (
            lambda c: c.update(0, torch.randn(B, K, 2, D + 1), torch.randn(B, K, 2, D + 1)),
            KVCacheError,
            "must have shape",
        ),
        (
            lambda c: c.update(0, torch.randn(B, K, 2, D), torch.randn(B, K, 3, D)),
            KVCacheError,
            "shapes differ",
        ),
        (
            lambda c: c.update(0, torch.randn(K, 2, D), torch.randn(K, 2, D)),
            KVCacheError,
            "must have shape",
        ),
        (lambda c: c.update(0, *kv(2, dtype=torch.float16)), KVCacheError, "dtype"),
        (lambda c: c.update(0, *kv(0)), KVCacheError, "zero new tokens"),
        (lambda c: c.update(0, [1.0], [1.0]), KVCacheError, "torch.Tensor"),
        (lambda c: c.update(L, *kv(1)), IndexError, "out of range"),
        (lambda c: c.update(-1, *kv(1)), IndexError, "out of range"),
        (lambda c: c.update(0.0, *kv(1)), TypeError, "layer must be an int"),
        (lambda c: c.crop(4), KVCacheError, r"crop length must be an int in \[0, 3\]"),
        (lambda c: c.crop(-1), KVCacheError, "crop length"),
        (lambda c: c.set_left_padding(torch.tensor([0, 0, 0])), KVCacheError, "already holds"),
    ],
)
def test_misuse_raises_and_leaves_cache_unchanged(call, error, match):
    cache = filled()
    before = snapshot(cache)
    with pytest.raises(error, match=match):
        call(cache)
    assert_unchanged(cache, before)


def test_device_mismatch_raises():
    cache = make()
    meta_k = torch.empty(B, K, 1, D, device="meta")
    with pytest.raises(KVCacheError, match="is on meta"):
        cache.update(0, meta_k, meta_k)


def test_crop_mid_step_raises():
    cache = filled()
    cache.update(0, *kv(1))
    with pytest.raises(KVCacheError, match="mid-step"):
        cache.crop(2)


@pytest.mark.parametrize(
    ("pad", "match"),
    [
        (torch.tensor([0, 1]), r"shape \(3,\)"),
        (torch.tensor([0.0, 1.0, 0.0]), "integer tensor"),
        (torch.tensor([0, -1, 0]), "non-negative"),
    ],
)
def test_bad_padding_raises(pad, match):
    with pytest.raises(KVCacheError, match=match):
        make().set_left_padding(pad)


@pytest.mark.parametrize(
    ("args", "kw", "match"),
    [
        ((0, B, K, D, S_MAX), {}, "n_layers must be an int >= 1"),
        ((L, B, K, D, 0), {}, "max_seq_len must be an int >= 1"),
        ((L, B, K, D, S_MAX), {"dtype": torch.int8}, "floating torch.dtype"),
    ],
)
def test_bad_construction_raises(args, kw, match):
    with pytest.raises(KVCacheError, match=match):
        KVCache(*args, **kw)


def test_concat_cache_respects_optional_capacity():
    cache = ConcatKVCache(L, B, K, D, max_seq_len=2)
    with pytest.raises(CacheFullError):
        cache.update(0, *kv(3))


def test_elements_copied_linear_for_preallocated_quadratic_for_concat():
    n = 10
    fast, ref = make(), make(ConcatKVCache)
    for _ in range(n):
        k, v = kv(1)
        fast.update(0, k, v)
        ref.update(0, k, v)
    per_token = 2 * B * K * D  # K and V elements of one token
    assert fast.elements_copied == n * per_token
    assert ref.elements_copied == per_token * n * (n + 1) // 2


def test_crop_into_padding_then_append_counts_new_tokens():
    cache = make()
    cache.set_left_padding(torch.tensor([0, 2, 4]))
    for layer in range(L):
        cache.update(layer, *kv(5))
    cache.crop(3)  # row 2 is cropped into its padding: no real tokens left
    assert cache.lengths.tolist() == [3, 1, 0]
    for layer in range(L):
        cache.update(layer, *kv(1))
    assert cache.lengths.tolist() == [4, 2, 1]
    assert cache.valid_mask(4)[2].tolist() == [False, False, False, True]


def test_sizes_are_refused_not_replaced():
    config = tiny()
    with pytest.raises(KVCacheError, match="max_seq_len must be an int >= 1, got 0"):
        KVCache.from_config(config, 1, 0)
    with pytest.raises(KVCacheError, match="max_seq_len must be an int >= 1, got 0"):
        ConcatKVCache(2, 1, 2, 8, 0)
    cache = KVCache.from_config(config, 2, 8)
    with pytest.raises(KVCacheError, match=r"n_pad \[9, 0\] runs past the capacity of 8"):
        cache.set_left_padding(torch.tensor([9, 0]))
    assert cache.start.tolist() == [0, 0]
    with pytest.raises(KVCacheError, match="must be an integer tensor"):
        cache.set_left_padding([1, 0])
