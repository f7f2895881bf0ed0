"""Chapter 2 exercise checks: each accepts a right answer and rejects wrong ones with a hint."""

from __future__ import annotations

import pytest
import torch

from kvlib.attention import attention, causal_mask
from kvlib.exercises.ch02 import (
    MASK_SIZES,
    check_causal_mask,
    check_decode_step,
    check_padded_causal_mask,
)
from tests.answers import assert_hints_hide, assert_not_revealed, failures


# ---- check_causal_mask -----------------------------------------------------------------------
def bottom_right(T: int, S: int) -> torch.Tensor:
    return torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)  # (T, S)


def test_causal_mask_accepts_bottom_right(capsys):
    check_causal_mask(bottom_right)
    assert capsys.readouterr().out.startswith("Correct")


@pytest.mark.parametrize(
    "wrong,match",
    [
        (lambda T, S: torch.ones(T, S, dtype=torch.bool).tril(), "top-left aligned"),
        (lambda T, S: bottom_right(T, S).float(), "dtype torch.float32"),
        (lambda T, S: bottom_right(T, S)[:, 1:], "has shape"),
        (lambda T, S: bottom_right(T, S).numpy(), "returned ndarray"),
        (lambda T, S: torch.ones(T, S, dtype=torch.bool).tril(S - T - 1), "is wrong at"),
        (torch.ones(2, 2, dtype=torch.bool), "pass your function itself"),
    ],
)
def test_causal_mask_rejects(wrong, match):
    with pytest.raises(AssertionError, match=match):
        check_causal_mask(wrong)


# ---- check_padded_causal_mask -----------------------------------------------------------------
N_PAD = torch.tensor([2, 0, 5])


def padded_causal(n_pad, T, S):
    valid = torch.arange(S)[None, :] >= n_pad[:, None]  # (B, S)
    causal = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)  # (T, S)
    return causal[None, None] & valid[:, None, None, :]  # (B, 1, T, S)


def test_padded_causal_mask_accepts(capsys):
    check_padded_causal_mask(padded_causal(N_PAD, 6, 6), N_PAD, 6, 6)
    check_padded_causal_mask(padded_causal(N_PAD, 2, 6), N_PAD, 2, 6)  # decode-like, T < S
    assert capsys.readouterr().out.count("Correct") == 2


@pytest.mark.parametrize(
    "wrong,match",
    [
        (padded_causal(torch.zeros(3, dtype=torch.long), 6, 6), "padding slots are still visible"),
        ((torch.arange(6) >= N_PAD[:, None])[:, None, None, :], "future keys"),  # (B, 1, 1, S)
        (padded_causal(N_PAD, 6, 6).transpose(-1, -2), "mask differs"),
        (padded_causal(N_PAD, 6, 6).long(), "dtype torch.int64"),
        (padded_causal(N_PAD, 6, 6)[:2], "does not broadcast"),
        (padded_causal(N_PAD, 6, 6).numpy(), "torch.Tensor"),
    ],
)
def test_padded_causal_mask_rejects(wrong, match):
    with pytest.raises(AssertionError, match=match):
        check_padded_causal_mask(wrong, N_PAD, 6, 6)


# ---- check_decode_step -----------------------------------------------------------------------
def decode_inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 8, 1, 16, generator=g, dtype=dtype)  # (B, H, 1, D)
    k = torch.randn(1, 2, 10, 16, generator=g, dtype=dtype)  # (B, K, S, D)
    v = torch.randn(1, 2, 10, 16, generator=g, dtype=dtype)
    return q, k, v


def by_hand(q, k, v, kv_index, scale):
    """Per query head h: softmax(q_h k_j^T * scale) v_j with j = kv_index(h)."""
    outs = []
    for h in range(q.shape[1]):
        j = kv_index(h)
        w = torch.softmax((q[:, h] @ k[:, j].transpose(-1, -2)) * scale, dim=-1)  # (B, 1, S)
        outs.append(w @ v[:, j])  # (B, 1, D)
    return torch.stack(outs, dim=1)  # (B, H, 1, D)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_decode_step_accepts_right_answer(capsys, dtype):
    q, k, v = decode_inputs(dtype)
    check_decode_step(by_hand(q, k, v, lambda h: h // 4, 16**-0.5), q, k, v)
    assert capsys.readouterr().out.startswith("Correct")


def test_decode_step_rejects_wrong_answers():
    q, k, v = decode_inputs()
    right = by_hand(q, k, v, lambda h: h // 4, 16**-0.5)
    with pytest.raises(AssertionError, match=r"h // G"):
        check_decode_step(by_hand(q, k, v, lambda h: h % 2, 16**-0.5), q, k, v)
    with pytest.raises(AssertionError, match="1 / sqrt"):
        check_decode_step(by_hand(q, k, v, lambda h: h // 4, 1.0), q, k, v)
    with pytest.raises(AssertionError, match="has shape"):
        check_decode_step(right[:, :4], q, k, v)
    with pytest.raises(AssertionError, match="torch.Tensor"):
        check_decode_step(right.numpy(), q, k, v)
    with pytest.raises(AssertionError, match="out differs"):
        check_decode_step(right + 1e-3, q, k, v)


# ---- the checks never print the expected answer ------------------------------------------------
def test_causal_mask_hides_the_answer(capsys):
    masks = [causal_mask(T, S) for T, S in MASK_SIZES if T]
    check_causal_mask(bottom_right)
    assert_not_revealed(capsys.readouterr().out, *masks)
    hints = failures(
        lambda: check_causal_mask(lambda T, S: torch.ones(T, S, dtype=torch.bool).tril()),
        lambda: check_causal_mask(lambda T, S: torch.ones(T, S, dtype=torch.bool).tril(S - T - 1)),
        lambda: check_causal_mask(lambda T, S: bottom_right(T, S)[:, 1:]),
    )
    assert_hints_hide(hints, *masks)


def test_padded_causal_mask_hides_the_answer(capsys):
    right = padded_causal(N_PAD, 6, 6)
    check_padded_causal_mask(right, N_PAD, 6, 6)
    assert_not_revealed(capsys.readouterr().out, right, right[0, 0])
    hints = failures(
        lambda: check_padded_causal_mask(padded_causal(N_PAD * 0, 6, 6), N_PAD, 6, 6),
        lambda: check_padded_causal_mask(right.transpose(-1, -2), N_PAD, 6, 6),
    )
    assert_hints_hide(hints, right, right[0, 0])


def test_decode_step_hides_the_answer(capsys):
    q, k, v = decode_inputs()
    right = attention(q, k, v)  # (B, H, 1, D)
    check_decode_step(right, q, k, v)
    values = [right, right[0, 0, 0], right[0, 0, 0, 0].item()]
    assert_not_revealed(capsys.readouterr().out, *values)
    hints = failures(
        lambda: check_decode_step(by_hand(q, k, v, lambda h: h % 2, 16**-0.5), q, k, v),
        lambda: check_decode_step(right + 1e-3, q, k, v),
    )
    assert_hints_hide(hints, *values)
