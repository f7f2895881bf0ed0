import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlib import CacheFullError, KVCache, KVCacheError
from kvlib.config import tiny
from kvlib.memory import KVQuant, kv_bytes_per_token
from kvlib.quant import (
    FP8_HEADROOM,
    SCHEMES,
    QuantizedKVCache,
    QuantizedTensor,
    QuantScheme,
    dequantize,
    fp8_scale,
    kivi,
    n_quantized,
    pack,
    quantize,
    quantize_fp8,
    quantize_stream,
    roundtrip,
    unpack,
)
from kvlib.transformer import Transformer

EPS32 = torch.finfo(torch.float32).eps


def assert_within_half_step(x, qt):
    """|x - x_hat| <= step / 2, up to fp32 round-off of numbers as large as x."""
    err = (x.float() - dequantize(qt, torch.float32)).abs()
    bound = 0.5 * qt.step() + 8 * EPS32 * (x.float().abs() + qt.step() * 2**qt.bits)
    worst = (err - bound).max().item()
    assert worst <= 0, f"error exceeds half a step by {worst} (max error {err.max().item()})"


# ---- quantize / dequantize ---------------------------------------------------------------------


@settings(max_examples=120, deadline=None)
@given(
    lead=st.lists(st.integers(1, 3), max_size=2),
    S=st.integers(1, 6),
    d_mult=st.integers(1, 3),
    bits=st.sampled_from([2, 4, 8]),
    gran=st.sampled_from(["token", "group", "channel"]),
    symmetric=st.booleans(),
    scale=st.floats(1e-3, 1e3),
    offset=st.floats(-100, 100),
    seed=st.integers(0, 2**16),
)
def test_roundtrip_error_at_most_half_a_step(
    lead, S, d_mult, bits, gran, symmetric, scale, offset, seed
):
    D = 8 * d_mult
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, S, D, generator=g) * scale + offset
    group_size = 4 if gran == "group" else (S if gran == "channel" and S % 2 else None)
    qt = quantize(x, bits, granularity=gran, group_size=group_size, symmetric=symmetric)
    assert qt.data.dtype == torch.uint8 and qt.data.shape == (*lead, S, D * bits // 8)
    assert qt.scale.dtype == torch.float32
    assert_within_half_step(x, qt)


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(
        st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32),
        min_size=8,
        max_size=8,
    ),
    bits=st.sampled_from([2, 4, 8]),
    symmetric=st.booleans(),
)
def test_roundtrip_bound_on_arbitrary_values(values, bits, symmetric):
    x = torch.tensor(values, dtype=torch.float32).reshape(1, 8)  # (S=1, D=8)
    assert_within_half_step(x, quantize(x, bits, symmetric=symmetric))


def test_symmetric_int8_by_hand():
    x = torch.tensor([[-1.0, 0.5, 0.25, 1.0]])  # (S=1, D=4)
    qt = quantize(x, 8, symmetric=True)
    assert qt.scale.item() == pytest.approx(1 / 127)
    codes = unpack(qt.data, 8).long() - 128
    assert codes.tolist() == [[-127, round(0.5 * 127), round(0.25 * 127), 127]]
    assert qt.zero is None and qt.symmetric


def test_asymmetric_maps_min_and_max_to_the_end_codes():
    x = torch.tensor([[2.0, 3.0, 5.0, 17.0]])  # (S=1, D=4)
    qt = quantize(x, 4, symmetric=False)
    assert qt.zero.item() == 2.0
    assert qt.scale.item() == pytest.approx(15 / 15)
    codes = unpack(qt.data, 4)
    assert codes.tolist() == [[0, 1, 3, 15]]
    assert torch.equal(dequantize(qt), x)


def test_constant_group_is_exact_and_has_no_zero_division():
    x = torch.full((3, 8), 0.75)
    for symmetric in (True, False):
        out = roundtrip(x, 4, symmetric=symmetric)
        assert torch.isfinite(out).all()
        assert (out - x).abs().max().item() == 0
    zeros = torch.zeros(2, 8)
    assert torch.equal(roundtrip(zeros, 8), zeros)


