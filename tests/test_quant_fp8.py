"""FP8 (e4m3) quantization: the bit-pattern conversion, the error bound, scales, saturation."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlib.quant import (
    SCHEMES,
    QuantizedKVCache,
    QuantScheme,
    dequantize,
    fp8_scale,
    fp8_to_float,
    quantize,
    quantize_fp8,
)
from kvlib.quantize import FP8_HEADROOM, FP8_MAX


def test_fp8_to_float_equals_torchs_cast_for_every_code():
    codes = torch.arange(256, dtype=torch.uint8)  # every e4m3 bit pattern
    want = codes.view(torch.float8_e4m3fn).float()
    got = fp8_to_float(codes)
    finite = ~want.isnan()  # 0x7f and 0xff are NaN; a cache never stores them
    assert int(finite.sum()) == 254
    bad = (got != want) & finite
    assert not bad.any(), (
        f"codes {codes[bad].tolist()}: {got[bad].tolist()} vs {want[bad].tolist()}"
    )


@settings(max_examples=60, deadline=None)
@given(
    lead=st.lists(st.integers(1, 3), min_size=1, max_size=2),
    S=st.integers(1, 6),
    D=st.sampled_from([4, 8, 16]),
    gran=st.sampled_from(["tensor", "head"]),
    magnitude=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_fp8_roundtrip_error_at_most_half_a_step(lead, S, D, gran, magnitude, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, S, D, generator=g) * magnitude
    qt = quantize_fp8(x, gran)
    assert qt.data.dtype == torch.uint8 and qt.data.shape == x.shape
    err = (dequantize(qt) - x).abs()
    bound = 0.5 * qt.step() + 1e-6 * x.abs()
    normal = x.abs() >= 2.0**-6 * qt.scale  # below, e4m3 is subnormal: a fixed step of 2**-9
    worst = (err - bound)[normal].max().item() if normal.any() else 0.0
    assert worst <= 0, f"FP8 error beyond half a step by {worst}"
    tiny = (
        (err[~normal] - 2.0**-10 * qt.scale.expand_as(x)[~normal]).max().item()
        if (~normal).any()
        else 0.0
    )
    assert tiny <= 1e-12, f"subnormal error beyond half of 2**-9 by {tiny}"


def test_fp8_scales_per_tensor_and_per_head():
    x = torch.randn(2, 3, 5, 8)  # (B, K, S, D)
    x[:, 1] *= 10
    s_t, s_h = fp8_scale(x, "tensor"), fp8_scale(x, "head")
    assert s_t.shape == (1, 1, 1, 1) and s_h.shape == (1, 3, 1, 1)
    assert torch.allclose(s_t.flatten(), x.abs().amax().reshape(1) / FP8_MAX)
    assert torch.allclose(s_h.flatten(), x.abs().amax(dim=(0, 2, 3)) / FP8_MAX)
    # per head: the small heads keep their precision
    e_t = (dequantize(quantize_fp8(x, "tensor")) - x)[:, 0].abs().max()
    e_h = (dequantize(quantize_fp8(x, "head")) - x)[:, 0].abs().max()
    assert e_h < e_t, f"per-head error {e_h} not below per-tensor {e_t} on the small head"


def test_a_fixed_scale_saturates_larger_numbers():
    scale = torch.tensor(1.0 / FP8_MAX)  # max |x| of 1 maps to 448
    x = torch.tensor([[0.5, 3.0, -7.0]])
    got = dequantize(quantize_fp8(x, "tensor", scale))
    assert got[0, 1] == 1.0 and got[0, 2] == -1.0, f"saturate at +-1, got {got.tolist()}"


def test_fp8_through_quantize_and_schemes():
    x = torch.randn(4, 8)
    assert torch.equal(quantize(x, 8, granularity="tensor").data, quantize_fp8(x, "tensor").data)
    with pytest.raises(ValueError, match="FP8 granularity"):
        quantize(x, 4, granularity="tensor")
    with pytest.raises(ValueError, match="FP8"):
        QuantScheme(8, "token", "token", fp8=True)
    with pytest.raises(ValueError, match="FP8"):
        QuantScheme(4, "head", "head", fp8=True)
    assert SCHEMES["FP8 per-head"].bytes_per_token(128, 8, 32) == 2 * 128 * 8 * 32
    assert SCHEMES["int8 per-token"].bytes_per_token(128, 8, 32) == 2 * 132 * 8 * 32


def test_fp8_cache_fixes_its_scale_at_the_first_write_and_rolls_it_back():
    cache = QuantizedKVCache(1, 1, 2, 8, 32, "FP8 per-head")
    k = torch.randn(1, 2, 4, 8)
    state = cache.checkpoint()
    cache.update(0, k, k)
    scale = cache.keys[0].scale
    want = k.abs().amax(dim=(0, 2, 3)) / FP8_MAX * FP8_HEADROOM
    assert torch.allclose(scale.flatten(), want), "max |k| maps to 448 / FP8_HEADROOM"
    cache.update(0, 100 * k[:, :, :1], k[:, :, :1])
    assert cache.keys[0].scale is scale, "later writes keep the first scale"
    got = cache.keys[0].read(5, torch.float32)[:, :, 4]
    want = (100 * k[:, :, 0]).clamp(-FP8_MAX * scale[0, :, 0], FP8_MAX * scale[0, :, 0])
    assert torch.allclose(got, want, rtol=0.07), "a number beyond the range saturates"
    cache.rollback(state)
    assert cache.keys[0].scale is None, "rollback forgets a scale set after the checkpoint"
