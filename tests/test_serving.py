import math

import numpy as np
import pytest

from kvlib.serving import (
    SHAREGPT_MEAN_INPUT,
    SHAREGPT_MEAN_OUTPUT,
    Trace,
    _first_fit,
    fragmentation_study,
    sharegpt_like_trace,
    simulate,
)


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
    with pytest.raises(ValueError, match="policy must be one of"):
        simulate(trace, "buddy")
    with pytest.raises(ValueError, match="budget must be an int >= max_len=2048"):
        simulate(trace, "max", budget=1000)
    with pytest.raises(ValueError, match=r"block_size must be an int in \[1, 2048\]"):
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
