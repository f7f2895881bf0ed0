import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlib.attention import attention
from kvlib.cache import Cache
from kvlib.config import tiny
from kvlib.errors import KVCacheError
from kvlib.generate import generate, pad_prompts
from kvlib.kv_cache import KVCache
from kvlib.paged import (
    PAGED_METHODS,
    BlockAllocator,
    OutOfBlocksError,
    PagedKVCache,
    gather_kv,
    paged_attention,
)
from kvlib.transformer import Transformer

L, K, D = 2, 2, 4


def pool(num_blocks=16, block_size=4, n_kv_heads=K, dtype=torch.float32):
    return BlockAllocator(L, num_blocks, block_size, n_kv_heads, D, dtype=dtype)


def kv(B, T, n_kv_heads=K, dtype=torch.float32):
    return (
        torch.randn(B, n_kv_heads, T, D, dtype=dtype),
        torch.randn(B, n_kv_heads, T, D, dtype=dtype),
    )


def append(cache, k, v):
    """One forward step: every layer gets the same new tokens."""
    for layer in range(cache.n_layers):
        out = cache.update(layer, k, v)
    return out


def sequence_kv(cache, seq_id, layer=0):
    """(K, n, D) keys and values of one sequence, read through its block table."""
    n, P = cache.sequence_length(seq_id), cache.block_size
    table = torch.tensor(cache.block_table(seq_id), dtype=torch.long)
    r = torch.arange(n)
    k = cache.allocator.k_pool[layer][table[r // P], :, r % P]  # (n, K, D)
    v = cache.allocator.v_pool[layer][table[r // P], :, r % P]
    return k.transpose(0, 1), v.transpose(0, 1)


def snapshot(cache):
    a = cache.allocator
    return (
        {i: (cache.block_table(i), list(cache._seqs[i].lens)) for i in cache.sequences},
        list(a._ref),
        a.free_blocks(),
        [t.clone() for t in a.k_pool + a.v_pool],
        cache.active,
        cache.start.clone(),
        list(cache._len),
    )


def assert_unchanged(cache, before):
    after = snapshot(cache)
    assert after[:3] == before[:3]
    for x, y in zip(after[3], before[3], strict=True):
        assert torch.equal(x, y)
    assert after[4] == before[4] and torch.equal(after[5], before[5]) and after[6] == before[6]


def check_refcounts(cache):
    """Every resident block's refcount equals the number of tables holding it."""
    a = cache.allocator
    a.check_invariants()
    holders = {}
    for i in cache.sequences:
        for b in cache.block_table(i):
            holders[b] = holders.get(b, 0) + 1
    for b in range(a.num_blocks):
        assert a.refcount(b) == holders.get(b, 0), f"block {b}"
    assert set(a.free_blocks()).isdisjoint(holders)


# ---- allocator --------------------------------------------------------------------------------
def test_allocator_hands_out_lowest_free_blocks_and_recycles():
    a = pool(num_blocks=4)
    assert a.allocate(2) == [0, 1]
    a.free(0)
    assert a.allocate(1) == [0]
    assert a.num_free == 2 and a.num_used == 2
    a.check_invariants()


def test_allocator_refcounts():
    a = pool(num_blocks=4)
    (b,) = a.allocate(1)
    a.incref(b)
    assert a.refcount(b) == 2
    a.free(b)
    assert a.refcount(b) == 1 and b not in a.free_blocks()
    a.free(b)
    assert a.refcount(b) == 0 and b in a.free_blocks()


def test_allocator_out_of_blocks_changes_nothing():
    a = pool(num_blocks=3)
    a.allocate(2)
    before = (list(a._ref), a.free_blocks())
    with pytest.raises(OutOfBlocksError, match="need 2 blocks but only 1 of 3"):
        a.allocate(2)
    assert (list(a._ref), a.free_blocks()) == before


def test_allocator_misuse():
    a = pool(num_blocks=4)
    with pytest.raises(ValueError, match="already free"):
        a.free(0)
    with pytest.raises(ValueError, match="only a block in use can be shared"):
        a.incref(1)
    with pytest.raises(IndexError, match="out of range for a pool of 4"):
        a.refcount(4)
    with pytest.raises(TypeError, match="block id must be an int"):
        a.free(1.0)
    with pytest.raises(ValueError, match="number of blocks must be an int >= 0"):
        a.allocate(-1)
    with pytest.raises(ValueError, match="num_blocks must be an int >= 1"):
        BlockAllocator(L, 0, 4, K, D)
    with pytest.raises(TypeError, match="floating torch.dtype"):
        BlockAllocator(L, 4, 4, K, D, dtype=torch.int8)


def test_allocator_from_config_and_bytes():
    cfg = tiny()
    a = BlockAllocator.from_config(cfg, num_blocks=10, block_size=8, dtype=torch.float16)
    assert a.k_pool[0].shape == (10, cfg.n_kv_heads, 8, cfg.head_dim)
    assert a.block_nbytes == 8 * cfg.kv_bytes_per_token(torch.float16)
    assert a.nbytes_pool == sum(t.numel() * t.element_size() for t in a.k_pool + a.v_pool)


def test_copy_block_copies_every_layer():
    a = pool(num_blocks=4)
    for t in a.k_pool + a.v_pool:
        t[1] = torch.randn_like(t[1])
    a.copy_block(1, 3)
    for t in a.k_pool + a.v_pool:
        assert torch.equal(t[3], t[1])


# ---- the cache interface ------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", [1, 3, 4, 16])
def test_update_matches_kvcache(block_size):
    torch.manual_seed(0)
    cache = PagedKVCache(pool(num_blocks=64, block_size=block_size), batch_size=3)
    ref = KVCache(L, 3, K, D, 32)
    assert isinstance(cache, Cache)
    for T in (5, 1, 1, 4, 1):
        k, v = kv(3, T)
        for layer in range(L):
            got, want = cache.update(layer, k, v), ref.update(layer, k, v)
            for x, y in zip(got, want, strict=True):
                assert torch.equal(x, y), f"max diff {(x - y).abs().max()}"
    assert cache.seq_len == ref.seq_len == 12
    assert torch.equal(cache.lengths, ref.lengths)
    assert torch.equal(cache.valid_mask(12), ref.valid_mask(12))
    check_refcounts(cache)


def test_left_padding_is_not_stored():
    torch.manual_seed(0)
    cache = PagedKVCache(pool(num_blocks=64, block_size=4), batch_size=2)
    ref = KVCache(L, 2, K, D, 32)
    n_pad = torch.tensor([3, 0])
    cache.set_left_padding(n_pad)
    ref.set_left_padding(n_pad)
    for T in (6, 1, 1):
        k, v = kv(2, T)
        for layer in range(L):
            (gk, gv), (rk, rv) = cache.update(layer, k, v), ref.update(layer, k, v)
            valid = ref.valid_mask(rk.shape[2])[:, None, :, None]  # (B, 1, S, 1)
            assert torch.equal(gk, rk * valid) and torch.equal(gv, rv * valid)
    assert cache.lengths.tolist() == [5, 8] == ref.lengths.tolist()
    assert len(cache.block_table(0)) == 2  # 5 real tokens in blocks of 4; padding takes none
    assert cache.nbytes_used == ref.nbytes_used


def test_crop_and_reset_release_blocks():
    cache = PagedKVCache(pool(num_blocks=16, block_size=4), batch_size=2)
    append(cache, *kv(2, 10))
    assert cache.allocator.num_used == 6
    cache.crop(5)
    assert cache.seq_len == 5 and [len(cache.block_table(i)) for i in cache.active] == [2, 2]
    assert cache.allocator.num_used == 4
    check_refcounts(cache)
    cache.reset()
    assert cache.seq_len == 0 and cache.allocator.num_used == 0
    check_refcounts(cache)


def test_memory_accounting_counts_shared_blocks_once():
    cache = PagedKVCache(pool(num_blocks=16, block_size=4), batch_size=1)
    append(cache, *kv(1, 6))
    token = 2 * L * K * D * 4
    assert cache.nbytes_used == 6 * token
    assert cache.nbytes_allocated == 2 * cache.allocator.block_nbytes
    cache.fork(0)
    assert cache.nbytes_used == 6 * token
    assert cache.nbytes_allocated == 2 * cache.allocator.block_nbytes


def test_update_out_of_blocks_leaves_every_sequence_intact():
    cache = PagedKVCache(pool(num_blocks=5, block_size=4), batch_size=2)
    append(cache, *kv(2, 8))  # 4 blocks used, 1 free
    before = snapshot(cache)
    with pytest.raises(OutOfBlocksError, match="needs 2 new blocks.*only 1 of 5"):
        cache.update(0, *kv(2, 1))
    assert_unchanged(cache, before)


# ---- copy-on-write and prefix sharing ------------------------------------------------------------
def test_fork_shares_blocks_and_copy_on_write_protects_the_original():
    torch.manual_seed(0)
    cache = PagedKVCache(pool(num_blocks=16, block_size=4), batch_size=1)
    append(cache, *kv(1, 6))  # blocks [0, 1], the second half full
    k0, v0 = sequence_kv(cache, 0)
    child = cache.fork(0)
    assert cache.block_table(child) == cache.block_table(0)
    assert [cache.allocator.refcount(b) for b in cache.block_table(0)] == [2, 2]
    check_refcounts(cache)
    cache.set_active([child])
    k_new, v_new = kv(1, 1)
    append(cache, k_new, v_new)
    t0, tc = cache.block_table(0), cache.block_table(child)
    assert tc[0] == t0[0] and tc[1] != t0[1], "only the partly filled block is copied"
    k_after, v_after = sequence_kv(cache, 0)
    assert torch.equal(k_after, k0) and torch.equal(v_after, v0), "the original changed"
    kc, vc = sequence_kv(cache, child)
    assert torch.equal(kc, torch.cat([k0, k_new[0]], dim=1))
    assert torch.equal(vc, torch.cat([v0, v_new[0]], dim=1))
    check_refcounts(cache)


def test_fork_prefix_and_misuse():
    cache = PagedKVCache(pool(num_blocks=16, block_size=4), batch_size=1)
    append(cache, *kv(1, 10))
    child = cache.fork(0, n_tokens=5)
    assert cache.sequence_length(child) == 5
    assert cache.block_table(child) == cache.block_table(0)[:2]
    with pytest.raises(ValueError, match=r"n_tokens must be an int in \[0, 10\]"):
        cache.fork(0, n_tokens=11)
    with pytest.raises(KeyError, match="no sequence 99"):
        cache.fork(99)
    with pytest.raises(TypeError, match="sequence id must be an int"):
        cache.fork("0")


def test_copy_on_write_out_of_blocks_changes_nothing():
    cache = PagedKVCache(pool(num_blocks=3, block_size=4), batch_size=1)
    append(cache, *kv(1, 6))
    forks = [0, cache.fork(0), cache.fork(0)]
    cache.set_active(forks)
    before = snapshot(cache)
    # three holders write into the shared half-full block: two copy, the last keeps it
    with pytest.raises(OutOfBlocksError, match="0 new blocks and 2 copy-on-write copies"):
        cache.update(0, *kv(3, 1))
    assert_unchanged(cache, before)


def test_last_writer_of_a_shared_block_keeps_it():
    cache = PagedKVCache(pool(num_blocks=4, block_size=4), batch_size=1)
    append(cache, *kv(1, 6))
    child = cache.fork(0)
    cache.set_active([0, child])
    append(cache, *kv(2, 1))  # needs exactly one copy: fits in the 2 free blocks
    assert cache.allocator.num_used == 3
    check_refcounts(cache)


# ---- random operations (hypothesis) --------------------------------------------------------------
ops = st.lists(
    st.tuples(
        st.sampled_from(
            ["add", "append", "append", "fork", "fork", "free", "swap_out", "swap_in", "crop"]
        ),
        st.integers(0, 7),
        st.integers(1, 6),
    ),
    max_size=30,
)


@settings(max_examples=150, deadline=None)
@given(ops=ops, block_size=st.sampled_from([1, 2, 4]))
def test_random_operations_keep_invariants_and_data(ops, block_size):
    """Random add/append/fork/free/swap/crop: refcounts match, no block is both free and used,
    and each sequence reads back exactly the tokens a plain list of them holds."""
    gen = torch.Generator().manual_seed(0)
    cache = PagedKVCache(pool(num_blocks=12, block_size=block_size), batch_size=1)
    shadow = {0: torch.zeros(K, 0, D)}  # seq -> (K, n, D): the keys it should hold
    for op, pick, n in ops:
        ids = sorted(shadow)
        sid = ids[pick % len(ids)] if ids else None
        try:
            if op == "add":
                shadow[cache.add_sequence()] = torch.zeros(K, 0, D)
            elif sid is None:
                continue
            elif op == "append" and not cache.is_swapped(sid):
                cache.set_active([sid])
                k = torch.randn(1, K, n, D, generator=gen)
                append(cache, k, k)
                shadow[sid] = torch.cat([shadow[sid], k[0]], dim=1)
            elif op == "fork" and not cache.is_swapped(sid):
                m = min(n, shadow[sid].shape[1])
                shadow[cache.fork(sid, m)] = shadow[sid][:, :m]
            elif op == "free" and sid not in cache.active:
                cache.free_sequence(sid)
                del shadow[sid]
            elif op == "swap_out" and sid not in cache.active and not cache.is_swapped(sid):
                cache.swap_out(sid)
            elif op == "swap_in" and cache.is_swapped(sid):
                cache.swap_in(sid)
            elif op == "crop" and not cache.is_swapped(sid):
                cache.set_active([sid])
                m = min(n, shadow[sid].shape[1])
                cache.crop(m)
                shadow[sid] = shadow[sid][:, :m]
        except OutOfBlocksError:
            pass  # a failed call changes nothing; the checks below prove it
        check_refcounts(cache)
        for i, want in shadow.items():
            if not cache.is_swapped(i):
                got, _ = sequence_kv(cache, i)
                assert torch.equal(got, want), f"sequence {i}"


# ---- sequences, swapping, misuse -----------------------------------------------------------------
def test_set_active_right_aligns_rows_of_different_lengths():
    cache = PagedKVCache(pool(num_blocks=16, block_size=4), batch_size=1)
    append(cache, *kv(1, 7))
    other = cache.add_sequence()
    cache.set_active([other])
    append(cache, *kv(1, 3))
    cache.set_active([0, other])
    assert cache.seq_len == 7 and cache.start.tolist() == [0, 4]
    assert cache.lengths.tolist() == [7, 3]


def test_set_active_misuse():
    cache = PagedKVCache(pool(), batch_size=2)
    with pytest.raises(KVCacheError, match="at least one sequence"):
        cache.set_active([])
    with pytest.raises(KVCacheError, match="ids repeat"):
        cache.set_active([0, 0])
    with pytest.raises(KeyError, match="no sequence 5"):
        cache.set_active([5])
    cache.update(0, *kv(2, 1))
    with pytest.raises(KVCacheError, match="a forward pass is mid-step"):
        cache.set_active([0])


def test_swap_round_trip_restores_data_and_frees_blocks():
    torch.manual_seed(0)
    cache = PagedKVCache(pool(num_blocks=6, block_size=4), batch_size=1)
    append(cache, *kv(1, 10))
    k0, v0 = sequence_kv(cache, 0)
    other = cache.add_sequence()
    cache.set_active([other])
    cache.swap_out(0)
    assert cache.is_swapped(0) and cache.allocator.num_used == 0
    append(cache, *kv(1, 20))  # reuses (overwrites) the blocks sequence 0 had
    cache.reset()  # empties the active sequence and releases its blocks
    cache.swap_in(0)
    k1, v1 = sequence_kv(cache, 0)
    assert torch.equal(k1, k0) and torch.equal(v1, v0)
    check_refcounts(cache)


def test_swap_misuse_and_swap_in_out_of_blocks():
    cache = PagedKVCache(pool(num_blocks=4, block_size=4), batch_size=1)
    append(cache, *kv(1, 8))
    with pytest.raises(KVCacheError, match="in the active batch"):
        cache.swap_out(0)
    with pytest.raises(KVCacheError, match="in the active batch"):
        cache.free_sequence(0)
    with pytest.raises(KVCacheError, match="is not swapped out"):
        cache.swap_in(0)
    other = cache.add_sequence()
    cache.set_active([other])
    cache.swap_out(0)
    with pytest.raises(KVCacheError, match="already swapped out"):
        cache.swap_out(0)
    with pytest.raises(KVCacheError, match="swap_in\\(0\\) before running it"):
        cache.set_active([0])
    append(cache, *kv(1, 12))  # 3 of 4 blocks: sequence 0 needs 2
    before = snapshot(cache)
    with pytest.raises(OutOfBlocksError, match="need 2 blocks but only 1 of 4"):
        cache.swap_in(0)
    assert_unchanged(cache, before)
    assert cache.is_swapped(0)


def test_cache_constructor_misuse():
    with pytest.raises(TypeError, match="allocator must be a BlockAllocator"):
        PagedKVCache("pool")
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        PagedKVCache(pool(), batch_size=0)
    cache = PagedKVCache(pool(), batch_size=1)
    with pytest.raises(KVCacheError, match=r"must have shape \(B=1, K=2, T, D=4\)"):
        cache.update(0, *kv(2, 1))


# ---- paged attention == contiguous attention -----------------------------------------------------
@pytest.mark.parametrize("method", PAGED_METHODS)
@pytest.mark.parametrize(("H", "n_kv"), [(2, 2), (4, 2), (4, 1)])
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("block_size", [1, 4, 5])
def test_paged_attention_matches_contiguous(method, H, n_kv, T, block_size):
    torch.manual_seed(0)
    lens = [9, 3, 14]
    cache = PagedKVCache(
        BlockAllocator(1, 32, block_size, n_kv, D), batch_size=1
    )  # one sequence at a time, so the blocks interleave in the pool
    ids = [0] + [cache.add_sequence() for _ in lens[1:]]
    per_row = []
    for sid, n in zip(ids, lens, strict=True):
        for chunk in (n // 2, n - n // 2):
            cache.set_active([sid])
            k, v = kv(1, chunk, n_kv_heads=n_kv)
            cache.update(0, k, v)
        per_row.append(sequence_kv(cache, sid))
    cache.set_active(ids)
    tables, seq_lens = cache.block_tables(), torch.tensor(lens)
    q = torch.randn(len(lens), H, T, D)
    out = paged_attention(q, cache.allocator, tables, seq_lens, 0, method=method)
    for b, (k, v) in enumerate(per_row):
        n = lens[b]
        causal = torch.arange(n)[None, :] <= (n - T + torch.arange(T))[:, None]  # (T, S)
        want = attention(q[b : b + 1], k[None], v[None], causal)
        diff = (out[b : b + 1] - want).abs().max().item()
        assert diff < 1e-5, f"row {b}: max diff {diff:.2e}"


def test_paged_attention_low_precision():
    torch.manual_seed(0)
    a = BlockAllocator(1, 16, 4, 2, 8, dtype=torch.bfloat16)
    cache = PagedKVCache(a, batch_size=2)
    cache.update(0, *[x.to(torch.bfloat16) for x in (torch.randn(2, 2, 11, 8),) * 2])
    q = torch.randn(2, 4, 1, 8, dtype=torch.bfloat16)
    ref = paged_attention(q, a, cache.block_tables(), cache.lengths, 0, method="gather")
    out = paged_attention(q, a, cache.block_tables(), cache.lengths, 0, method="blocks")
    assert out.dtype == torch.bfloat16
    diff = (out.float() - ref.float()).abs().max().item()
    assert diff < 2e-2, f"max diff {diff:.2e}"


def test_gather_kv_masks_past_the_end():
    cache = PagedKVCache(pool(num_blocks=8, block_size=4), batch_size=1)
    append(cache, *kv(1, 6))
    k, v, valid = gather_kv(cache.allocator, cache.block_tables(), torch.tensor([6]), 0)
    assert k.shape == (1, K, 6, D) and valid.all()


def test_paged_attention_misuse():
    a = pool(num_blocks=4, block_size=4)
    tables, lens = torch.tensor([[0, 1]]), torch.tensor([5])
    q = torch.randn(1, 4, 1, D)
    with pytest.raises(ValueError, match=r"method must be one of \('gather', 'blocks', 'fused'\)"):
        paged_attention(q, a, tables, lens, 0, method="flash")
    with pytest.raises(TypeError, match="pool must be a BlockAllocator"):
        paged_attention(q, None, tables, lens, 0)
    with pytest.raises(IndexError, match=r"layer must be an int in \[0, 2\)"):
        paged_attention(q, a, tables, lens, 2)
    with pytest.raises(ValueError, match=r"q must be a \(B, H, T, D\) tensor"):
        paged_attention(q[0], a, tables, lens, 0)
    with pytest.raises(ValueError, match="H must be a multiple of K"):
        paged_attention(torch.randn(1, 3, 1, D), a, tables, lens, 0)
    with pytest.raises(TypeError, match="the pool holds torch.float32"):
        paged_attention(q.double(), a, tables, lens, 0)
    with pytest.raises(ValueError, match="block_tables must be an integer"):
        paged_attention(q, a, tables.float(), lens, 0)
    with pytest.raises(ValueError, match="seq_lens must be an integer"):
        paged_attention(q, a, tables, torch.tensor([5, 5]), 0)
    with pytest.raises(ValueError, match="must hold its 1 query tokens"):
        paged_attention(q, a, tables, torch.tensor([0]), 0)
    with pytest.raises(ValueError, match="exceed the 2 blocks x 4 slots"):
        paged_attention(q, a, tables, torch.tensor([9]), 0)
    with pytest.raises(IndexError, match="outside \\[0, 4\\)"):
        paged_attention(q, a, torch.tensor([[0, -1]]), lens, 0)


# ---- the model runs on it unchanged --------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(tiny()).eval()


@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_generate_same_tokens_as_kvcache(model, block_size):
    prompt = torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(1))
    want = generate(model, prompt, 20)
    cache = PagedKVCache.from_config(model.config, 3, num_blocks=96, block_size=block_size)
    got = generate(model, prompt, 20, cache=cache)
    assert torch.equal(got, want), f"{got}\n{want}"


def test_generate_left_padded_same_tokens(model):
    tokens, mask = pad_prompts([[1, 2, 3], [4, 5, 6, 7, 8, 9], [5]])
    want = generate(model, tokens, 10, attention_mask=mask)
    cache = PagedKVCache.from_config(model.config, 3, num_blocks=64, block_size=4)
    got = generate(model, tokens, 10, attention_mask=mask, cache=cache)
    assert torch.equal(got, want)
    assert cache.lengths.tolist() == [12, 15, 10]


def greedy(model, cache, first, n):
    """Feed `first` (B,) then n - 1 greedy tokens through `cache`; return (B, n)."""
    out, tok = [first], first
    for _ in range(n - 1):
        tok = model(tok[:, None], cache)[:, -1].argmax(-1)
        out.append(tok)
    return torch.stack(out, dim=1)


@torch.inference_mode()
def test_parallel_sampling_forks_match_independent_runs(model):
    """Prefill once, fork into 3 continuations starting from different tokens: each equals
    a separate contiguous run of prompt + its tokens."""
    prompt = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(2))
    cache = PagedKVCache.from_config(model.config, 1, num_blocks=32, block_size=4)
    model(prompt, cache)
    forks = [0, cache.fork(0), cache.fork(0)]
    cache.set_active(forks)
    first = torch.tensor([3, 17, 40])
    got = greedy(model, cache, first, 8)
    for b in range(3):
        ref = KVCache.from_config(model.config, 1, 32)
        model(prompt, ref)
        want = greedy(model, ref, first[b : b + 1], 8)
        assert torch.equal(got[b : b + 1], want), f"fork {b}"
    assert cache.allocator.refcount(cache.block_table(0)[0]) == 3  # the full prompt block
    check_refcounts(cache)


@torch.inference_mode()
def test_shared_prompt_prefix_between_requests(model):
    system = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(3))
    user = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(4))
    cache = PagedKVCache.from_config(model.config, 1, num_blocks=32, block_size=4)
    model(torch.cat([system, user], dim=1), cache)  # request 0: system + its own question
    req = cache.fork(0, n_tokens=9)  # request 1 reuses the system prompt's K/V
    cache.set_active([req])
    other = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(5))
    logits = model(other, cache)
    ref = KVCache.from_config(model.config, 1, 32)
    want = model(torch.cat([system, other], dim=1), ref)[:, 9:]
    diff = (logits - want).abs().max().item()
    assert diff < 1e-5, f"max diff {diff:.2e}"
    assert cache.block_table(req)[:2] == cache.block_table(0)[:2]


