"""The engine's parts one by one: block hashes, the block pool, the radix index, the step cache,
the scheduler's policies and the engine's errors."""

import pytest
import torch

from kvlib.engine.blocks import BlockPool, block_hash
from kvlib.engine.core import Engine
from kvlib.engine.kv import StepCache
from kvlib.engine.request import SamplingParams
from kvlib.errors import KVLibError, KVLibTypeError, KVLibValueError, OutOfBlocksError
from kvlib.generate import generate
from kvlib.kv_cache import KVCache
from kvlib.paged import BlockAllocator
from tests.models import CONFIGS, model_for

MODEL = model_for(CONFIGS["GQA"])


# ---- block hashes and the pool -----------------------------------------------------------------
def test_a_block_key_names_its_tokens_and_everything_before_them():
    a = block_hash(None, (1, 2), None)
    assert a == block_hash(None, [1, 2], None), "the same tokens give the same key"
    assert block_hash(a, (3, 4), None) != block_hash(None, (3, 4), None), "the parent counts"
    assert block_hash(None, (1, 2), "tenant") != a, "the salt keeps tenants apart"
    assert block_hash(None, (2, 1), None) != a and block_hash(None, (12,), None) != a
    assert len(a) == 16 and set(a) <= set("0123456789abcdef")


def fill(pool, tokens, salt=None):
    """Allocate and register blocks for `tokens` as if a request had computed them."""
    table = pool.allocate(pool.blocks_for(len(tokens)))
    keys = []
    pool.register(tokens, len(tokens), table, keys, salt)
    return table, keys


@pytest.mark.parametrize("kind", ["hash", "radix"])
def test_only_full_blocks_are_cached_and_a_hit_stops_at_the_first_miss(kind):
    pool = BlockPool(8, 4, kind)
    table, keys = fill(pool, list(range(10)))  # 2 full blocks + 2 tokens
    assert len(keys) == 2 and pool.num_cached == 2, "the partial third block is not cached"
    blocks, _ = pool.match_prefix(list(range(8)) + [99, 98, 97, 96, 0], None, 12)
    assert blocks == table[:2] and [pool.ref[b] for b in blocks] == [2, 2]
    miss, _ = pool.match_prefix([0, 1, 2, 9] + list(range(4, 8)), None, 8)
    assert miss == [], "block 1 matches, but its parent differs: no hit"
    salted, _ = pool.match_prefix(list(range(8)), "other", 8)
    assert salted == []
    pool.check_invariants()


@pytest.mark.parametrize("kind", ["hash", "radix"])
def test_a_prompt_that_hits_on_every_block_still_computes_its_last_token(kind):
    engine = Engine(MODEL, num_blocks=16, block_size=4, prefix_cache=kind)
    prompt = list(range(3, 11))  # exactly two blocks
    first = engine.add_request(prompt, SamplingParams(max_new_tokens=3))
    engine.run()
    again = engine.add_request(prompt, SamplingParams(max_new_tokens=3))
    out = engine.step()
    assert engine.requests[again].num_cached == 4, "the block holding the last token is recomputed"
    assert out.scheduled == [(again, 4)]
    engine.run()
    assert engine.requests[again].output == engine.requests[first].output


def test_freed_cached_blocks_are_evicted_least_recently_freed_first():
    pool = BlockPool(4, 2, "hash")
    a, _ = fill(pool, [1, 2, 3, 4])
    b, _ = fill(pool, [5, 6, 7, 8])
    pool.free(a)  # a's tail first, then its head: [a1, a0]
    pool.free(b)
    assert list(pool.free_queue) == [a[1], a[0], b[1], b[0]]
    assert pool.allocate(1) == [a[1]] and pool.evictions == 1
    assert pool.match_prefix([1, 2, 3, 4], None, 4)[0] == [a[0]], "a's head is still cached"
    assert pool.match_prefix([5, 6, 7, 8], None, 4)[0] == b, "b was freed later: still cached"
    pool.check_invariants()


