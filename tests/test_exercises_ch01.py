import pytest
import torch

from kvlib import KVCache
from kvlib.config import tiny
from kvlib.exercises.ch01 import check_bytes_per_token, check_concat_copies, check_rollback
from kvlib.memory import MODELS


def test_bytes_per_token_accepts_right_and_rejects_wrong(capsys):
    cfg = MODELS["Llama-3-8B"]
    right = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 2
    check_bytes_per_token(right, "Llama-3-8B", torch.bfloat16)
    assert capsys.readouterr().out.startswith("Correct")
    with pytest.raises(AssertionError, match="K and V are both cached"):
        check_bytes_per_token(right // 2, "Llama-3-8B", torch.bfloat16)
    with pytest.raises(AssertionError, match="GQA"):
        check_bytes_per_token(right * cfg.group_size, "Llama-3-8B", torch.bfloat16)
    with pytest.raises(AssertionError, match="not right"):
        check_bytes_per_token(right + 1, "Llama-3-8B", torch.bfloat16)
    with pytest.raises(AssertionError, match="int"):
        check_bytes_per_token(float(right), "Llama-3-8B", torch.bfloat16)


def test_concat_copies():
    check_concat_copies(3 * 4 * 5 // 2, n_steps=4, elements_per_token=3)
    with pytest.raises(AssertionError, match="preallocated"):
        check_concat_copies(4 * 3, n_steps=4, elements_per_token=3)
    with pytest.raises(AssertionError, match="not right"):
        check_concat_copies(4 * 4 * 3, n_steps=4, elements_per_token=3)


def _spec_and_reference():
    cfg = tiny()
    spec = KVCache.from_config(cfg, dtype=torch.float32)
    ref = KVCache.from_config(cfg, dtype=torch.float32)
    kv = torch.randn(1, cfg.n_kv_heads, 16, cfg.head_dim)
    for layer in range(cfg.n_layers):
        spec.update(layer, kv, kv)
        ref.update(layer, kv[:, :, :14], kv[:, :, :14])
    return spec, ref


def test_rollback():
    spec, ref = _spec_and_reference()
    with pytest.raises(AssertionError, match="should hold 14"):
        check_rollback(spec, 14, ref)
    spec.crop(14)
    check_rollback(spec, 14, ref)
    spec.crop(0)
    for layer in range(spec.n_layers):  # refilled with other data: caught
        spec.update(layer, *(torch.zeros(1, spec.n_kv_heads, 14, spec.head_dim),) * 2)
    with pytest.raises(AssertionError, match="kept tokens changed"):
        check_rollback(spec, 14, ref)