@torch.inference_mode()
@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_preempted_sequence_produces_the_same_tokens(model, mode):
    """Two sequences outgrow a 9-block pool; the second is preempted (swapped out, or dropped
    and recomputed later), the first finishes, then the second resumes: both produce exactly
    the tokens of an uninterrupted run."""
    prompts = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(6))
    want = generate(model, prompts, 16).tolist()
    cache = PagedKVCache.from_config(model.config, 2, num_blocks=9, block_size=4)
    out = prompts.tolist()
    tok = model(prompts, cache)[:, -1].argmax(-1)  # (2,)
    rows, victim = [0, 1], None
    while True:
        for i, r in enumerate(rows):
            out[r].append(int(tok[i]))
        if len(out[0]) == len(want[0]):
            break
        try:
            logits = model(tok[:, None], cache)[:, -1]
        except OutOfBlocksError:  # nothing was written: preempt the last row and retry
            rows.pop()
            victim = cache.active[-1]
            cache.set_active(cache.active[:-1])
            cache.swap_out(victim) if mode == "swap" else cache.free_sequence(victim)
            tok = tok[:-1]
            logits = model(tok[:, None], cache)[:, -1]
        tok = logits.argmax(-1)
    assert victim is not None, "the pool was meant to run out"
    cache.reset()  # the first sequence is done: release its blocks
    if mode == "swap":
        cache.swap_in(victim)
        cache.set_active([victim])
        tok = torch.tensor([out[1].pop()])  # generated but not yet fed
    else:
        cache.set_active([cache.add_sequence()])
        tok = model(torch.tensor([out[1]]), cache)[:, -1].argmax(-1)  # recompute the prefix
    while True:
        out[1].append(int(tok[0]))
        if len(out[1]) == len(want[1]):
            break
        tok = model(tok[:, None], cache)[:, -1].argmax(-1)
    assert out == want


