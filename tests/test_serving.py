import math

import numpy as np
import pytest
import torch

from kvlib.errors import KVLibTypeError, KVLibValueError, OutOfBlocksError
from kvlib.generate import generate
from kvlib.paged import PagedKVCache
from kvlib.preemption import generate_paged
from kvlib.serving import (
    SHAREGPT_MEAN_INPUT,
    SHAREGPT_MEAN_OUTPUT,
    Trace,
    _buddy_fit,
    _first_fit,
    _reservation,
    fragmentation_study,
    sharegpt_like_trace,
    simulate,
)
from tests.models import CONFIGS, model_for


@pytest.fixture(scope="module")
def trace():
    return sharegpt_like_trace(300, seed=0)


def test_trace_is_seeded_bounded_and_near_the_published_means():
    a, b = sharegpt_like_trace(2000, seed=1), sharegpt_like_trace(2000, seed=1)
    assert np.array_equal(a.prompt_lens, b.prompt_lens)
    assert not np.array_equal(a.prompt_lens, sharegpt_like_trace(2000, seed=2).prompt_lens)
    total = a.prompt_lens + a.output_lens
    assert total.max() <= 2048 and a.prompt_lens.min() >= 1 and a.output_lens.min() >= 1
    # clipping at 2048 lowers the means a little; they stay within 15% of the paper's
    for got, want in (
        (a.prompt_lens.mean(), SHAREGPT_MEAN_INPUT),
        (a.output_lens.mean(), SHAREGPT_MEAN_OUTPUT),
    ):
        assert abs(got / want - 1) < 0.15, f"sample mean {got:.1f} vs published {want}"


def test_trace_misuse():
    with pytest.raises(ValueError, match="n_requests must be an int >= 1"):
        sharegpt_like_trace(0)
    with pytest.raises(ValueError, match="max_len must be an int >= 2"):
        sharegpt_like_trace(5, max_len=1)
    with pytest.raises(ValueError, match="sigma must be positive"):
        sharegpt_like_trace(5, sigma=0.0)
    with pytest.raises(ValueError, match="equal length"):
        Trace(np.array([1, 2]), np.array([1]))
    with pytest.raises(ValueError, match="at least 1 token"):
        Trace(np.array([0]), np.array([1]))


@pytest.mark.parametrize(
    ("policy", "block_size"), [("max", 1), ("pow2", 1), ("exact", 1), ("paged", 1), ("paged", 16)]
)
def test_every_token_is_served_and_memory_is_bounded(trace, policy, block_size):
    r = simulate(trace, policy, budget=8192, block_size=block_size)
    # progress survives preemption, so the batch sizes add up to the output tokens
    assert int(r.running.sum()) == int(trace.output_lens.sum())
    assert (r.used <= r.reserved).all() and (r.reserved <= r.budget).all()
    if policy == "paged":
        slack = r.reserved - r.used
        assert (slack <= r.running * (block_size - 1)).all(), "more than one partial block"
    if policy == "max":
        assert np.array_equal(r.reserved, r.running * 2048)


def test_first_fit_matches_a_brute_force_scan():
    rng = np.random.default_rng(0)
    for _ in range(200):
        budget = 64
        spans, at = [], 0
        while at < budget:
            gap, size = int(rng.integers(0, 6)), int(rng.integers(1, 10))
            if at + gap + size > budget:
                break
            spans.append((at + gap, size))
            at += gap + size
        busy = np.zeros(budget, dtype=bool)
        for off, n in spans:
            busy[off : off + n] = True
        size = int(rng.integers(1, 12))
        want = next((i for i in range(budget - size + 1) if not busy[i : i + size].any()), None)
        assert _first_fit(spans, size, budget) == want


def test_paging_wastes_less_than_contiguous_reservation(trace):
    runs = {r.label: r for r in fragmentation_study(trace, budget=8192, block_sizes=(1, 16, 64))}
    w = {k: r.waste for k, r in runs.items()}
    assert w["max"] > w["pow2"] > w["exact"] > w["paged (block 64)"], w
    assert w["paged (block 64)"] > w["paged (block 16)"] > w["paged (block 1)"], w
    assert w["paged (block 1)"] == pytest.approx(0.0, abs=1e-12)
    assert runs["paged (block 16)"].mean_batch > runs["max"].mean_batch
    assert runs["paged (block 16)"].steps < runs["max"].steps
    assert 0 < runs["exact"].pool_utilization < runs["paged (block 16)"].pool_utilization <= 1


def test_pool_utilization_is_nan_without_a_queue():
    t = Trace(np.array([10, 20]), np.array([5, 5]))
    r = simulate(t, "exact", budget=4096)
    assert math.isnan(r.pool_utilization)
    assert r.steps == 5 and r.waste == pytest.approx(1 - r.used.sum() / r.reserved.sum())


def test_simulate_misuse(trace):
    with pytest.raises(KVLibValueError, match="policy must be one of"):
        simulate(trace, "buddy")
    with pytest.raises(KVLibValueError, match="allocator must be one of"):
        simulate(trace, "exact", allocator="best-fit")
    with pytest.raises(KVLibValueError, match="budget must be an int >= 2048"):
        simulate(trace, "max", budget=1000)
    with pytest.raises(KVLibTypeError, match="budget must be an int"):
        simulate(trace, "max", budget=4096.0)
    with pytest.raises(KVLibValueError, match=r"block_size must be an int in \[1, 2048\]"):
        simulate(trace, "paged", block_size=0)
    with pytest.raises(ValueError, match="watermark must be a share"):
        simulate(trace, "paged", watermark=1.0)
    with pytest.raises(ValueError, match="cannot hold one request of max_len=2048"):
        simulate(trace, "paged", budget=2049, block_size=1000)
    with pytest.raises(ValueError, match="needs 30 slots, more than max_len=20"):
        simulate(Trace(np.array([10]), np.array([20])), "max", budget=100, max_len=20)
    with pytest.raises(RuntimeError, match="max_steps=3"):
        simulate(trace, "exact", max_steps=3)


