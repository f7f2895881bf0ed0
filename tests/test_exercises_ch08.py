import pytest
import torch

from kvlib.attention import causal_mask, sliding_window_mask
from kvlib.config import tiny
from kvlib.exercises.ch08 import check_fit, check_kept, check_sink_mask
from kvlib.quant import QuantizedKVCache
from tests.answers import assert_hints_hide, assert_not_revealed, failures


def test_kept_accepts_right_and_rejects_wrong(capsys):
    N, W, n_sink = 100, 32, 4
    right = list(range(n_sink)) + list(range(N - (W - n_sink), N))
    check_kept(right, N, W, n_sink)
    assert capsys.readouterr().out.startswith("Correct")
    with pytest.raises(AssertionError, match="list of ints"):
        check_kept(torch.tensor(right), N, W, n_sink)
    with pytest.raises(AssertionError, match="exactly budget = 32"):
        check_kept(list(range(N - W, N + 1)), N, W, n_sink)
    with pytest.raises(AssertionError, match="sink tokens"):
        check_kept(list(range(N - W, N)), N, W, n_sink)  # a plain sliding window
    with pytest.raises(AssertionError, match="most recent tokens"):
        check_kept(list(range(n_sink)) + list(range(N - (W - n_sink) + 1, N + 1)), N, W, n_sink)
    with pytest.raises(AssertionError, match="stream order"):
        check_kept(right[::-1], N, W, n_sink)


def test_sink_mask_accepts_right_and_rejects_wrong(capsys):
    N, W, n_sink = 24, 8, 2
    sinks = causal_mask(N, N) & (torch.arange(N) < n_sink)
    right = sliding_window_mask(N, N, W - n_sink) | sinks
    check_sink_mask(right, N, W, n_sink)
    assert capsys.readouterr().out.startswith("Correct")
    with pytest.raises(AssertionError, match="bool"):
        check_sink_mask(right.float(), N, W, n_sink)
    with pytest.raises(AssertionError, match="shape"):
        check_sink_mask(right[:-1], N, W, n_sink)
    with pytest.raises(AssertionError, match="causal"):
        check_sink_mask(
            sliding_window_mask(N, N, W - n_sink) | (torch.arange(N) < n_sink), N, W, n_sink
        )
    with pytest.raises(AssertionError, match="sink tokens"):
        check_sink_mask(sliding_window_mask(N, N, W), N, W, n_sink)
    with pytest.raises(AssertionError, match="rows"):
        check_sink_mask(sliding_window_mask(N, N, W) | sinks, N, W, n_sink)  # window too wide


def test_fit_accepts_right_and_rejects_wrong(capsys):
    config = tiny(max_seq_len=64)
    budget = 2**20
    cache = QuantizedKVCache.from_config(config, 1, 64, "int4 per-token")
    for layer in range(config.n_layers):
        kv = torch.randn(1, config.n_kv_heads, 64, config.head_dim)
        cache.update(layer, kv, kv)
    right = budget // cache.nbytes_used
    check_fit(right, config, "int4 per-token", 64, budget)
    assert capsys.readouterr().out.startswith("Correct")
    fp32 = budget // (64 * config.kv_bytes_per_token(torch.float32))
    with pytest.raises(AssertionError, match="fp32 count"):
        check_fit(fp32, config, "int4 per-token", 64, budget)
    with pytest.raises(AssertionError, match="scale and zero point"):
        check_fit(
            budget // (64 * config.kv_elements_per_token // 2), config, "int4 per-token", 64, budget
        )
    with pytest.raises(AssertionError, match="divide the budget"):
        check_fit(right + 1, config, "int4 per-token", 64, budget)
    with pytest.raises(AssertionError, match="int number"):
        check_fit(float(right), config, "int4 per-token", 64, budget)


# ---- the checks never print the expected answer ------------------------------------------------
def test_kept_hides_the_answer(capsys):
    N, W, n_sink = 100, 32, 4
    right = list(range(n_sink)) + list(range(N - (W - n_sink), N))
    check_kept(right, N, W, n_sink)
    assert_not_revealed(capsys.readouterr().out, right)
    hints = failures(
        lambda: check_kept(list(range(N - W, N)), N, W, n_sink),
        lambda: check_kept(
            list(range(n_sink)) + list(range(N - W + n_sink + 1, N + 1)), N, W, n_sink
        ),
        lambda: check_kept(right[::-1], N, W, n_sink),
    )
    assert_hints_hide(hints, right)


def test_sink_mask_hides_the_answer(capsys):
    N, W, n_sink = 24, 8, 2
    sinks = causal_mask(N, N) & (torch.arange(N) < n_sink)
    right = sliding_window_mask(N, N, W - n_sink) | sinks
    values = [right, right[-1], right[-1].nonzero().flatten()]  # the mask, its last row's keys
    check_sink_mask(right, N, W, n_sink)
    assert_not_revealed(capsys.readouterr().out, *values)
    hints = failures(
        lambda: check_sink_mask(sliding_window_mask(N, N, W), N, W, n_sink),
        lambda: check_sink_mask(sliding_window_mask(N, N, W) | sinks, N, W, n_sink),
    )
    assert_hints_hide(hints, *values)


def test_fit_hides_the_answer(capsys):
    config, budget, scheme = tiny(max_seq_len=64), 2**20, "int4 per-token"
    cache = QuantizedKVCache.from_config(config, 1, 64, scheme)
    for layer in range(config.n_layers):
        kv = torch.randn(1, config.n_kv_heads, 64, config.head_dim)
        cache.update(layer, kv, kv)
    per_seq = cache.nbytes_used  # the answer is budget // per_seq: it must not show either
    right = budget // per_seq
    fp32 = budget // (64 * config.kv_bytes_per_token(torch.float32))
    check_fit(right, config, scheme, 64, budget)
    assert_not_revealed(capsys.readouterr().out, right, per_seq, right / fp32)
    hints = failures(
        *(
            lambda w=w: check_fit(w, config, scheme, 64, budget)
            for w in (fp32, budget // (64 * config.kv_elements_per_token // 2), right + 1)
        )
    )
    assert_hints_hide(hints, right, per_seq)
