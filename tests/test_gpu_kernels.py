"""The CuPy kernels: clear errors on misuse (any machine), and results on a GPU (marker `gpu`).

GPU tests compare each kernel with kvlib's reference (`kvlib.paged.paged_attention`, gather)
and with torch, within fp16 tolerance, on ragged lengths and partial blocks; they skip
without a CUDA GPU and CuPy.
"""

import numpy as np
import pytest
import torch

from kvlib.gpu import emulate as em
from kvlib.gpu import kernels as gk

requires_gpu = pytest.mark.skipif(not gk.available(), reason="needs a CUDA GPU and CuPy")


# ---- misuse: runs everywhere ------------------------------------------------------------------
def test_cpu_tensors_raise_a_clear_error():
    a = torch.zeros(4, 8, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"a is on cpu; the CUDA kernels take tensors on a CUDA"):
        gk.gemm(a, a.T.contiguous())
    inp = em.random_paged_inputs([10, 3], 4, 2, 16, 8)
    with pytest.raises(ValueError, match=r"q is on cpu; .*kvlib.gpu.emulate"):
        gk.paged_decode_attention(**inp)


def test_gemm_checks_shapes_dtypes_and_contiguity():
    h = torch.zeros(4, 8, dtype=torch.float16)
    with pytest.raises(ValueError, match="do not chain"):
        gk.gemm(h, h)
    with pytest.raises(TypeError, match=r"b must be torch.float16, got torch.float32"):
        gk.gemm(h, torch.zeros(8, 2))
    with pytest.raises(ValueError, match="not contiguous"):
        gk.gemm(h, h.T)  # (8, 4) view with strides (1, 8)
    with pytest.raises(ValueError, match="must be 2-D"):
        gk.gemm(h[0], h)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        gk.gemm(np.zeros((4, 8)), h)
    with pytest.raises(ValueError, match="method must be one of"):
        gk.gemm(h, h.T.contiguous(), method="cublas")


def test_attention_checks_its_inputs():
    inp = em.random_paged_inputs([10, 3], 4, 2, 16, 8)
    call = gk.paged_decode_attention
    with pytest.raises(TypeError, match="block_tables must be torch.int32"):
        call(**dict(inp, block_tables=inp["block_tables"].long()))
    with pytest.raises(TypeError, match="q must be torch.float16"):
        call(**dict(inp, q=inp["q"].float()))
    with pytest.raises(ValueError, match="multiple of K"):
        call(**dict(inp, q=torch.zeros(2, 3, 1, 16, dtype=torch.float16)))
    with pytest.raises(ValueError, match="k_pool .* and v_pool .* differ"):
        call(**dict(inp, v_pool=inp["v_pool"][:1].contiguous()))
    with pytest.raises(ValueError, match=r"expected \(B, M\) and \(B,\)"):
        call(**dict(inp, seq_lens=inp["seq_lens"][:1].contiguous()))
    with pytest.raises(ValueError, match="D a multiple of 16"):
        odd = em.random_paged_inputs([10], 4, 2, 24, 8)
        call(**odd)
    with pytest.raises(ValueError, match="num_splits must be an int >= 1"):
        call(**inp, num_splits=0)
    with pytest.raises(ValueError, match="method must be one of"):
        call(**inp, method="flash")


@pytest.mark.skipif(gk.available(), reason="checks the message shown where no GPU is present")
def test_no_gpu_is_reported_when_loading_a_module():
    with pytest.raises(gk.GPUUnavailableError, match="CuPy"):
        gk.load_module("gemm.cu")


# ---- on a GPU ---------------------------------------------------------------------------------
def _cuda(inp):
    return {k: v.cuda() for k, v in inp.items()}


