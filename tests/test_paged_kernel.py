"""The fused CPU paged kernel against the gather reference, its thread pool, and its errors."""

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlib.paged import BlockAllocator, paged_attention
from kvlib.paged_kernel import paged_attention_fused


def scattered_pool(lens, K, D, P, seed=0, dtype=torch.float32):
    """A one-layer pool holding len(lens) sequences in shuffled blocks, -1 past each end."""
    g = torch.Generator().manual_seed(seed)
    M = max(-(-n // P) for n in lens)
    n_blocks = sum(-(-n // P) for n in lens) + 2
    pool = BlockAllocator(1, n_blocks, P, K, D, dtype=dtype)
    pool.k_pool[0].copy_(torch.randn(pool.k_pool[0].shape, generator=g))
    pool.v_pool[0].copy_(torch.randn(pool.v_pool[0].shape, generator=g))
    ids = torch.randperm(n_blocks, generator=g).tolist()
    tables = torch.full((len(lens), M), -1, dtype=torch.long)
    for b, n in enumerate(lens):
        for j in range(-(-n // P)):
            tables[b, j] = ids.pop()
    return pool, tables, torch.tensor(lens)


@pytest.mark.parametrize(("H", "K"), [(4, 4), (8, 2), (8, 1), (16, 2)])  # G = 1, 4, 8, 8
@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("P", [1, 16, 7])
def test_fused_matches_gather(H, K, T, P):
    lens = [T, 37, 130, 16]  # one sequence of only the queries; lengths off the block size
    pool, tables, seq_lens = scattered_pool(lens, K, 32, P)
    q = torch.randn(len(lens), H, T, 32, generator=torch.Generator().manual_seed(1))
    want = paged_attention(q, pool, tables, seq_lens, 0, method="gather")
    got = paged_attention(q, pool, tables, seq_lens, 0, method="fused")
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-5)


@settings(max_examples=25)
@given(
    lens=st.lists(st.integers(1, 70), min_size=1, max_size=4),
    G=st.sampled_from([1, 2, 8]),
    P=st.integers(1, 20),
    scale=st.floats(0.01, 4.0),
)
def test_fused_matches_gather_ragged(lens, G, P, scale):
    K, D = 2, 8
    pool, tables, seq_lens = scattered_pool(lens, K, D, P, seed=len(lens) + P)
    q = torch.randn(len(lens), G * K, 1, D, generator=torch.Generator().manual_seed(P))
    want = paged_attention(q, pool, tables, seq_lens, 0, method="gather", scale=scale)
    got = paged_attention(q, pool, tables, seq_lens, 0, method="fused", scale=scale)
    # scores reach ~30 at scale 4: exp turns their fp32 rounding (~|s| eps) into ~2e-6
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_fused_same_result_on_one_and_two_threads():
    pool, tables, seq_lens = scattered_pool([300, 41, 77], 2, 64, 16)
    q = torch.randn(3, 8, 1, 64, generator=torch.Generator().manual_seed(2))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = paged_attention(q, pool, tables, seq_lens, 0, method="fused")
        torch.set_num_threads(2)
        two = paged_attention(q, pool, tables, seq_lens, 0, method="fused")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)  # each (sequence, kv head) is one task: no split reductions


def test_fused_reads_the_pool_in_place():
    pool, tables, seq_lens = scattered_pool([20], 1, 8, 4)
    q = torch.randn(1, 2, 1, 8)
    before = paged_attention(q, pool, tables, seq_lens, 0, method="fused")
    pool.v_pool[0][tables[0, 2]] += 1.0  # move the values of one block of the sequence
    after = paged_attention(q, pool, tables, seq_lens, 0, method="fused")
    assert not torch.allclose(before, after)
    unused = sorted(set(range(pool.num_blocks)) - set(tables[0].tolist()))
    pool.v_pool[0][unused] += 100.0  # blocks the table does not name are never read
    torch.testing.assert_close(paged_attention(q, pool, tables, seq_lens, 0, method="fused"), after)


def test_softmax_is_exact_for_extreme_scores():
    """Scores far apart (exp underflows to 0 for all but the max) and a NaN-free result."""
    pool, tables, seq_lens = scattered_pool([6], 1, 8, 4)
    q = torch.zeros(1, 2, 1, 8)
    q[..., 0] = 1e4  # scores dominated by k[..., 0]: the softmax picks one key
    got = paged_attention(q, pool, tables, seq_lens, 0, method="fused")
    want = paged_attention(q, pool, tables, seq_lens, 0, method="gather")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want)


def test_fused_misuse():
    pool, tables, seq_lens = scattered_pool([5], 1, 8, 4)
    q = torch.randn(1, 2, 1, 8)
    with pytest.raises(TypeError, match="takes float32, got k_pool in torch.float64"):
        paged_attention_fused(q, pool.k_pool[0].double(), pool.v_pool[0], tables, seq_lens, 1.0)
    with pytest.raises(TypeError, match="takes float32, got q in torch.bfloat16"):
        paged_attention_fused(q.bfloat16(), pool.k_pool[0], pool.v_pool[0], tables, seq_lens, 1.0)
    with pytest.raises(ValueError, match="runs on the CPU; q is on meta"):
        paged_attention_fused(q.to("meta"), pool.k_pool[0], pool.v_pool[0], tables, seq_lens, 1.0)
    low = BlockAllocator(1, 4, 4, 1, 8, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="method='gather' takes any floating dtype"):
        paged_attention(q.bfloat16(), low, tables, seq_lens, 0, method="fused")


FRESH_PROCESS = """
import torch
from kvlib.paged_kernel import paged_attention_fused
torch.set_num_threads(1)
q, k = torch.randn(2, 4, 1, 8), torch.randn(4, 2, 4, 8)
tables, lens = torch.arange(4).reshape(2, 2), torch.tensor([8, 5])
paged_attention_fused(q, k, k, tables, lens, 1.0)  # the first parallel launch starts the pool
print(torch.get_num_threads())
"""


def test_fused_leaves_torch_thread_count_alone():
    """In a fresh process, where the first launch starts Numba's pool: torch's count stays 1."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "NUMBA_NUM_THREADS": "2"}
    out = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["1"], out.stdout + out.stderr
