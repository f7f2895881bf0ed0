"""The decoder: building blocks against float64 references, cached vs uncached logits, misuse."""

import math

import numpy as np
import pytest
import torch

from kvlib.config import tiny
from kvlib.errors import CacheFullError
from kvlib.kv_cache import ConcatKVCache, KVCache
from kvlib.transformer import (
    RMSNorm,
    Transformer,
    apply_rope,
    pad_lengths,
    position_ids,
    rope_tables,
)
from tests.models import CONFIGS, model_for


def tokens(B, T, seed=1, V=64):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def maxdiff(a, b):
    return (a.double() - b.double()).abs().max().item()


# ---- building blocks ---------------------------------------------------------------------------


def test_rmsnorm_matches_float64_reference():
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 16)
    xd = x.double().numpy()
    ref = (
        xd / np.sqrt((xd**2).mean(-1, keepdims=True) + 1e-5) * norm.weight.detach().double().numpy()
    )
    d = np.abs(norm(x).detach().double().numpy() - ref).max()
    assert d < 1e-5, f"RMSNorm max diff {d:.3g}"


def test_rmsnorm_in_bf16_reduces_in_fp32():
    norm = RMSNorm(64).to(torch.bfloat16)
    x = torch.randn(2, 64) * 300
    out = norm(x.to(torch.bfloat16))
    ref = x / x.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()
    assert out.dtype == torch.bfloat16
    assert maxdiff(out, ref) < 2e-2, f"bf16 RMSNorm max diff {maxdiff(out, ref):.3g}"


def test_rope_matches_complex_rotation_in_float64():
    D, S, theta = 8, 20, 100.0
    cos, sin = rope_tables(D, S, theta)
    x = torch.randn(1, 1, S, D, dtype=torch.float64)
    ours = apply_rope(x, cos.double(), sin.double())[0, 0].numpy()
    # channel i pairs with channel i + D/2 and turns by angle pos * theta^(-2i/D)
    z = x[0, 0, :, : D // 2].numpy() + 1j * x[0, 0, :, D // 2 :].numpy()  # (S, D/2)
    angle = np.arange(S)[:, None] * theta ** (-np.arange(0, D, 2) / D)[None, :]
    rz = z * np.exp(1j * angle)
    ref = np.concatenate([rz.real, rz.imag], axis=-1)
    d = np.abs(ours - ref).max()
    assert d < 1e-6, f"RoPE vs complex rotation max diff {d:.3g}"


def test_rope_scores_depend_only_on_relative_position():
    D = 16
    cos, sin = rope_tables(D, 64)
    q, k = torch.randn(D), torch.randn(D)

    def score(i, j):
        qi = apply_rope(q[None], cos[i], sin[i])[0]
        kj = apply_rope(k[None], cos[j], sin[j])[0]
        return float(qi @ kj)

    a, b = score(10, 7), score(40, 37)
    assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5), f"{a} != {b}"


def test_rope_tables_reject_odd_head_dim():
    with pytest.raises(ValueError, match="head_dim must be even"):
        rope_tables(7, 10)


def test_parameter_count_matches_config():
    for config in CONFIGS.values():
        model = Transformer(config)
        n = sum(p.numel() for p in model.parameters())  # shared tensors counted once
        assert n == config.n_params, f"{config.attention_kind}: {n} vs {config.n_params}"


def test_rope_tables_stay_fp32_after_casting_the_model():
    model = Transformer(tiny()).to(torch.bfloat16)
    assert model.rope_cos.dtype == torch.float32 and model.dtype == torch.bfloat16
    ref, _ = rope_tables(model.config.head_dim, model.config.max_seq_len)
    assert maxdiff(model.rope_cos, ref) == 0.0


# ---- cached vs uncached ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", CONFIGS)
@pytest.mark.parametrize("cache_cls", [KVCache, ConcatKVCache])
def test_prefill_then_decode_matches_full_forward(kind, cache_cls):
    model = model_for(CONFIGS[kind])
    x = tokens(2, 20)
    c = model.config
    cache = cache_cls(c.n_layers, 2, c.n_kv_heads, c.head_dim, 32)
    with torch.no_grad():
        full = model(x)  # (B, T, V), no cache
        parts = [model(x[:, :8], cache)]
        parts += [model(x[:, t : t + 1], cache) for t in range(8, 20)]
    d = maxdiff(torch.cat(parts, 1), full)
    assert d < 1e-5, f"{kind}: cached vs uncached max |logit diff| = {d:.3g}"
    assert cache.seq_len == 20


