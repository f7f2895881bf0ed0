"""The compiled decode loop over int8 / FP8 codes against the chunked PyTorch read."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlib.paged_quant import PagedQuantKVCache, QuantBlockAllocator
from kvlib.quant import SCHEMES, QuantizedKVCache, QuantScheme

KERNEL_SCHEMES = {
    "int8 per-token": SCHEMES["int8 per-token"],
    "int8 asym": QuantScheme(8, "token", "token", symmetric=False, name="int8 asym"),
    "FP8 per-tensor": SCHEMES["FP8 per-tensor"],
    "FP8 per-head": SCHEMES["FP8 per-head"],
}


def contiguous(scheme, B, K, D, S_max):
    return QuantizedKVCache(1, B, K, D, S_max, scheme)


def paged(scheme, B, K, D, S_max):
    return PagedQuantKVCache(QuantBlockAllocator(1, B * S_max // 4 + B, 4, K, D, scheme), B)


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(sorted(KERNEL_SCHEMES)),
    make=st.sampled_from([contiguous, paged]),
    G=st.sampled_from([1, 3]),
    K=st.sampled_from([1, 2]),
    prompt=st.integers(1, 30),
    steps=st.integers(1, 4),
    pad=st.lists(st.integers(0, 5), min_size=2, max_size=2),
    seed=st.integers(0, 2**16),
)
def test_kernel_equals_the_chunked_read(name, make, G, K, prompt, steps, pad, seed):
    scheme, B, D = KERNEL_SCHEMES[name], 2, 8
    kern, ref = make(scheme, B, K, D, 48), make(scheme, B, K, D, 48)
    ref.use_kernel = False
    g = torch.Generator().manual_seed(seed)
    for c in (kern, ref):
        c.set_left_padding(torch.tensor(pad))
    k, v = torch.randn(B, K, prompt, D, generator=g), torch.randn(B, K, prompt, D, generator=g)
    for c in (kern, ref):
        c.update(0, k, v)
    worst = 0.0
    for _ in range(steps):
        q = torch.randn(B, K * G, 1, D, generator=g) * 2
        k, v = torch.randn(B, K, 1, D, generator=g), torch.randn(B, K, 1, D, generator=g)
        S = kern.seq_len + 1
        mask = kern.valid_mask(S)[:, None, None, :]  # (B, 1, 1, S)
        assert kern.kernel_reads(q, mask, S) and not ref.kernel_reads(q, mask, S)
        out, want = kern.attend(0, q, k, v, mask), ref.attend(0, q, k, v, mask)
        worst = max(worst, (out - want).abs().max().item())
    assert worst < 1e-5, f"{name} {make.__name__}: kernel differs from the chunked read by {worst}"


def test_kernel_runs_only_where_it_applies():
    c = QuantizedKVCache(1, 1, 2, 8, 32, "int8 per-token")
    q = torch.randn(1, 4, 1, 8)
    assert c.kernel_reads(q, None, 1)
    assert not c.kernel_reads(torch.randn(1, 4, 2, 8), None, 2), "a prefill (T > 1)"
    assert not c.kernel_reads(q, torch.zeros(1, 1, 1, 1, dtype=torch.bool), 1), "another mask"
    for name in ("int4 per-token", "KIVI-4"):
        other = QuantizedKVCache(1, 1, 2, 8, 32, name)
        assert not other.kernel_reads(q, None, 1), name


@pytest.mark.parametrize("name", ["int8 per-token", "FP8 per-head"])
def test_a_row_of_padding_only_gets_zeros(name):
    c = QuantizedKVCache(1, 2, 1, 8, 16, name)
    c.set_left_padding(torch.tensor([0, 7]))  # row 1: slots 0..6 are padding
    c.update(0, torch.randn(2, 1, 6, 8), torch.randn(2, 1, 6, 8))
    q, kv = torch.randn(2, 2, 1, 8), torch.randn(2, 1, 1, 8)
    assert c.kernel_reads(q, None, 7)
    out = c.attend(0, q, kv, kv, None)  # slot 6: still padding for row 1
    assert torch.equal(out[1], torch.zeros(2, 1, 8)), "a row with no token attends to nothing"
    assert out[0].abs().sum() > 0