@pytest.mark.parametrize("kind", ["hash", "radix"])
def test_a_block_computed_twice_is_cached_as_the_copy_in_use(kind):
    pool = BlockPool(4, 2, kind)
    a, _ = fill(pool, [1, 2])
    b, _ = fill(pool, [1, 2])  # computed again while a still holds its copy
    pool.free(a)  # a's copy is no longer the cached one: it is a plain free block
    pool.allocate(pool.num_free)
    assert pool.evictions == 0, "handing out a's copy evicts nothing"
    assert pool.match_prefix([1, 2, 3], None, 2)[0] == b
    pool.check_invariants()


@pytest.mark.parametrize("kind", ["hash", "radix"])
def test_a_request_whose_cached_prefix_is_evicted_under_it_still_caches_its_blocks(kind):
    """Blocks of 1 token and a pool of 2: serving a request evicts the cache entries of the
    previous run of the same prompt while the request still names them."""
    engine = Engine(MODEL, num_blocks=2, block_size=1, max_num_tokens=1, prefix_cache=kind)
    outs = []
    for _ in range(3):
        rid = engine.add_request([0], SamplingParams(max_new_tokens=2))
        engine.run()
        outs.append(engine.requests[rid].output)
        engine.check_drained()
    assert outs[0] == outs[1] == outs[2]


def test_a_pruned_path_grows_again_when_a_running_request_fills_the_next_block():
    from kvlib.engine.radix import RadixIndex

    index = RadixIndex()
    first = index.child(None, (1,), None, True)
    index.put(first, 0)
    second = index.child(first, (2,), None, True)
    index.put(second, 1)
    index.pop(second)
    index.pop(first)  # both evicted: the whole path is pruned
    assert index.num_nodes() == 0 and len(index) == 0
    third = index.child(first, (3,), None, True)  # a request still names `first`
    index.put(third, 2)
    assert index.num_nodes() == 3, "salt node, (1,), (3,): the path is back in the tree"
    again = index.child(None, (1,), None, False)
    assert again is not None and index.child(again, (3,), None, False) is third
    index.pop(third)
    assert index.num_nodes() == 0 and len(index) == 0


def test_the_pool_refuses_double_frees_and_partial_allocations():
    pool = BlockPool(3, 2, None)
    blocks = pool.allocate(2)
    with pytest.raises(OutOfBlocksError, match="need 2 blocks but only 1"):
        pool.allocate(2)
    assert pool.num_free == 1, "a failed allocation takes nothing"
    pool.free(blocks)
    with pytest.raises(KVLibValueError, match="double free"):
        pool.free(blocks)
    assert pool.num_free == 3
    pool.check_invariants()


def test_the_radix_tree_prunes_empty_leaves_and_keeps_interior_nodes():
    pool = BlockPool(6, 2, "radix")
    fill(pool, [1, 2, 3, 4, 5, 6])
    fill(pool, [1, 2, 7, 8])  # shares the first block's node
    assert pool.index.num_nodes() == 1 + 4  # the salt node, [1 2], [3 4], [5 6], [7 8]
    pool.free(list(range(pool.num_blocks - pool.num_free)))
    pool.allocate(6)  # evict everything
    assert pool.index.num_nodes() == 0 and len(pool.index) == 0
    pool.check_invariants()


# ---- the step cache --------------------------------------------------------------------------
def packed_logits(method, rows_tokens, contexts, P=4):
    """Logits of one packed step over requests with `contexts` already cached."""
    storage = BlockAllocator.from_config(MODEL.config, 32, P)
    pool = BlockPool(32, P, None)
    rows, fed = [], []
    for ctx, new in zip(contexts, rows_tokens, strict=True):
        table = pool.allocate(pool.blocks_for(len(ctx) + len(new)))
        if ctx:
            MODEL(torch.tensor([ctx]), StepCache(storage, [(table, 0, len(ctx))], method))
        rows.append((table, len(ctx), len(new)))
        fed += new
    with torch.no_grad():
        return MODEL(torch.tensor([fed]), StepCache(storage, rows, method))[0]  # (T, V)


