"""Serving traces, their metrics, and replaying a trace through the engine or static batches."""

import numpy as np
import pytest

from kvlib.bench.engine import kv_over_time
from kvlib.engine.core import Engine
from kvlib.engine.replay import serve_static, serve_trace
from kvlib.engine.trace import VirtualClock, percentile, sharegpt_like, summarize
from kvlib.errors import KVLibValueError
from tests.models import CONFIGS, model_for


def test_a_trace_has_poisson_arrivals_bounded_lengths_and_its_shared_prompt():
    trace = sharegpt_like(3000, rate=5.0, vocab_size=64, system_prompt=8, max_prompt=40, seed=1)
    gaps = np.diff([0.0] + [r.arrival for r in trace])
    assert (gaps > 0).all(), "arrivals are strictly increasing"
    assert abs(gaps.mean() - 1 / 5.0) < 0.02, f"mean gap {gaps.mean():.3f}, expected 0.2"
    assert abs(gaps.std() / gaps.mean() - 1) < 0.1, "exponential gaps: std equals mean"
    assert all(r.prompt[:8] == trace[0].prompt[:8] for r in trace)
    assert all(9 <= len(r.prompt) <= 40 and 1 <= r.max_new_tokens <= 96 for r in trace)
    outs = [r.max_new_tokens for r in trace]
    assert np.median(outs) < np.mean(outs), "log-normal lengths: a long tail to the right"
    assert trace == sharegpt_like(
        3000, rate=5.0, vocab_size=64, system_prompt=8, max_prompt=40, seed=1
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(rate=0.0), "rate"), (dict(system_prompt=128), "system_prompt"), (dict(n=0), "n")],
)
def test_a_bad_trace_is_refused(kwargs, match):
    args = dict(n=4, rate=1.0, vocab_size=64) | kwargs
    with pytest.raises(KVLibValueError, match=match):
        sharegpt_like(**args)


def test_percentile_interpolates_like_numpy():
    xs = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6]
    for q in (0, 10, 50, 99, 100):
        assert percentile(xs, q) == pytest.approx(np.percentile(xs, q))


def test_summarize_reads_ttft_tpot_and_throughput():
    records = [
        dict(arrival=0.0, token_times=[1.0, 2.0, 3.0]),  # TTFT 1, TPOT 1
        dict(arrival=1.0, token_times=[4.0, 7.0]),  # TTFT 3, TPOT 3
    ]
    m = summarize(records)
    assert m["output_tokens"] == 5 and m["throughput"] == pytest.approx(5 / 7)
    assert m["ttft_p50"] == pytest.approx(2.0) and m["tpot_p99"] == pytest.approx(2.98)


def test_kv_over_time_weights_by_duration():
    got = kv_over_time([(0.0, 10), (1.0, 30), (4.0, 0)])
    assert got["kv_peak"] == 30 and got["kv_mean"] == pytest.approx((10 * 1 + 30 * 3) / 4)
    assert got["kv_series"] == [(0.0, 10), (1.0, 30), (4.0, 0)]
    long = kv_over_time([(float(t), t % 7) for t in range(1000)], points=50)["kv_series"]
    assert len(long) <= 50 and long[0] == (0.0, 0) and long[1][0] == 20.0


def test_the_report_lists_every_row_and_target():
    from kvlib.bench.engine import format_report
    from kvlib.bench.report import target

    row = dict(model="book", rate=4.0, throughput=100.0, ttft_p50=0.5, ttft_p99=1.0)
    row |= dict(tpot_p50=0.01, tpot_p99=0.02, kv_peak=896, kv_mean=500.0)
    rows = [row | dict(contender=c) for c in ("static", "paged")]
    result = dict(budget_tokens=896, rows=rows, targets=[target("book", "x", 2.5, ">=", 2.0)])
    text = format_report(result)
    assert "static" in text and "paged" in text and "PASS book: x = 2.50" in text


def test_both_replays_serve_every_request_its_tokens():
    model = model_for(CONFIGS["GQA"])
    trace = sharegpt_like(
        10,
        rate=1e4,
        vocab_size=64,
        mean_prompt=6,
        mean_output=5,
        max_prompt=20,
        max_output=12,
        seed=2,
    )
    clock = VirtualClock()
    engine = Engine(model, num_blocks=16, block_size=4, clock=clock)
    served = serve_trace(engine, trace, clock)
    clock = VirtualClock()
    static, memory = serve_static(model, trace, 3, clock)
    for records in (served, static):
        assert sorted(len(r["token_times"]) for r in records) == sorted(
            r.max_new_tokens for r in trace
        )
        for r in records:
            assert (
                r["token_times"] == sorted(r["token_times"]) and r["token_times"][0] > r["arrival"]
            )
    assert [m for _, m in memory][1::2] == [0] * 4, "each of the 4 static batches frees its slab"
    engine.check_drained()


def test_the_virtual_clock_runs_only_during_work_and_jumps_over_idle_time():
    clock = VirtualClock()
    assert clock() == 0.0 and clock() == 0.0, "a stopped clock stands still"
    clock.jump(5.0)
    clock.jump(2.0)
    assert clock() == 5.0, "jumps never go back"
    clock.start()
    sum(range(100_000))  # some work
    inside = clock()
    clock.stop()
    assert 5.0 < inside <= clock(), "inside the work it reads the moment; stop keeps it"
