"""The paged + quantized cache: blocks of codes and scales, against the contiguous quantized
cache with the same scheme (same codes, same tokens), and the block operations."""

import pytest
import torch

from kvlib.config import tiny
from kvlib.errors import KVCacheError, OutOfBlocksError
from kvlib.generate import generate
from kvlib.paged_quant import PagedQuantKVCache, QuantBlockAllocator
from kvlib.quant import FP8_HEADROOM, SCHEMES, QuantizedKVCache, QuantScheme
from tests.models import model_for

CONFIG = tiny(max_seq_len=64)  # L=2, H=4, K=2, D=8
L, K, D = CONFIG.n_layers, CONFIG.n_kv_heads, CONFIG.head_dim
PAGED_SCHEMES = {
    "int8 per-token": SCHEMES["int8 per-token"],
    "int4 per-token": SCHEMES["int4 per-token"],
    "int2 per-token": SCHEMES["int2 per-token"],
    "int4 group": QuantScheme(4, "group", "group", group_size=4, symmetric=False, name="g4"),
    "FP8 per-tensor": SCHEMES["FP8 per-tensor"],
    "FP8 per-head": SCHEMES["FP8 per-head"],
}


@pytest.fixture(scope="module")
def model():
    return model_for(CONFIG)


def paged(B, scheme, num_blocks=64, block_size=4):
    return PagedQuantKVCache.from_config(
        CONFIG, B, num_blocks=num_blocks, block_size=block_size, scheme=scheme
    )


@pytest.mark.parametrize("name", sorted(PAGED_SCHEMES))
def test_generation_gives_the_contiguous_quantized_caches_tokens(name, model):
    scheme = PAGED_SCHEMES[name]
    prompt = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    cont = QuantizedKVCache.from_config(CONFIG, 2, 64, scheme)
    pq = paged(2, scheme, block_size=3)
    want = generate(model, prompt, 20, cache=cont)
    got = generate(model, prompt, 20, cache=pq)
    assert torch.equal(got, want), f"{name}: paged tokens {got.tolist()} vs {want.tolist()}"


@pytest.mark.parametrize("name", sorted(PAGED_SCHEMES))
def test_stored_history_equals_the_contiguous_quantized_one(name):
    """The same codes and scales: update's dequantized history is the contiguous cache's."""
    scheme = PAGED_SCHEMES[name]
    g = torch.Generator().manual_seed(0)
    cont, pq = QuantizedKVCache(L, 2, K, D, 64, scheme), paged(2, scheme)
    for T in (7, 1, 1, 5):
        k, v = torch.randn(2, K, T, D, generator=g), torch.randn(2, K, T, D, generator=g)
        want = cont.update(0, k, v)
        got = pq.update(0, k, v)
    for a, b in zip(got, want, strict=True):
        diff = (a - b).abs().max().item()
        assert diff == 0, f"{name}: paged history differs from the contiguous one by {diff}"


def test_fused_read_equals_the_gather_reference():
    g = torch.Generator().manual_seed(1)
    for name in ("int8 per-token", "int4 group", "FP8 per-head"):
        fused, ref = paged(2, PAGED_SCHEMES[name]), paged(2, PAGED_SCHEMES[name])
        fused.chunk_size = 5
        for c in (fused, ref):
            c.set_left_padding(torch.tensor([0, 3]))
        for T in (9, 1, 1):
            q = torch.randn(2, 4, T, D, generator=g)
            k, v = torch.randn(2, K, T, D, generator=g), torch.randn(2, K, T, D, generator=g)
            S = fused.seq_len + T
            causal = torch.ones(T, S, dtype=torch.bool).tril(S - T)
            mask = fused.valid_mask(S)[:, None, None, :] & causal  # (B, 1, T, S)
            out = fused.attend(0, q, k, v, mask)
            ref_out = super(PagedQuantKVCache, ref).attend(0, q, k, v, mask)  # gather, attention
            diff = (out - ref_out).abs().max().item()
            assert diff < 1e-5, f"{name}: fused read differs from gather + attention by {diff}"


def test_blocks_hold_codes_and_scales():
    pool = QuantBlockAllocator(L, 8, 4, K, D, "int8 per-token")
    assert pool.k_pool[0].dtype == torch.uint8
    assert pool.k_pool[0].shape == (8, K, 4, D + 4)  # D one-byte codes + one fp32 scale
    assert pool.block_nbytes == 2 * L * K * 4 * (D + 4)
    fp8 = QuantBlockAllocator(L, 8, 4, K, D, "FP8 per-head")
    assert fp8.k_pool[0].shape == (8, K, 4, D)  # scales live outside, one per kv head


def test_kivi_and_residual_schemes_are_refused():
    for scheme in ("KIVI-4", "int4 per-channel", QuantScheme(8, residual=4)):
        with pytest.raises(KVCacheError, match="residual"):
            QuantBlockAllocator(L, 8, 4, K, D, scheme)


def test_fork_copy_on_write_and_swap_keep_the_codes(model):
    """A fork shares blocks; writing into a shared block copies it (codes and scales); a
    swapped-out and swapped-in sequence continues exactly as before."""
    prompt = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(2))
    c = paged(1, "int8 per-token", num_blocks=16, block_size=4)
    with torch.no_grad():
        model(prompt, c)
    child = c.fork(0)
    assert c.block_table(child) == c.block_table(0)
    before = [pool.clone() for pool in c.allocator.k_pool]
    c.set_active([child])
    with torch.no_grad():
        model(torch.tensor([[5]]), c)
    assert c.block_table(child)[1] != c.block_table(0)[1], "the shared partial block was copied"
    for pool, old in zip(c.allocator.k_pool, before, strict=True):
        assert torch.equal(pool[c.block_table(0)[1]], old[c.block_table(0)[1]]), "parent changed"
    # swap the parent out and back in: the next step's logits are unchanged
    twin = paged(1, "int8 per-token", num_blocks=16, block_size=4)
    with torch.no_grad():
        model(prompt, twin)
        want = model(torch.tensor([[7]]), twin)
    c.swap_out(0)
    assert c.is_swapped(0)
    c.swap_in(0)
    c.set_active([0])
    with torch.no_grad():
        got = model(torch.tensor([[7]]), c)
    diff = (got - want).abs().max().item()
    assert diff == 0, f"after swap out and in, logits differ by {diff}"


def test_out_of_blocks_changes_nothing(model):
    c = paged(1, "FP8 per-head", num_blocks=2, block_size=4)
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 8)), c)
    state = (c.seq_len, c.allocator.num_free, [list(s) for s in c.fp8_scales])
    with pytest.raises(OutOfBlocksError), torch.no_grad():
        model(torch.tensor([[1]]), c)
    assert state == (c.seq_len, c.allocator.num_free, [list(s) for s in c.fp8_scales])


def test_fp8_scale_is_fixed_at_the_first_write_and_rolled_back():
    c = paged(1, "FP8 per-head")
    k = torch.randn(1, K, 3, D)
    c.update(0, k, k)
    scale = c.fp8_scales[0][0]
    assert scale.shape == (1, K, 1, 1)
    want = k.abs().amax(dim=(0, 2, 3)) / 448 * FP8_HEADROOM
    assert torch.allclose(scale.flatten(), want), "per head: max |k| maps to 448 / headroom"
    c.update(0, 10 * k, 10 * k)  # larger numbers later saturate; the scale stays
    assert c.fp8_scales[0][0] is scale
    c.reset()
    assert c.fp8_scales[0] == [None, None], "an empty pool forgets its scales"