# ---- decode without a gather: attend ------------------------------------------------------------
def test_attend_matches_update_then_attention():
    torch.manual_seed(0)
    H = 4
    a = PagedKVCache(pool(num_blocks=32, block_size=3), batch_size=1)
    b = PagedKVCache(pool(num_blocks=32, block_size=3), batch_size=1)
    for cache in (a, b):  # three sequences of 5, 9 and 2 tokens, blocks interleaved in the pool
        cache.add_sequence(), cache.add_sequence()
    torch.manual_seed(1)
    for sid, n in ((0, 5), (1, 9), (2, 2)):
        k, v = kv(1, n)
        for cache in (a, b):
            cache.set_active([sid])
            append(cache, k, v)
    a.set_active([0, 1, 2]), b.set_active([0, 1, 2])  # rows right-aligned: starts 4, 0, 7
    q, (k, v) = torch.randn(3, H, 1, D), kv(3, 1)
    mask = a.valid_mask(a.seq_len + 1)[:, None, None, :]  # (B, 1, 1, S): the real slots
    for layer in range(L):
        got = a.attend(layer, q, k, v, mask)
        k_all, v_all = b.update(layer, k, v)  # (B, K, S, D), left-padded view
        want = attention(q, k_all, v_all, b.valid_mask(k_all.shape[2])[:, None, None, :])
        diff = (got - want).abs().max().item()
        assert diff < 1e-6, f"layer {layer}: max diff {diff:.2e}"
    assert a.lengths.tolist() == b.lengths.tolist() == [6, 10, 3]


