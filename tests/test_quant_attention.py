"""The fused read of a quantized cache (chunks dequantized one at a time, online softmax) against
the reference path (dequantize the whole history, then grouped attention)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlib.attention import causal_mask, grouped_attention
from kvlib.online_softmax import online_softmax_result, online_softmax_step
from kvlib.quant import SCHEMES, QuantizedKVCache, QuantScheme, kivi
from kvlib.quant_attention import (
    Chunk,
    chunk_bounds,
    chunked_attention,
    reference_chunked_attention,
)

ALL_SCHEMES = {
    **SCHEMES,
    "int4 group": QuantScheme(4, "group", "group", group_size=4, symmetric=False, name="g4"),
    "int8 R=5": QuantScheme(8, "token", "token", residual=5, name="int8 R=5"),
    "KIVI-2 g4": kivi(2, residual=4, group_size=4),
}


def twin_caches(scheme, L, B, K, D, S_max, pad, chunk):
    a = QuantizedKVCache(L, B, K, D, S_max, scheme)
    b = QuantizedKVCache(L, B, K, D, S_max, scheme)
    a.chunk_size = chunk
    for c in (a, b):
        c.set_left_padding(torch.tensor(pad))
    return a, b


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(sorted(ALL_SCHEMES)),
    G=st.sampled_from([1, 2, 3, 4, 5, 8]),
    K=st.sampled_from([1, 2]),
    prompt=st.integers(1, 40),
    steps=st.integers(0, 5),
    T_last=st.integers(1, 3),
    chunk=st.sampled_from([1, 3, 8, 64]),
    pad=st.lists(st.integers(0, 6), min_size=2, max_size=2),
    seed=st.integers(0, 2**16),
)
def test_fused_attend_equals_dequantize_then_attention(
    name, G, K, prompt, steps, T_last, chunk, pad, seed
):
    """Every scheme, GQA group, padding and length (empty residuals, partial groups and
    per-channel blocks cut at every point), decode steps and a last call of T_last queries."""
    scheme = ALL_SCHEMES[name]
    B, D, H = 2, 8, K * G
    R = scheme.residual
    S_max = 64 if R == 0 else R * (-(-64 // R))
    fused, ref = twin_caches(scheme, 1, B, K, D, S_max, pad, chunk)
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for T in [prompt] + [1] * steps + [T_last]:
        if fused.seq_len + T > S_max:
            break
        q = torch.randn(B, H, T, D, generator=g) * 3
        k, v = torch.randn(B, K, T, D, generator=g), torch.randn(B, K, T, D, generator=g)
        S = fused.seq_len + T
        mask = fused.valid_mask(S)[:, None, None, :] & causal_mask(T, S)  # (B, 1, T, S)
        out = fused.attend(0, q, k, v, mask)  # (B, H, T, D)
        k_all, v_all = ref.update(0, k, v)  # (B, K, S, D) dequantized history
        want = grouped_attention(q, k_all, v_all, mask)
        worst = max(worst, (out - want).abs().max().item())
    assert worst < 1e-5, f"{name}: fused read differs from the reference by {worst}"


KERNEL_SCHEMES = [n for n, s in SCHEMES.items() if s.fp8 or (s.bits == 8 and s.residual == 0)]


@pytest.mark.parametrize("name", KERNEL_SCHEMES)
@pytest.mark.parametrize("G", [1, 2, 3, 4, 5, 8])
def test_compiled_loop_equals_dequantize_then_attention(name, G):
    """The compiled decode loop (query rows in groups of four, a partial last group) against the
    reference, for every scheme it reads, with rows of different lengths (left padding)."""
    B, K, D, S = 3, 2, 16, 21
    fused, ref = twin_caches(SCHEMES[name], 1, B, K, D, 32, [0, 5, 2], 64)
    g = torch.Generator().manual_seed(G)
    history = torch.randn(B, K, S, D, generator=g), torch.randn(B, K, S, D, generator=g)
    for c in (fused, ref):
        c.update(0, *history)
    q = torch.randn(B, K * G, 1, D, generator=g) * 3
    k, v = torch.randn(B, K, 1, D, generator=g), torch.randn(B, K, 1, D, generator=g)
    assert fused.kernel_reads(q, None, S + 1), "the step should run the compiled loop"
    out = fused.attend(0, q, k, v, None)  # (B, H, 1, D)
    k_all, v_all = ref.update(0, k, v)  # (B, K, S + 1, D)
    want = grouped_attention(q, k_all, v_all, ref.valid_mask(S + 1)[:, None, None, :])
    worst = (out - want).abs().max().item()
    assert worst < 1e-5, f"{name}, G={G}: compiled loop differs from the reference by {worst}"


def test_fused_read_is_chunked_and_reads_no_whole_history():
    """The fused read asks the cache for chunks of at most chunk_size tokens (plus the cut
    where codes end), never for the whole history at once."""
    cache = QuantizedKVCache(1, 1, 2, 8, 256, "int8 per-token")
    cache.chunk_size = 32
    cache.use_kernel = False  # the chunked read, not the compiled loop of kvlib.quant_kernel
    cache.update(0, torch.randn(1, 2, 100, 8), torch.randn(1, 2, 100, 8))
    asked = []
    ks = cache.keys[0]
    read = ks.read_chunk

    def spy(a, b):
        asked.append(b - a)
        return read(a, b)

    ks.read_chunk = spy
    out = cache.attend(
        0, torch.randn(1, 4, 1, 8), torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), None
    )
    assert out.shape == (1, 4, 1, 8)
    assert max(asked) <= 32 and sum(asked) == 101, f"chunks read: {asked}"


def test_chunk_bounds():
    assert chunk_bounds(10, 4) == [0, 4, 8, 10]
    assert chunk_bounds(10, 4, cuts=(5,)) == [0, 4, 5, 8, 10]
    assert chunk_bounds(12, 5, align=4) == [0, 4, 8, 12]
    assert chunk_bounds(0, 4) == [0]


def test_online_softmax_over_chunks_equals_one_softmax():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 5, 20, generator=g) * 4
    s[0, 0, :7] = float("-inf")  # a row whose first chunk is fully masked
    s[1, 1] = float("-inf")  # a row that sees nothing
    v = torch.randn(3, 20, 6, generator=g)
    state = None
    for a, b in ((0, 7), (7, 8), (8, 20)):
        state = online_softmax_step(state, s[..., a:b], v[:, a:b])
    got = online_softmax_result(state)
    w = torch.softmax(s, -1).nan_to_num(0.0)
    want = w @ v
    diff = (got - want).abs().max().item()
    assert diff < 1e-5, f"online softmax differs from softmax by {diff}"
    assert torch.equal(got[1, 1], torch.zeros(6)), "a row with nothing visible gets zeros"


@pytest.mark.parametrize("T", [1, 3])
def test_chunked_attention_equals_reference_on_plain_tensors(T):
    g = torch.Generator().manual_seed(T)
    B, K, G, S, D = 2, 2, 3, 37, 8
    q = torch.randn(B, K * G, T, D, generator=g)
    k, v = torch.randn(B, K, S, D, generator=g), torch.randn(B, K, S, D, generator=g)
    mask = causal_mask(T, S)

    def rk(a, b):  # the keys as codes x with a scale and zero point per token
        x = k[:, :, a:b]
        return Chunk(
            x * 2.0 - 1.0, torch.full_like(x[..., :1], 0.5), torch.full_like(x[..., :1], 0.5)
        )

    def rv(a, b):
        return Chunk(v[:, :, a:b])

    got = chunked_attention(q, rk, rv, chunk_bounds(S, 5), mask)
    want = reference_chunked_attention(q, rk, rv, S, mask)
    diff = (got - want).abs().max().item()
    assert diff < 1e-5, f"chunked attention differs from the reference by {diff}"