@pytest.mark.parametrize("kind", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unmasked_decode_step_matches_the_masked_path(kind, dtype):
    """A decode step without padding passes mask=None (every slot visible) to attend; an
    all-True mask gives the same attention."""
    model = model_for(CONFIGS[kind]).to(dtype)
    c = model.config
    x = tokens(2, 9)
    caches = [KVCache(c.n_layers, 2, c.n_kv_heads, c.head_dim, 16, dtype=dtype) for _ in "abc"]
    with torch.no_grad():
        for cache in caches:
            model(x[:, :8], cache)
    q = torch.randn(2, c.n_heads, 1, c.head_dim, dtype=dtype)
    k, v = (torch.randn(2, c.n_kv_heads, 1, c.head_dim, dtype=dtype) for _ in "kv")
    unmasked = caches[0].attend(0, q, k, v, None)
    masked = caches[1].attend(0, q, k, v, torch.ones(2, 1, 1, 9, dtype=torch.bool))
    d = maxdiff(unmasked, masked)
    assert d < (1e-6 if dtype == torch.float32 else 1e-12), f"{kind} {dtype}: max diff {d:.3g}"
    seen = []
    attend = caches[2].attend
    caches[2].attend = lambda *a: seen.append(a[-1]) or attend(*a)
    with torch.no_grad():
        model(x[:, 8:], caches[2])
    assert seen == [None] * c.n_layers, "a decode step without padding passes mask=None"


def test_chunks_of_several_tokens_use_a_bottom_right_causal_mask():
    model = model_for(tiny())
    x = tokens(1, 15)
    cache = KVCache.from_config(model.config, 1, 16)
    with torch.no_grad():
        full = model(x)
        parts = [model(x[:, a:b], cache) for a, b in ((0, 4), (4, 9), (9, 15))]
    d = maxdiff(torch.cat(parts, 1), full)
    assert d < 1e-5, f"chunked prefill max |logit diff| = {d:.3g}"


def test_last_only_returns_the_last_position():
    model = model_for(tiny())
    x = tokens(2, 6)
    with torch.no_grad():
        d = maxdiff(model(x, last_only=True), model(x)[:, -1:])
    assert d < 1e-6, f"last_only max diff {d:.3g}"


def test_bf16_cache_for_fp32_model_is_close_but_not_equal():
    model = model_for(tiny())
    x = tokens(1, 12)
    with torch.no_grad():
        full = model(x)
        cache = KVCache.from_config(model.config, 1, 16, dtype=torch.bfloat16)
        model(x[:, :6], cache)
        dec = torch.cat([model(x[:, t : t + 1], cache) for t in range(6, 12)], 1)
    d = maxdiff(dec, full[:, 6:])
    assert 0 < d < 0.1, f"bf16 cache max |logit diff| = {d:.3g}"


def test_left_padded_rows_match_rows_alone():
    model = model_for(tiny())
    row = tokens(1, 5)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), row], 1)  # (1, 8)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        alone = model(row)
        no_cache = model(padded, attention_mask=mask)[:, 3:]
        cache = KVCache.from_config(model.config, 1, 8)
        cached = model(padded, cache, attention_mask=mask)[:, 3:]
    for name, got in (("no cache", no_cache), ("cache", cached)):
        assert maxdiff(got, alone) < 1e-5, f"{name}: {maxdiff(got, alone):.3g}"
    assert cache.start.tolist() == [3]


def test_position_ids_skip_padding():
    start = torch.tensor([0, 2])
    assert position_ids(start, 0, 4).tolist() == [[0, 1, 2, 3], [0, 0, 0, 1]]
    assert position_ids(start, 4, 1).tolist() == [[4], [2]]


def test_left_padding_counts_leading_zeros():
    mask = torch.tensor([[1, 1, 1], [0, 1, 1], [0, 0, 1]])
    assert pad_lengths(mask).tolist() == [0, 1, 2]


# ---- misuse ------------------------------------------------------------------------------------


@pytest.fixture
def model():
    return model_for(tiny())


def test_float_tokens_raise(model):
    with pytest.raises(TypeError, match="int64 token ids"):
        model(torch.zeros(1, 3))


def test_1d_tokens_raise(model):
    with pytest.raises(ValueError, match=r"shape \(B, T\)"):
        model(torch.zeros(3, dtype=torch.long))


def test_empty_prompt_raises(model):
    with pytest.raises(ValueError, match="empty input"):
        model(torch.zeros(1, 0, dtype=torch.long))


def test_token_out_of_range_raises_and_leaves_cache(model):
    cache = KVCache.from_config(model.config, 1, 8)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 64\)"):
        model(torch.tensor([[1, 64]]), cache)
    assert cache.seq_len == 0