def test_attend_on_a_row_of_padding_gives_zeros_like_attention():
    a = PagedKVCache(pool(num_blocks=8, block_size=2), batch_size=2)
    b = PagedKVCache(pool(num_blocks=8, block_size=2), batch_size=2)
    for cache in (a, b):
        cache.set_left_padding(torch.tensor([1, 0]))  # row 0's first slot is padding
    q, (k, v) = torch.randn(2, 4, 1, D), kv(2, 1)
    got = a.attend(0, q, k, v, a.valid_mask(1)[:, None, None, :])
    k_all, v_all = b.update(0, k, v)
    want = attention(q, k_all, v_all, b.valid_mask(1)[:, None, None, :])
    assert torch.equal(got[0], torch.zeros_like(got[0])) and torch.equal(want[0], got[0])
    assert (got[1] - want[1]).abs().max().item() < 1e-6


def test_model_decodes_through_attend_and_matches_kvcache(model, monkeypatch):
    import kvlib.paged

    calls = []
    real = kvlib.paged.paged_attention_fused
    monkeypatch.setattr(
        kvlib.paged, "paged_attention_fused", lambda *a: calls.append(1) or real(*a)
    )
    tokens, mask = pad_prompts([[1, 2, 3], [4, 5, 6, 7, 8, 9]])
    want = generate(model, tokens, 6, attention_mask=mask)
    cache = PagedKVCache.from_config(model.config, 2, num_blocks=16, block_size=4)
    got = generate(model, tokens, 6, attention_mask=mask, cache=cache)
    assert torch.equal(got, want)
    assert len(calls) == 5 * model.config.n_layers  # the fused loop: every decode step and layer


