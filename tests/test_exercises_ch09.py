"""Chapter 9 checks accept the right answer and reject wrong ones with a useful hint."""

from __future__ import annotations

import pytest
import torch

from kvlib.exercises.ch09 import check_max_batch, check_mla, check_tp_bytes
from kvlib.memory import (
    GB,
    GiB,
    get_model,
    kv_bytes_per_token,
    kv_cache_bytes,
    max_batch,
    weight_bytes,
)
from tests.answers import assert_hints_hide, assert_not_revealed, failures


def test_max_batch_by_hand(capsys):
    free = 80 * GiB - weight_bytes("Llama-3-8B", torch.float16) - int(0.1 * 80 * GiB)
    n_seqs = free // (8192 * kv_bytes_per_token("Llama-3-8B", torch.float16))
    check_max_batch(n_seqs)
    assert capsys.readouterr().out.startswith("Correct")
    with pytest.raises(AssertionError, match="ignores the reserve"):
        check_max_batch((80 * GiB - weight_bytes("Llama-3-8B")) // (8192 * 131072))
    with pytest.raises(AssertionError, match="one too many"):
        check_max_batch(n_seqs + 1)
    with pytest.raises(AssertionError, match="whole number"):
        check_max_batch(float(n_seqs))


def test_tp_bytes(capsys):
    config = get_model("Llama-3-70B")
    per_gpu = 32768 * 2 * config.n_layers * 1 * config.head_dim * 2
    check_tp_bytes(per_gpu)
    assert capsys.readouterr().out.startswith("Correct")
    total = kv_cache_bytes("Llama-3-70B", 32768, 1, torch.bfloat16)
    with pytest.raises(AssertionError, match="only 8 kv heads"):
        check_tp_bytes(total // 16)
    with pytest.raises(AssertionError, match="whole cache"):
        check_tp_bytes(total)


def test_mla(capsys):
    config = get_model("DeepSeek-V2")
    mla = config.n_layers * (512 + 64) * 2
    mha = 2 * config.n_layers * config.n_kv_heads * config.head_dim * 2
    check_mla(mla, mha / mla)
    assert capsys.readouterr().out.startswith("Correct")
    with pytest.raises(AssertionError, match="that is the MHA cache"):
        check_mla(mha, 1.0)
    with pytest.raises(AssertionError, match="the ratio should be"):
        check_mla(mla, mla / mha)
    with pytest.raises(AssertionError, match="not quite"):
        check_mla(mla // 2, mha / mla)


# ---- the checks never print the expected answer ------------------------------------------------
def test_max_batch_hides_the_answer(capsys):
    right = max_batch("Llama-3-8B", "A100-80", 8192, torch.float16, reserved_fraction=0.1)
    check_max_batch(right)
    assert_not_revealed(capsys.readouterr().out, right)
    no_reserve = max_batch("Llama-3-8B", "A100-80", 8192, torch.float16)
    hints = failures(*(lambda w=w: check_max_batch(w) for w in (no_reserve, right + 1, 3)))
    assert_hints_hide(hints, right)


def test_tp_bytes_hides_the_answer(capsys):
    config = get_model("Llama-3-70B")
    right = 32768 * 2 * config.n_layers * 1 * config.head_dim * 2
    check_tp_bytes(right)
    assert_not_revealed(capsys.readouterr().out, right, right / GB, right / GiB)
    total = kv_cache_bytes("Llama-3-70B", 32768, 1, torch.bfloat16)
    hints = failures(*(lambda w=w: check_tp_bytes(w) for w in (total // 16, total, 12345)))
    assert_hints_hide(hints, right, right / GB, right / GiB)


def test_mla_hides_the_answer(capsys):
    config = get_model("DeepSeek-V2")
    mla = config.n_layers * (512 + 64) * 2
    mha = 2 * config.n_layers * config.n_kv_heads * config.head_dim * 2
    check_mla(mla, mha / mla)
    assert_not_revealed(capsys.readouterr().out, mla, mha / mla)
    hints = failures(
        lambda: check_mla(mha, 1.0),
        lambda: check_mla(mla, mla / mha),
        lambda: check_mla(mla // 2, mha / mla),
    )
    assert_hints_hide(hints, mla, mha / mla)