def test_simulate_stops_at_max_steps(trace):
    with pytest.raises(RuntimeError, match="trace not served within max_steps=3"):
        simulate(trace, "paged", max_steps=3)


def test_buddy_fit_matches_a_brute_force_scan():
    rng = np.random.default_rng(1)
    budget = 64
    for _ in range(300):
        spans, busy = [], np.zeros(budget, dtype=bool)
        for _ in range(int(rng.integers(0, 8))):
            size = 1 << int(rng.integers(0, 4))
            at = _buddy_fit(sorted(spans), size, budget)
            if at is not None:
                spans.append((at, size))
                busy[at : at + size] = True
        size = 1 << int(rng.integers(0, 5))
        want = next(
            (i for i in range(0, budget - size + 1, size) if not busy[i : i + size].any()), None
        )
        assert _buddy_fit(sorted(spans), size, budget) == want, (spans, size)


def test_reservations_follow_the_paper():
    # Kwon et al. 2023, section 6.1: an output of 25 tokens gets 32 slots under Pow2
    assert _reservation("pow2", 10, 25, 2048) == 10 + 32
    assert _reservation("exact", 10, 25, 2048) == 35
    assert _reservation("max", 10, 25, 2048) == 2048
    assert _reservation("pow2", 1800, 240, 2048) == 2048  # 1800 + 256, capped at max_len


def test_buddy_rounds_reservations_to_powers_of_two(trace):
    buddy = simulate(trace, "exact", budget=8192)
    first = simulate(trace, "exact", budget=8192, allocator="first-fit")
    # every buddy reservation is a power of two, so its reserved totals exceed first-fit's
    assert buddy.waste > first.waste, (buddy.waste, first.waste)
    assert buddy.pool_utilization < first.pool_utilization
    one = simulate(Trace(np.array([10]), np.array([25])), "exact", budget=4096)
    assert set(one.reserved.tolist()) == {64}, "35 slots round up to 64"


def test_recomputation_is_counted(trace):
    r = simulate(trace, "paged", budget=8192, block_size=16)
    assert r.preemptions > 0 and r.recomputed_tokens > r.preemptions, r.recomputed_tokens
    prompts, outputs = int(trace.prompt_lens.sum()), int(trace.output_lens.sum())
    assert r.token_work == prompts + outputs + r.recomputed_tokens
    exact = simulate(trace, "exact", budget=8192)
    assert exact.recomputed_tokens == 0 and exact.token_work == prompts + outputs
    # a larger watermark preempts less, so less is recomputed
    calm = simulate(trace, "paged", budget=8192, block_size=16, watermark=0.2)
    assert calm.recomputed_tokens < r.recomputed_tokens, (calm.recomputed_tokens, r)


def test_recompute_tokens_of_one_preemption():
    # two requests of 4 + 12 tokens in 32 one-slot blocks: the second one is preempted at the
    # step the pool runs dry, holding 4 + s tokens, and recomputes exactly those
    t = Trace(np.array([4, 4]), np.array([12, 12]))
    r = simulate(t, "paged", budget=2048 + 0, max_len=16, block_size=1, watermark=0.0)
    assert r.preemptions == 0  # 2048 slots: no pressure
    small = simulate(t, "paged", budget=24, max_len=16, block_size=1, watermark=0.0)
    assert small.preemptions == 1
    # both grow to 12 tokens (24 slots) after 8 steps; the 9th step preempts the second
    assert small.recomputed_tokens == 12, small.recomputed_tokens


@pytest.fixture(scope="module")
def tiny_model():
    return model_for(CONFIGS["GQA"])


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_generate_paged_preempts_and_matches_generate(tiny_model, mode):
    cfg = tiny_model.config
    prompts = torch.randint(0, cfg.vocab_size, (3, 6), generator=torch.Generator().manual_seed(0))
    want = generate(tiny_model, prompts, 20)
    cache = PagedKVCache.from_config(cfg, batch_size=3, num_blocks=14, block_size=4)
    got, events = generate_paged(tiny_model, cache, prompts, 20, preempt=mode)
    assert torch.equal(got, want), (got, want)
    kinds = [e.kind for e in events]
    assert "preempt" in kinds and kinds.count("finish") == 3, kinds
    assert kinds.count("preempt") == kinds.count("resume")
    redone = sum(e.recomputed for e in events)
    assert (redone > 0) == (mode == "recompute"), redone
    assert cache.allocator.num_free == 14, "every block is back in the pool"


def test_generate_paged_misuse(tiny_model):
    cfg = tiny_model.config
    prompts = torch.zeros(1, 6, dtype=torch.long)
    cache = PagedKVCache.from_config(cfg, batch_size=1, num_blocks=14, block_size=4)
    with pytest.raises(KVLibValueError, match="preempt must be one of"):
        generate_paged(tiny_model, cache, prompts, 4, preempt="evict")
    with pytest.raises(KVLibValueError, match="n_new must be an int >= 1"):
        generate_paged(tiny_model, cache, prompts, 0)
    tight = PagedKVCache.from_config(cfg, batch_size=1, num_blocks=2, block_size=4)
    with pytest.raises(OutOfBlocksError):
        generate_paged(tiny_model, tight, prompts, 8)  # one row that cannot grow