def test_prompt_longer_than_cache_raises_and_leaves_cache(model):
    cache = KVCache.from_config(model.config, 1, 8)
    with torch.no_grad():
        model(tokens(1, 5), cache)
    before = cache.keys[0].clone()
    with pytest.raises(CacheFullError, match="holds 5 of 8 slots; 4 new tokens"):
        model(tokens(1, 4), cache)
    assert cache.seq_len == 5 and torch.equal(cache.keys[0], before)


def test_prompt_longer_than_max_seq_len_raises(model):
    with pytest.raises(ValueError, match=r"positions must be in \[0, 128\)"):
        model(torch.zeros(1, 129, dtype=torch.long))


@pytest.mark.parametrize(
    "field,value", [("n_layers", 3), ("n_kv_heads", 4), ("head_dim", 16), ("batch_size", 2)]
)
def test_cache_for_another_shape_raises(model, field, value):
    c = model.config
    args = dict(n_layers=c.n_layers, batch_size=1, n_kv_heads=c.n_kv_heads, head_dim=c.head_dim)
    args[field] = value
    cache = KVCache(**args, max_seq_len=16)
    with pytest.raises(ValueError, match=f"cache (has {field}|holds 2 rows)"):
        model(tokens(1, 3), cache)
    assert cache.seq_len == 0


def test_right_padding_raises(model):
    with pytest.raises(ValueError, match="only LEFT padding"):
        model(tokens(2, 3), attention_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]))


def test_mask_without_real_tokens_raises(model):
    with pytest.raises(ValueError, match=r"rows \[1\] have no real tokens"):
        model(tokens(2, 3), attention_mask=torch.tensor([[1, 1, 1], [0, 0, 0]]))


def test_mask_values_must_be_0_or_1(model):
    with pytest.raises(ValueError, match="only 0 .padding. and 1"):
        model(tokens(1, 3), attention_mask=torch.tensor([[0, 2, 1]]))


def test_mask_shape_must_match_tokens(model):
    with pytest.raises(ValueError, match=r"shape of tokens \(1, 3\)"):
        model(tokens(1, 3), attention_mask=torch.ones(1, 4, dtype=torch.long))


def test_mask_on_a_non_empty_cache_raises(model):
    cache = KVCache.from_config(model.config, 1, 16)
    with torch.no_grad():
        model(tokens(1, 3), cache)
    with pytest.raises(ValueError, match="needs an empty cache; this one holds 3"):
        model(tokens(1, 2), cache, attention_mask=torch.ones(1, 2, dtype=torch.long))
    assert cache.seq_len == 3


def test_config_must_be_a_model_config():
    with pytest.raises(TypeError, match="kvlib ModelConfig"):
        Transformer({"dim": 4})


def test_explicit_position_ids_override_and_matter(model):
    x = tokens(1, 6)
    with torch.no_grad():
        default = model(x)
        same = model(x, position_ids=torch.arange(6)[None])
        shifted = model(x, position_ids=torch.arange(3, 9)[None])  # same relative distances
        broken = model(x, position_ids=torch.tensor([[0, 1, 2, 3, 4, 9]]))
    assert maxdiff(same, default) == 0.0
    # RoPE scores depend only on position differences: a uniform shift changes nothing ...
    assert maxdiff(shifted, default) < 1e-4, f"shift changed logits by {maxdiff(shifted, default)}"
    # ... but a wrong relative distance does.
    assert maxdiff(broken[:, -1], default[:, -1]) > 1e-3, "positions had no effect on the logits"


@pytest.mark.parametrize(
    "pos,match",
    [
        (torch.arange(5)[None], r"shape \(1, 6\)"),
        (torch.arange(6.0)[None], "integer tensor"),
        (torch.arange(200, 206)[None], r"must be in \[0, 128\)"),
    ],
)
def test_bad_position_ids_raise(model, pos, match):
    with pytest.raises(ValueError, match=match):
        model(tokens(1, 6), position_ids=pos)


def test_check_tokens_names_the_argument():
    from kvlib.transformer import check_tokens

    with pytest.raises(TypeError, match="prompt must be a torch.Tensor of token ids, got list"):
        check_tokens([[1, 2]], 64, "prompt")
    with pytest.raises(TypeError, match="prompt must be int64 token ids, got torch.float32"):
        check_tokens(torch.zeros(1, 2), 64, "prompt")
    with pytest.raises(ValueError, match=r"add a batch axis with prompt\[None\]"):
        check_tokens(torch.zeros(3, dtype=torch.long), 64, "prompt")
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 8\), got values in \[0, 9\]"):
        check_tokens(torch.tensor([[0, 9]]), 8)
    check_tokens(torch.tensor([[0, 7]], dtype=torch.int32), 8)  # valid: no error
