"""The kernels' algorithms, emulated in NumPy, against kvlib's references (no GPU needed)."""

import numpy as np
import pytest
import torch

from kvlib.gpu import emulate as em

CASES = [
    # seq_lens (ragged, partial last blocks), H, K, D, block_size, T, num_splits
    ([37, 5, 64], 8, 2, 32, 16, 1, 1),  # GQA G=4, decode
    ([37, 5, 64], 8, 2, 32, 16, 1, 3),  # split-KV, an empty partition for the short row
    ([100, 17], 4, 4, 64, 16, 1, 4),  # MHA: one real row per 16-row tile
    ([50, 33], 32, 2, 16, 8, 2, 2),  # G*T = 32 rows: two tiles; block_size 8
    ([40], 8, 1, 64, 16, 3, 5),  # MQA, 3 query tokens (causal inside the tile), 5 splits
    ([300, 129], 8, 1, 128, 32, 1, 2),  # more than one CUDA-core chunk of 128 keys
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"lens{c[0]}-H{c[1]}K{c[2]}T{c[5]}S{c[6]}")
@pytest.mark.parametrize("kernel,atol", [("wmma", 2e-3), ("cuda_core", 1e-5)])
def test_emulated_attention_matches_reference(case, kernel, atol):
    lens, H, K, D, P, T, NS = case
    inp = em.random_paged_inputs(lens, H, K, D, P, T=T, seed=len(lens) + H)
    ref = em.paged_reference(**inp)
    out = em.paged_attention(**inp, num_splits=NS, kernel=kernel)
    diff = np.abs(out - ref).max()
    assert diff < atol, f"{kernel} emulation vs reference: max diff {diff:.2e} >= {atol}"


def test_splits_change_nothing_but_rounding():
    inp = em.random_paged_inputs([130, 70], 8, 2, 64, 16, seed=3)
    one = em.paged_attention(**inp, num_splits=1, kernel="cuda_core")
    many = em.paged_attention(**inp, num_splits=4, kernel="cuda_core")
    diff = np.abs(one - many).max()
    assert diff < 1e-6, f"1 vs 4 partitions: max diff {diff:.2e}"


def test_partials_hold_what_each_partition_saw():
    inp = em.random_paged_inputs([20], 2, 1, 16, 16, seed=1)
    m, l, o = em.paged_attention_partials(**inp, num_splits=3, kernel="wmma")
    assert m.shape == (1, 2, 1, 3) and o.shape == (1, 2, 1, 3, 16)
    # 20 tokens = 2 blocks of 16: one block per partition, the third partition is empty
    assert np.isfinite(m[..., :2]).all() and np.isneginf(m[..., 2]).all()
    assert (l[..., 2] == 0).all() and (o[..., 2, :] == 0).all()


def test_the_fp16_rounding_of_p_is_what_separates_the_kernels():
    inp = em.random_paged_inputs([64], 16, 1, 64, 16, seed=2)
    wmma = em.paged_attention(**inp, kernel="wmma")
    cuda = em.paged_attention(**inp, kernel="cuda_core")
    diff = np.abs(wmma - cuda).max()
    assert 1e-6 < diff < 2e-3, f"wmma vs cuda_core emulation: max diff {diff:.2e}"


def test_split_ranges_cover_whole_blocks():
    for S, P, NS in [(37, 16, 1), (37, 16, 2), (37, 16, 5), (0, 16, 2), (160, 16, 3), (1, 1, 1)]:
        ranges = em.split_ranges(S, P, NS)
        assert len(ranges) == NS
        covered = [s for b, e in ranges for s in range(b, e)]
        assert covered == list(range(S)), (S, P, NS, ranges)
        assert all(b % P == 0 for b, e in ranges if e > b), ranges
    assert em.split_ranges(37, 16, 2) == [(0, 32), (32, 37)]


