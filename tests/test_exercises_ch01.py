import pytest
import torch

from kvlib import KVCache
from kvlib.config import tiny
from kvlib.exercises.ch01 import check_bytes_per_token, check_concat_copies, check_rollback
from kvlib.memory import MODELS
from tests.answers import assert_hints_hide, assert_not_revealed, failures


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
    with pytest.raises(AssertionError, match="16 tokens, too many"):
        check_rollback(spec, 14, ref)
    spec.crop(14)
    check_rollback(spec, 14, ref)
    spec.crop(0)
    for layer in range(spec.n_layers):  # refilled with other data: caught
        spec.update(layer, *(torch.zeros(1, spec.n_kv_heads, 14, spec.head_dim),) * 2)
    with pytest.raises(AssertionError, match="kept tokens changed"):
        check_rollback(spec, 14, ref)


# ---- the checks never print the expected answer ------------------------------------------------
def test_bytes_per_token_hides_the_answer(capsys):
    cfg = MODELS["Llama-3-8B"]
    right = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 2
    check_bytes_per_token(right, "Llama-3-8B", torch.bfloat16)
    assert_not_revealed(capsys.readouterr().out, right)
    hints = failures(
        *(
            lambda wrong=wrong: check_bytes_per_token(wrong, "Llama-3-8B", torch.bfloat16)
            for wrong in (right // 2, right * cfg.group_size, right + 1, float(right))
        )
    )
    assert "half the right one" in hints[0]
    assert f"{cfg.group_size}x too large" in hints[1]
    assert_hints_hide(hints, right)


def test_concat_copies_hides_the_answer(capsys):
    n, e = 1000, 1024
    right = e * n * (n + 1) // 2
    check_concat_copies(right, n_steps=n, elements_per_token=e)
    assert_not_revealed(capsys.readouterr().out, right)
    hints = failures(
        lambda: check_concat_copies(n * e, n_steps=n, elements_per_token=e),
        lambda: check_concat_copies(right - e, n_steps=n, elements_per_token=e),
    )
    assert_hints_hide(hints, right)


def test_rollback_hides_the_answer(capsys):
    spec, ref = _spec_and_reference()
    too_long = failures(lambda: check_rollback(spec, 14, ref))
    spec.crop(14)
    check_rollback(spec, 14, ref)
    assert_not_revealed(capsys.readouterr().out, 14)
    spec.crop(12)
    too_short = failures(lambda: check_rollback(spec, 14, ref))
    assert "too few" in too_short[0]
    assert_hints_hide(too_long + too_short, 14)