@pytest.mark.parametrize("method", gk.GEMM_METHODS)
@pytest.mark.parametrize("shape", [(16, 16, 16), (64, 128, 96), (50, 70, 33), (1, 300, 5)])
@pytest.mark.gpu
@requires_gpu
def test_gemm_matches_torch(method, shape):
    M, R, N = shape
    gen = torch.Generator().manual_seed(M + N)
    a = torch.randn(M, R, generator=gen).half().cuda()
    b = torch.randn(R, N, generator=gen).half().cuda()
    out = gk.gemm(a, b, method=method)
    ref = a.float() @ b.float()
    diff = (out - ref).abs().max().item()
    assert diff < 1e-3 * R**0.5, f"gemm_{method} {shape}: max diff {diff:.2e} vs torch"
    emu = torch.from_numpy(em.wmma_gemm(a.cpu(), b.cpu())).cuda()
    diff_emu = (out - emu).abs().max().item()
    assert diff_emu < 1e-3 * R**0.5, f"gemm_{method} vs emulation: max diff {diff_emu:.2e}"


ATTENTION_CASES = [
    ([37, 5, 64], 8, 2, 64, 16, 1, 1),
    ([37, 5, 64], 8, 2, 64, 16, 1, 3),
    ([100, 17], 4, 4, 128, 16, 1, 4),  # MHA
    ([50, 33], 32, 2, 64, 8, 2, 2),  # G*T = 32 rows: two tiles
    ([40], 8, 1, 128, 16, 3, 5),  # MQA, 3 query tokens
    ([1000, 1, 257], 32, 8, 128, 16, 1, 8),  # Llama-3-8B-like heads, long and tiny rows
    ([300, 129], 8, 1, 256, 32, 1, 2),  # D = 256, two CUDA-core chunks
]


@pytest.mark.parametrize("method", gk.ATTENTION_METHODS)
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: f"lens{c[0]}-H{c[1]}K{c[2]}D{c[3]}")
@pytest.mark.gpu
@requires_gpu
def test_paged_attention_matches_reference_and_torch(method, case):
    lens, H, K, D, P, T, NS = case
    inp = em.random_paged_inputs(lens, H, K, D, P, T=T, seed=H + D)
    out = gk.paged_decode_attention(**_cuda(inp), method=method, num_splits=NS).float().cpu()
    ref = torch.from_numpy(em.paged_reference(**inp)).float()
    _assert_close(out, ref, f"{method} vs kvlib reference")
    # torch SDPA on the gathered cache, row by row (ragged lengths), fp32
    for b, S in enumerate(lens):
        blocks = inp["block_tables"][b, : -(-S // P)].long()
        k = inp["k_pool"][blocks].permute(1, 0, 2, 3).reshape(K, -1, D)[:, :S].float()  # (K, S, D)
        v = inp["v_pool"][blocks].permute(1, 0, 2, 3).reshape(K, -1, D)[:, :S].float()
        k, v = k.repeat_interleave(H // K, 0), v.repeat_interleave(H // K, 0)  # (H, S, D)
        mask = torch.arange(S)[None, :] <= (S - T + torch.arange(T))[:, None]  # (T, S)
        sdpa = torch.nn.functional.scaled_dot_product_attention(
            inp["q"][b].float(), k, v, attn_mask=mask
        )  # (H, T, D)
        _assert_close(out[b], sdpa, f"{method} row {b} vs torch SDPA")
    emu = torch.from_numpy(em.paged_attention(**inp, num_splits=NS, kernel=method))
    _assert_close(out, emu, f"{method} vs its emulation")


def _assert_close(out, ref, what, atol=2e-3, rtol=2e-3):
    """fp16 tolerance: the output is rounded to half (1 ulp = 2**-10 relative)."""
    diff = (out - ref).abs()
    ok = bool((diff <= atol + rtol * ref.abs()).all())
    assert ok, f"{what}: max diff {diff.max().item():.2e} (atol {atol}, rtol {rtol})"


def test_available_agrees_with_torch_and_cupy(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gk.available() is False  # no CUDA device seen by torch: never available


def test_wrong_dtype_says_how_to_convert():
    with pytest.raises(TypeError, match=r"a must be torch.float16, got torch.float32 \(convert"):
        gk.gemm(torch.zeros(4, 8), torch.zeros(8, 4, dtype=torch.float16))