def test_low_precision_pool_decodes_through_update(model):
    cache = PagedKVCache.from_config(
        model.config, 1, num_blocks=8, block_size=4, dtype=torch.bfloat16
    )
    assert not cache.fused_decode
    out = generate(model, torch.tensor([[1, 2, 3]]), 4, cache=cache)  # attend: update, attention
    assert out.shape == (1, 7) and cache.seq_len == 6


def test_attend_misuse_leaves_the_cache_unchanged():
    cache = PagedKVCache(pool(num_blocks=4, block_size=4), batch_size=1)
    append(cache, *kv(1, 3))
    before = snapshot(cache)
    with pytest.raises(KVCacheError, match=r"q must be a float tensor of shape \(B=1, H, T=1"):
        cache.attend(0, torch.randn(1, 4, 2, D), *kv(1, 1), None)
    with pytest.raises(KVCacheError, match=r"q must be a float tensor of shape \(B=1"):
        cache.attend(0, torch.randn(2, 4, 1, D), *kv(1, 1), None)
    with pytest.raises(KVCacheError, match=r"q must be a float tensor of shape \(B=1, H, T=2"):
        cache.attend(0, torch.randn(1, 4, 1, D), *kv(1, 2), None)
    with pytest.raises(KVCacheError, match="the mask must be the cache's valid_mask"):
        cache.attend(0, torch.randn(1, 4, 1, D), *kv(1, 1), torch.zeros(1, 1, 1, 4, dtype=bool))
    assert_unchanged(cache, before)