def test_scale_shapes_per_granularity():
    x = torch.randn(2, 3, 16, 8)  # (B, K, S, D)
    assert quantize(x, granularity="token").scale.shape == (2, 3, 16, 1)
    assert quantize(x, granularity="group", group_size=4).scale.shape == (2, 3, 16, 2)
    assert quantize(x, granularity="channel").scale.shape == (2, 3, 1, 8)
    assert quantize(x, granularity="channel", group_size=4).scale.shape == (2, 3, 4, 8)


def test_per_channel_scales_follow_outlier_channels():
    x = torch.randn(64, 16)  # (S, D)
    x[:, 3] *= 50  # one outlier channel
    normal = torch.arange(16) != 3
    tok = (roundtrip(x, 4, granularity="token") - x)[:, normal].abs().mean().item()
    chan = (roundtrip(x, 4, granularity="channel") - x)[:, normal].abs().mean().item()
    assert chan < tok / 5, f"per-channel error {chan} should be far below per-token {tok}"


def test_dequantize_keeps_or_changes_dtype():
    x = torch.randn(4, 8, dtype=torch.float16)
    qt = quantize(x, 8)
    assert dequantize(qt).dtype == torch.float16
    assert dequantize(qt, torch.float32).dtype == torch.float32
    bf = torch.randn(4, 8, dtype=torch.bfloat16)
    assert_within_half_step(bf, quantize(bf, 8))


def test_nbytes_counts_codes_scales_and_zero_points():
    x = torch.randn(2, 16, 32)  # (K, S, D)
    qt = quantize(x, 4, granularity="group", group_size=8, symmetric=False)
    assert qt.nbytes == 2 * 16 * 32 // 2 + 2 * 2 * 16 * 4 * 4


# ---- packing -----------------------------------------------------------------------------------


