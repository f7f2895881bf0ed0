import pytest
import torch

from kvlib.chunked import online_softmax_attention
from kvlib.config import tiny
from kvlib.exercises.ch07 import check_largest_allocation, check_merge
from tests.answers import assert_hints_hide, assert_not_revealed, failures


def _halves():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 3, 8, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, 10, 8, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, 10, 8, generator=g, dtype=torch.float64)
    a, lse_a = online_softmax_attention(q, k[:, :, :5], v[:, :, :5], return_lse=True)
    b, lse_b = online_softmax_attention(q, k[:, :, 5:], v[:, :, 5:], return_lse=True)
    return q, k, v, a, lse_a, b, lse_b


def test_merge_accepts_right_and_rejects_wrong(capsys):
    q, k, v, a, lse_a, b, lse_b = _halves()
    lse = torch.logaddexp(lse_a, lse_b)  # (B, H, T)
    out = a * (lse_a - lse).exp()[..., None] + b * (lse_b - lse).exp()[..., None]
    check_merge(q, k, v, out, lse)
    assert capsys.readouterr().out.startswith("Correct")
    with pytest.raises(AssertionError, match="plain average"):
        check_merge(q, k, v, (a + b) / 2, lse)
    with pytest.raises(AssertionError, match="lse is off"):
        check_merge(q, k, v, out, torch.maximum(lse_a, lse_b))
    with pytest.raises(AssertionError, match="differs from attention"):
        check_merge(q, k, v, out + 1e-3, lse)
    with pytest.raises(AssertionError, match="shape"):
        check_merge(q, k, v, out[:, :2], lse)


def test_largest_allocation_accepts_right_and_rejects_wrong(capsys):
    config = tiny(max_seq_len=128)
    H, T = config.n_heads, 96
    right = H * 40 * 80 * 4  # chunks of 40, 40, 16: the second has 40 queries x 80 keys
    check_largest_allocation(right, config, T, 40)
    assert capsys.readouterr().out.startswith("Correct")
    with pytest.raises(AssertionError, match="full prefill"):
        check_largest_allocation(H * T * T * 4, config, T, 40)
    with pytest.raises(AssertionError, match="it is short here"):
        check_largest_allocation(H * 16 * T * 4, config, T, 40)
    with pytest.raises(AssertionError, match="not what was measured"):
        check_largest_allocation(right + 4, config, T, 40)
    with pytest.raises(AssertionError, match="int"):
        check_largest_allocation(float(right), config, T, 40)


# ---- the checks never print the expected answer ------------------------------------------------
def test_merge_hides_the_answer(capsys):
    q, k, v, a, lse_a, b, lse_b = _halves()
    lse = torch.logaddexp(lse_a, lse_b)  # (B, H, T)
    out = a * (lse_a - lse).exp()[..., None] + b * (lse_b - lse).exp()[..., None]
    want_out, want_lse = online_softmax_attention(q, k, v, return_lse=True)
    values = [want_out, want_lse, want_out[0, 0, 0, 0].item(), want_lse[0, 0, 0].item()]
    check_merge(q, k, v, out, lse)
    assert_not_revealed(capsys.readouterr().out, *values)
    hints = failures(
        lambda: check_merge(q, k, v, (a + b) / 2, lse),
        lambda: check_merge(q, k, v, out, torch.maximum(lse_a, lse_b)),
        lambda: check_merge(q, k, v, out + 1e-3, lse),
        lambda: check_merge(q, k, v, out[:, :2], lse),
    )
    assert_hints_hide(hints, *values)


def test_largest_allocation_hides_the_answer(capsys):
    config = tiny(max_seq_len=128)
    H, T = config.n_heads, 96
    right = H * 40 * 80 * 4  # the second chunk: 40 queries x 80 keys
    check_largest_allocation(right, config, T, 40)
    assert_not_revealed(capsys.readouterr().out, right)
    hints = failures(
        *(
            lambda w=w: check_largest_allocation(w, config, T, 40)
            for w in (H * T * T * 4, H * 16 * T * 4, right + 4)
        )
    )
    assert_hints_hide(hints, right)