def test_a_packed_step_gives_each_request_the_logits_it_gets_alone():
    contexts = [list(range(7)), [], list(range(20, 25)), list(range(30, 39))]
    new = [[9], [1, 2, 3, 4, 5, 6], [40], [41, 42, 43]]
    got = packed_logits("gather", new, contexts)
    fused = packed_logits("fused", new, contexts)
    diff = (got - fused).abs().max().item()
    assert diff < 1e-5, f"fused vs gather paged attention differ by {diff:.3g}"
    at = 0
    for ctx, toks in zip(contexts, new, strict=True):
        with torch.no_grad():
            alone = MODEL(torch.tensor([ctx + toks]))[0, len(ctx) :]  # (n, V) no cache
        d = (got[at : at + len(toks)] - alone).abs().max().item()
        assert d < 1e-5, f"request {ctx + toks}: packed vs alone logits differ by {d:.3g}"
        at += len(toks)


def test_the_step_cache_refuses_rows_without_room():
    storage = BlockAllocator.from_config(MODEL.config, 4, 4)
    with pytest.raises(KVLibValueError, match="needs 6 tokens"):
        StepCache(storage, [([0], 2, 4)])
    with pytest.raises(KVLibValueError, match="method"):
        StepCache(storage, [([0], 0, 1)], "magic")


# ---- the scheduler's policies ------------------------------------------------------------------
def test_prefill_chunks_ride_along_with_decodes_in_one_step():
    engine = Engine(MODEL, num_blocks=32, block_size=4, max_num_tokens=8)
    engine.add_request(list(range(5)), SamplingParams(max_new_tokens=10))
    engine.step()  # the first prompt, whole
    engine.add_request(list(range(10, 30)), SamplingParams(max_new_tokens=2))
    sizes = [sorted(n for _, n in engine.step().scheduled) for _ in range(3)]
    assert sizes == [[1, 7], [1, 7], [1, 6]], f"steps as (decode, chunk) sizes: {sizes}"


@pytest.mark.parametrize("preemption", ["recompute", "swap"])
def test_a_dry_pool_preempts_the_newest_request_and_counts_the_cost(preemption):
    engine = Engine(MODEL, num_blocks=6, block_size=2, preemption=preemption, prefix_cache=None)
    prompts = [list(range(i, i + 3)) for i in range(3)]
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=6)) for p in prompts]
    engine.run()
    stats = engine.scheduler.stats
    assert stats["preemptions"] > 0
    assert engine.requests[ids[0]].num_preemptions == 0, "the oldest request is never the victim"
    cost = stats["recomputed_tokens"] if preemption == "recompute" else stats["swap_bytes"]
    other = stats["swap_bytes"] if preemption == "recompute" else stats["recomputed_tokens"]
    assert cost > 0 and other == 0, stats
    for i, p in zip(ids, prompts, strict=True):
        want = generate(MODEL, torch.tensor([p]), 6)[0, 3:].tolist()
        assert engine.requests[i].output == want
    engine.check_drained()


def test_reservations_admit_fewer_requests_than_paging():
    def peak(reserve):
        engine = Engine(MODEL, num_blocks=16, block_size=4, reserve_tokens=reserve)
        for i in range(8):
            engine.add_request(list(range(i, i + 4)), SamplingParams(max_new_tokens=4))
        engine.run()
        return max(h["running"] for h in engine.history)

    assert peak(None) == 8 and peak(32) == 2  # 16 blocks: 8 requests of 2, or 2 of 8


def test_hash_and_radix_indexes_find_the_same_blocks():
    runs = []
    for kind in ("hash", "radix"):
        engine = Engine(MODEL, num_blocks=12, block_size=2, max_num_tokens=6, prefix_cache=kind)
        for i in range(6):
            engine.add_request([5, 6, 7, 8, 9] + [i] * (i + 1), SamplingParams(max_new_tokens=4))
        out = engine.run()
        runs.append((out, engine.pool.hits, engine.pool.evictions, engine.history))
    assert runs[0][1] > 0 and runs[0][:3] == runs[1][:3]
    assert [h["blocks_used"] for h in runs[0][3]] == [h["blocks_used"] for h in runs[1][3]]