def pack_reference(codes, bits):
    n = 8 // bits
    flat = codes.reshape(-1, codes.shape[-1]).tolist()
    out = []
    for row in flat:
        out.append(
            [sum(row[j * n + i] << (i * bits) for i in range(n)) for j in range(len(row) // n)]
        )
    return torch.tensor(out, dtype=torch.uint8).reshape(*codes.shape[:-1], -1)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_exact_and_matches_loop_reference(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (3, 5, 16), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (3, 5, 16 * bits // 8)
    ref = pack_reference(codes, bits)
    diff = (packed.int() - ref.int()).abs().max().item()
    assert diff == 0, f"vectorized pack differs from the loop reference by {diff}"
    assert torch.equal(unpack(packed, bits), codes)


def test_int4_nibble_order():
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    assert pack(codes, 4).tolist() == [[0x21, 0x0F]]


# ---- misuse ------------------------------------------------------------------------------------


def test_quantize_misuse_errors():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize(x, 3)
    with pytest.raises(TypeError, match="bits must be an int"):
        quantize(x, True)
    with pytest.raises(ValueError, match="does not divide the 8 channels"):
        quantize(x, granularity="group", group_size=3)
    with pytest.raises(ValueError, match="needs group_size"):
        quantize(x, granularity="group")
    with pytest.raises(ValueError, match="group_size=None"):
        quantize(x, granularity="token", group_size=4)
    with pytest.raises(ValueError, match="does not divide the 4 tokens"):
        quantize(x, granularity="channel", group_size=3)
    with pytest.raises(ValueError, match="granularity must be one of"):
        quantize(x, granularity="row")
    with pytest.raises(ValueError, match="group_size must be an int >= 1"):
        quantize(x, granularity="group", group_size=0)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        quantize(x.double())
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        quantize(torch.ones(4, 8, dtype=torch.int32))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        quantize([[1.0, 2.0]])
    with pytest.raises(ValueError, match="at least 2 dims"):
        quantize(torch.randn(8))
    with pytest.raises(ValueError, match="whole bytes"):
        quantize(torch.randn(4, 3), 4)
    with pytest.raises(ValueError, match="empty tensor"):
        quantize(torch.randn(0, 8))
    with pytest.raises(ValueError, match="nan or inf"):
        quantize(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(TypeError, match="QuantizedTensor"):
        dequantize(x)
    with pytest.raises(TypeError, match="floating torch.dtype"):
        dequantize(quantize(x), torch.int8)


def test_pack_misuse_errors():
    with pytest.raises(ValueError, match=r"in \[0, 15\]"):
        pack(torch.tensor([[16, 0]], dtype=torch.uint8), 4)
    with pytest.raises(TypeError, match="uint8"):
        pack(torch.tensor([[1, 0]]), 4)
    with pytest.raises(ValueError, match="multiple of 2"):
        pack(torch.zeros(2, 3, dtype=torch.uint8), 4)
    with pytest.raises(TypeError, match="uint8"):
        unpack(torch.zeros(2, 3), 4)


def test_scheme_misuse_errors():
    with pytest.raises(ValueError, match="residual >= 1"):
        QuantScheme(4, key="channel")
    with pytest.raises(ValueError, match="needs group_size"):
        QuantScheme(4, value="group")
    with pytest.raises(ValueError, match="residual must be an int >= 0"):
        QuantScheme(8, residual=-1)
    with pytest.raises(ValueError, match="bits must be one of"):
        QuantScheme(16)
    with pytest.raises(ValueError, match="stream must be"):
        kivi().granularity("query")


def test_cache_misuse_errors():
    with pytest.raises(KVCacheError, match="does not divide head_dim=8"):
        QuantizedKVCache(1, 1, 1, 8, 16, QuantScheme(4, "group", "group", group_size=3))
    with pytest.raises(KVCacheError, match="multiple of residual=32"):
        QuantizedKVCache(1, 1, 1, 8, 48, kivi(2, residual=32))
    with pytest.raises(KVCacheError, match="unknown scheme"):
        QuantizedKVCache(1, 1, 1, 8, 16, "int3")
    with pytest.raises(TypeError, match="QuantScheme or a name"):
        QuantizedKVCache(1, 1, 1, 8, 16, 8)
    with pytest.raises(KVCacheError, match="whole bytes"):
        QuantizedKVCache(1, 1, 1, 6, 16, "int2 per-token")
    with pytest.raises(KVCacheError, match="float16, bfloat16 or float32"):
        QuantizedKVCache(1, 1, 1, 8, 16, dtype=torch.float64)
    cache = QuantizedKVCache(1, 1, 1, 8, 4)
    with pytest.raises(KVCacheError, match="dtype torch.float16"):
        cache.update(0, torch.randn(1, 1, 1, 8).half(), torch.randn(1, 1, 1, 8).half())
    with pytest.raises(CacheFullError, match="overflow"):
        cache.update(0, torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8))
    with pytest.raises(IndexError, match="out of range"):
        cache.update(1, torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8))


def test_failed_update_leaves_the_cache_unchanged():
    cache = QuantizedKVCache(1, 1, 2, 8, 64, kivi(4, residual=4))
    k, v = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    before = [t.clone() for t in cache.update(0, k, v)]
    state = [t.clone() for t in cache.keys[0].tensors() + cache.values[0].tensors()]
    bad = torch.randn(1, 2, 3, 8)
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="nan or inf"):
        cache.update(0, bad, torch.randn(1, 2, 3, 8))
    assert cache.seq_len == 6 and cache.keys[0].n_q == 4
    after = cache.keys[0].tensors() + cache.values[0].tensors()
    assert all(torch.equal(a, b) for a, b in zip(state, after, strict=True))
    ks, vs = cache.keys[0].read(6, cache.dtype), cache.values[0].read(6, cache.dtype)
    assert torch.equal(ks, before[0]) and torch.equal(vs, before[1])


# ---- the cache ---------------------------------------------------------------------------------

B, K, D = 2, 2, 16


@settings(max_examples=30, deadline=None)
@given(
    chunks=st.lists(st.integers(1, 9), min_size=1, max_size=6),
    name=st.sampled_from(sorted(SCHEMES)),
)
def test_cache_matches_the_pure_function_reference(chunks, name):
    scheme = SCHEMES[name]
    cache = QuantizedKVCache(2, B, K, D, 64, scheme)
    g = torch.Generator().manual_seed(len(chunks))
    ks, vs = [], []
    for T in chunks:
        k, v = torch.randn(B, K, T, D, generator=g), torch.randn(B, K, T, D, generator=g)
        ks.append(k)
        vs.append(v)
        for layer in range(2):
            k_out, v_out = cache.update(layer, k, v)
    k_all, v_all = torch.cat(ks, 2), torch.cat(vs, 2)  # (B, K, S, D)
    for got, x, first, stream in ((k_out, k_all, ks[0], "key"), (v_out, v_all, vs[0], "value")):
        if scheme.fp8:  # the scale is fixed by the first write, later numbers saturate
            gran = scheme.granularity(stream)
            ref = dequantize(quantize_fp8(x, gran, fp8_scale(first, gran) * FP8_HEADROOM))
        else:
            ref = quantize_stream(x, scheme, stream)
        diff = (got - ref).abs().max().item()
        assert diff == 0, f"{name} {stream}: cache differs from the reference by {diff}"
    S = sum(chunks)
    nk, nv = cache.n_full_precision(0)
    assert nk == S - n_quantized(scheme.key, scheme.residual, S)
    assert nv == S - n_quantized(scheme.value, scheme.residual, S)


@pytest.mark.parametrize("name", sorted(n for n in SCHEMES if not SCHEMES[n].fp8))
def test_cache_vs_fp_cache_within_half_a_step(name):
    scheme = SCHEMES[name]
    q, fp = QuantizedKVCache(1, B, K, D, 128, scheme), KVCache(1, B, K, D, 128)
    g = torch.Generator().manual_seed(1)
    for T in (40, 1, 1, 30, 1, 1, 1):
        k, v = torch.randn(B, K, T, D, generator=g), torch.randn(B, K, T, D, generator=g)
        qk, qv = q.update(0, k, v)
        fk, fv = fp.update(0, k, v)
    for got, x, stream, g_name in ((qk, fk, "key", scheme.key), (qv, fv, "value", scheme.value)):
        nq = n_quantized(g_name, scheme.residual, x.shape[2])
        assert torch.equal(got[:, :, nq:], x[:, :, nq:]), "the residual is full precision"
        gs = scheme.residual if g_name == "channel" else scheme.group_size
        qt = quantize(x[:, :, :nq], scheme.bits, granularity=g_name, group_size=gs,
                      symmetric=scheme.symmetric)  # fmt: skip
        err = (got[:, :, :nq] - x[:, :, :nq]).abs()
        excess = (err - 0.5 * qt.step() - 1e-5).max().item()
        assert excess <= 0, f"{name} {stream}: error beyond half a step by {excess}"


def test_kivi_keeps_keys_in_full_precision_until_a_block_fills():
    R = 4
    cache = QuantizedKVCache(1, 1, 1, 8, 32, kivi(2, residual=R))
    seen = []
    for _ in range(10):
        cache.update(0, torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8))
        seen.append(cache.n_full_precision(0))
    keys = [k for k, _ in seen]
    values = [v for _, v in seen]
    assert keys == [s % R for s in range(1, 11)]
    assert values == [min(s, R) for s in range(1, 11)]


def test_crop_reads_the_same_prefix_and_can_continue():
    for scheme in (kivi(4, residual=4), SCHEMES["int8 per-token"], QuantScheme(4, residual=3)):
        cache = QuantizedKVCache(1, B, K, D, 32, scheme)
        g = torch.Generator().manual_seed(2)
        k, v = torch.randn(B, K, 11, D, generator=g), torch.randn(B, K, 11, D, generator=g)
        full_k, full_v = cache.update(0, k, v)
        for n in (10, 9, 6, 2, 0):
            cache.crop(n)
            one = torch.randn(B, K, 1, D, generator=g)
            ck, cv = cache.update(0, one, one)
            assert torch.equal(ck[:, :, :n], full_k[:, :, :n]), scheme.label()
            assert torch.equal(cv[:, :, :n], full_v[:, :, :n]), scheme.label()
            cache.crop(n)
    cache.reset()
    assert cache.seq_len == 0 and cache.n_full_precision(0) == (0, 0)


# ---- memory accounting -------------------------------------------------------------------------


def test_memory_matches_kvlib_memory_formula():
    cfg = tiny(dim=64, n_heads=4, n_kv_heads=2, max_seq_len=64)  # D = 16
    S = 24
    cases = [
        (QuantScheme(8, "token", "token"), KVQuant(8, cfg.head_dim, 4)),
        (QuantScheme(4, "token", "token", symmetric=False), KVQuant(4, cfg.head_dim, 8)),
        (QuantScheme(4, "group", "group", group_size=8, symmetric=False), KVQuant(4, 8, 8)),
        (QuantScheme(2, "group", "group", group_size=4), KVQuant(2, 4, 4)),
    ]
    for scheme, kvq in cases:
        cache = QuantizedKVCache.from_config(cfg, 3, scheme=scheme)
        for layer in range(cfg.n_layers):
            cache.update(layer, *(torch.randn(3, 2, S, 16) for _ in range(2)))
        want = 3 * S * kv_bytes_per_token(cfg, quant=kvq)
        assert cache.nbytes_used == want, f"{scheme.label()}: {cache.nbytes_used} vs {want}"
        buffers = sum(
            t.numel() * t.element_size()
            for s in cache.keys + cache.values
            for t in (s.codes, s.scale, s.zero, s.resid)
            if t is not None
        )
        assert cache.nbytes_allocated == buffers


def test_kivi_memory_by_hand():
    L, b, k, d, R, S = 2, 2, 3, 16, 8, 29
    cache = QuantizedKVCache(L, b, k, d, 64, kivi(2, residual=R))
    for layer in range(L):
        cache.update(layer, *(torch.randn(b, k, S, d) for _ in range(2)))
    key_q = S // R * R  # 24 keys quantized per channel in 3 blocks
    keys = key_q * d * 2 // 8 + (S // R) * d * 8 + (S - key_q) * d * 4
    val_q = S - R  # 21 values quantized per token
    values = val_q * d * 2 // 8 + val_q * 8 + R * d * 4
    assert cache.nbytes_used == L * b * k * (keys + values)
    codes = 64 * d * 2 // 8
    alloc = L * b * k * ((codes + 64 // R * d * 8 + R * d * 4) + (codes + 64 * 8 + R * d * 4))
    assert cache.nbytes_allocated == alloc


def test_padding_is_not_counted_and_does_not_widen_scales():
    cache = QuantizedKVCache(1, 2, 1, 8, 16, "int8 per-token")
    cache.set_left_padding(torch.tensor([3, 0]))
    k = torch.randn(2, 1, 5, 8)
    k[0, :, :3] = 1e6  # padding garbage
    out, _ = cache.update(0, k, k)
    assert out[0, :, :3].abs().max().item() == 0
    assert (out[0, :, 3:] - k[0, :, 3:]).abs().max().item() < 0.05
    per_token = 2 * (8 + 4)  # K and V: 8 int8 codes and one fp32 scale each
    assert cache.nbytes_used == (2 + 5) * per_token


# ---- with the model ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = tiny(dim=64, n_heads=4, n_kv_heads=2, max_seq_len=64)  # D = 16
    return Transformer(cfg).eval()


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_generation_runs_on_every_scheme(model, name):
    from kvlib.generate import generate

    prompt = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    cache = QuantizedKVCache.from_config(model.config, 2, 64, name)
    out = generate(model, prompt, 12, cache=cache)
    assert out.shape == (2, 21) and torch.equal(out[:, :9], prompt)
    assert cache.seq_len == 20


def test_large_residual_generates_exactly_the_fp_tokens(model):
    from kvlib.generate import generate

    prompt = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(4))
    ref = generate(model, prompt, 20)
    cache = QuantizedKVCache.from_config(model.config, 2, 64, kivi(2, residual=32))
    out = generate(model, prompt, 20, cache=cache)
    assert cache.n_full_precision(0) == (28, 28)  # nothing quantized yet: exact
    assert torch.equal(out, ref)


def test_int8_logits_close_to_fp_cache(model):
    tokens = torch.randint(0, 64, (2, 30), generator=torch.Generator().manual_seed(5))
    fp = model(tokens, KVCache.from_config(model.config, 2, 64))
    q = model(tokens, QuantizedKVCache.from_config(model.config, 2, 64, "int8 per-token"))
    diff = (fp - q).abs().max().item()
    assert 0 < diff < 1e-2, f"int8 cache logits differ from the fp cache by {diff}"


def test_quantized_tensor_is_frozen():
    qt = quantize(torch.randn(2, 8))
    assert isinstance(qt, QuantizedTensor)
    with pytest.raises(AttributeError):
        qt.bits = 4