def test_set_active_rejects_a_repeated_sequence():
    cache = PagedKVCache(pool(), batch_size=2)
    with pytest.raises(KVCacheError, match=r"sequence ids repeat in \[0, 0\]"):
        cache.set_active([0, 0])


def test_out_of_blocks_on_a_padded_batch_leaves_no_padding(model):
    """The pool runs out while a left-padded prompt is written: padding, tables and the free
    list are all as before, and the next ordinary forward pass is right."""
    tokens, mask = pad_prompts([[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12]])
    cache = PagedKVCache.from_config(model.config, 2, num_blocks=2, block_size=4)
    with pytest.raises(OutOfBlocksError, match="nothing was written"):
        model(tokens, cache, mask)
    assert cache.start.tolist() == [0, 0] and cache.seq_len == 0
    assert cache.allocator.num_free == 2
    check_refcounts(cache)
    x = torch.tensor([[1, 2], [3, 4]])
    with torch.no_grad():
        got, want = model(x, cache), model(x)
    assert (got - want).abs().max().item() < 1e-5


def test_block_tables_follow_every_change_to_a_table():
    """block_tables() is kept between calls: after every operation that changes a table it
    must equal the tables rebuilt from each active sequence's own list."""

    def check(cache):
        tables = [cache.block_table(i) for i in cache.active]
        M = max(1, max(len(t) for t in tables))
        want = torch.tensor([t + [-1] * (M - len(t)) for t in tables])
        assert torch.equal(cache.block_tables(), want), (cache.block_tables(), want)

    cache = PagedKVCache(pool(num_blocks=32, block_size=4), batch_size=1)
    append(cache, *kv(1, 6))
    check(cache)
    state = cache.checkpoint()
    child = cache.fork(cache.active[0])
    cache.set_active([cache.active[0], child])
    check(cache)
    append(cache, *kv(2, 1))  # both write into the shared last block: copy-on-write
    check(cache)
    append(cache, *kv(2, 3))  # a new block each
    check(cache)
    cache.crop(5)
    check(cache)
    cache.rollback(state)
    check(cache)
    cache.reset()
    check(cache)