# ---- requests and errors -------------------------------------------------------------------------
def test_requests_that_can_never_run_are_refused_and_nothing_is_queued():
    engine = Engine(MODEL, num_blocks=4, block_size=4)
    cases = [
        (OutOfBlocksError, "whole pool has 4", [1] * 10, SamplingParams(max_new_tokens=10)),
        (KVLibValueError, "max_seq_len=128", [1] * 100, SamplingParams(max_new_tokens=40)),
        (KVLibValueError, "non-empty", [], None),
        (KVLibValueError, r"in \[0, 64\)", [64], None),
        (KVLibValueError, "eos_token_id=99", [1], SamplingParams(eos_token_id=99)),
        (KVLibTypeError, "SamplingParams", [1], {"max_new_tokens": 3}),
    ]
    for error, match, ids, params in cases:
        with pytest.raises(error, match=match):
            engine.add_request(ids, params)
    assert not engine.requests and not engine.has_unfinished()
    with pytest.raises(KVLibValueError, match="no request with id 7"):
        engine.cancel(7)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(seed=-1), "seed"),
    ],
)
def test_sampling_params_are_checked(kwargs, match):
    with pytest.raises(KVLibValueError, match=match):
        SamplingParams(**kwargs)


def test_cancel_frees_a_running_request_and_streams_stop():
    engine = Engine(MODEL, num_blocks=16, block_size=2)
    a = engine.add_request(list(range(6)), SamplingParams(max_new_tokens=20))
    b = engine.add_request(list(range(9)), SamplingParams(max_new_tokens=5))
    engine.step()
    held = len(engine.requests[a].block_table)
    used = engine.pool.num_used
    engine.cancel(a)
    assert engine.pool.num_used == used - held and engine.requests[a].finish_reason == "cancelled"
    streamed = []
    while engine.has_unfinished():
        streamed += list(engine.step().tokens.items())
    assert {rid for rid, _ in streamed} == {b}
    engine_output = engine.requests[b].output
    assert [t for _, t in streamed] == engine_output[1:]
    engine.cancel(a)  # a finished request: nothing to do
    engine.check_drained()
    assert engine.pop(b).output == engine_output and b not in engine.requests
    with pytest.raises(KVLibValueError, match="no request with id"):
        engine.pop(b)


def test_only_a_finished_request_can_be_popped_and_the_method_is_checked():
    engine = Engine(MODEL, num_blocks=8, block_size=4)
    rid = engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=4))
    with pytest.raises(KVLibValueError, match="waiting"):
        engine.pop(rid)
    assert rid in engine.requests
    with pytest.raises(KVLibValueError, match="attention must be one of"):
        Engine(MODEL, num_blocks=8, attention="flash")


def test_eos_stops_a_request_and_is_emitted():
    prompt = [3, 1, 4, 1, 5]
    free_run = generate(MODEL, torch.tensor([prompt]), 8)[0, 5:].tolist()
    eos = free_run[3]
    engine = Engine(MODEL, num_blocks=8, block_size=4)
    rid = engine.add_request(prompt, SamplingParams(max_new_tokens=8, eos_token_id=eos))
    engine.run()
    out = engine.requests[rid].output
    assert (
        out == free_run[: free_run.index(eos) + 1] and engine.requests[rid].finish_reason == "eos"
    )


def test_a_packed_step_matches_a_kv_cache_decode():
    """The decode path (fused kernel over the blocks) against kvlib's contiguous cache."""
    prompt = list(range(11))
    cache = KVCache.from_config(MODEL.config, 1, 12)
    with torch.no_grad():
        MODEL(torch.tensor([prompt[:-1]]), cache)
        want = MODEL(torch.tensor([prompt[-1:]]), cache)[0, -1]
    got = packed_logits("fused", [prompt[-1:]], [prompt[:-1]])[-1]
    diff = (got - want).abs().max().item()
    assert diff < 1e-5, f"packed decode vs KVCache decode logits differ by {diff:.3g}"


def test_run_stops_with_an_error_rather_than_spin_if_nothing_can_be_scheduled(monkeypatch):
    engine = Engine(MODEL, num_blocks=8, block_size=4)
    engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=2))
    monkeypatch.setattr(engine.scheduler, "schedule", lambda: [])
    with pytest.raises(KVLibError, match="none could be scheduled"):
        engine.run()