def test_split_reduce_matches_one_softmax():
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((2, 3, 1, 12)).astype(np.float32)  # (B, H, T, S)
    values = rng.standard_normal((12, 4)).astype(np.float32)  # (S, D)
    parts = np.split(np.arange(12), [5, 5, 9])  # four partitions, one of them empty
    m = np.full((2, 3, 1, 4), -np.inf, np.float32)
    l = np.zeros((2, 3, 1, 4), np.float32)
    o = np.zeros((2, 3, 1, 4, 4), np.float32)
    for i, idx in enumerate(parts):
        if len(idx):
            m[..., i] = scores[..., idx].max(-1)
            e = np.exp(scores[..., idx] - m[..., i, None])
            l[..., i], o[..., i, :] = e.sum(-1), e @ values[idx]
    w = np.exp(scores - scores.max(-1, keepdims=True))
    want = (w / w.sum(-1, keepdims=True)) @ values
    diff = np.abs(em.split_kv_reduce(m, l, o) - want).max()
    assert diff < 1e-6, f"reduce vs one softmax: max diff {diff:.2e}"


@pytest.mark.parametrize("shape", [(16, 16, 16), (50, 70, 33), (1, 200, 3), (64, 17, 64)])
def test_emulated_wmma_gemm_matches_fp32_matmul(shape):
    M, R, N = shape
    gen = torch.Generator().manual_seed(M * N)
    a, b = torch.randn(M, R, generator=gen), torch.randn(R, N, generator=gen)
    ref = em.round_fp16(a).astype(np.float64) @ em.round_fp16(b).astype(np.float64)
    out = em.wmma_gemm(a, b)
    assert out.shape == (M, N) and out.dtype == np.float32
    diff = np.abs(out - ref).max()
    assert diff < 1e-4 * np.sqrt(R), f"emulated WMMA GEMM vs float64: max diff {diff:.2e}"
    torch_ref = (a.half().float() @ b.half().float()).numpy()
    assert np.abs(out - torch_ref).max() < 1e-4 * np.sqrt(R)


def test_inputs_are_rounded_to_fp16():
    a = np.full((16, 16), 1 + 2**-12)  # not representable in fp16: rounds to 1
    assert (em.wmma_gemm(a, np.eye(16)) == 1.0).all()


def test_misuse_raises():
    with pytest.raises(ValueError, match="do not chain"):
        em.wmma_gemm(np.zeros((4, 5)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="must be 2-D"):
        em.wmma_gemm(np.zeros(4), np.zeros((4, 5)))
    with pytest.raises(TypeError, match="NumPy array or torch tensor"):
        em.wmma_gemm([[1.0]], np.zeros((1, 1)))
    inp = em.random_paged_inputs([10], 4, 2, 16, 8)
    with pytest.raises(ValueError, match="kernel must be"):
        em.paged_attention(**inp, kernel="tensor")
    bad = dict(inp, q=torch.zeros(1, 3, 1, 16))
    with pytest.raises(ValueError, match="multiple of K"):
        em.paged_attention(**bad)
    with pytest.raises(ValueError, match="num_splits must be an int >= 1"):
        em.split_ranges(10, 16, 0)
    with pytest.raises(ValueError, match="seq_len must be an int >= 0"):
        em.split_ranges(-1, 16, 1)
    m = np.zeros((1, 1, 1, 2), np.float32)
    with pytest.raises(ValueError, match="partials disagree"):
        em.split_kv_reduce(m, m, np.zeros((1, 1, 1, 3, 4), np.float32))


def test_inputs_must_be_arrays_of_the_right_rank():
    inp = em.random_paged_inputs([5], H=2, K=1, D=16, block_size=4, seed=0)
    with pytest.raises(ValueError, match=r"q must be 4-D, got shape \(1, 2, 16\)"):
        em.paged_reference(**(inp | {"q": inp["q"][:, :, 0]}))
    with pytest.raises(TypeError, match="q must be a NumPy array or torch tensor, got list"):
        em.paged_reference(**(inp | {"q": [1.0]}))
