"""Chapter 9 checks accept the right answer and reject wrong ones with a useful hint."""

from __future__ import annotations

import pytest
import torch

from kvlib.exercises.ch09 import check_max_batch, check_mla, check_tp_bytes
from kvlib.memory import (
    GiB,
    get_model,
    kv_bytes_per_token,
    kv_cache_bytes,
    weight_bytes,
)


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
