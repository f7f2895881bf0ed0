import pytest
import torch

from kvlib.exercises.ch06 import (
    check_int4_bytes_per_token,
    check_kivi_full_precision,
    check_max_error,
)
from kvlib.memory import MODELS
from tests.answers import assert_hints_hide, assert_not_revealed, failures


def test_int4_bytes_per_token(capsys):
    cfg = MODELS["Llama-2-7B"]
    n = cfg.kv_elements_per_token
    right = n // 2 + n // 32 * 8
    check_int4_bytes_per_token(right)
    assert capsys.readouterr().out.startswith("Correct")
    with pytest.raises(AssertionError, match="only the 4-bit codes"):
        check_int4_bytes_per_token(n // 2)
    with pytest.raises(AssertionError, match="zero point"):
        check_int4_bytes_per_token(n // 2 + n // 32 * 4)
    with pytest.raises(AssertionError, match="not right"):
        check_int4_bytes_per_token(right + 1)
    with pytest.raises(AssertionError, match="int"):
        check_int4_bytes_per_token(float(right))


def test_max_error(capsys):
    x = torch.tensor([[0.5, -2.0, 1.0, 0.0], [3.5, 0.1, -0.2, 0.3]])
    right = 3.5 / 7 / 2
    check_max_error(right, x)
    assert capsys.readouterr().out.startswith("Correct")
    with pytest.raises(AssertionError, match="whole step"):
        check_max_error(2 * right, x)
    with pytest.raises(AssertionError, match="not right"):
        check_max_error(2.0 / 7 / 2, x)
    with pytest.raises(AssertionError, match="number"):
        check_max_error("0.25", x)


def test_kivi_full_precision(capsys):
    check_kivi_full_precision((100 % 32, 32))
    assert capsys.readouterr().out.startswith("Correct")
    check_kivi_full_precision((10, 10), S=10, R=16)
    with pytest.raises(AssertionError, match="block of R fills"):
        check_kivi_full_precision((32, 32))
    with pytest.raises(AssertionError, match="values slide"):
        check_kivi_full_precision((4, 4))
    with pytest.raises(AssertionError, match="not right"):
        check_kivi_full_precision((0, 0))
    with pytest.raises(AssertionError, match="tuple"):
        check_kivi_full_precision(36)


# ---- the checks never print the expected answer ------------------------------------------------
def test_int4_bytes_per_token_hides_the_answer(capsys):
    cfg = MODELS["Llama-2-7B"]
    n = cfg.kv_elements_per_token
    right = n // 2 + n // 32 * 8
    fp16 = cfg.kv_bytes_per_token(torch.float16)
    check_int4_bytes_per_token(right)
    # The ratio to fp16 gives the answer as well, once fp16's bytes are known.
    assert_not_revealed(capsys.readouterr().out, right, fp16 / right)
    hints = failures(
        *(
            lambda w=w: check_int4_bytes_per_token(w)
            for w in (n // 2, n // 2 + n // 32 * 4, right + 1, float(right))
        )
    )
    assert_hints_hide(hints, right, fp16 / right)


def test_max_error_hides_the_answer(capsys):
    x = torch.tensor([[0.5, -2.0, 1.0, 0.0], [3.5, 0.1, -0.2, 0.3]])
    right = 3.5 / 7 / 2
    check_max_error(right, x)
    assert_not_revealed(capsys.readouterr().out, right)
    hints = failures(
        lambda: check_max_error(2 * right, x),
        lambda: check_max_error(2.0 / 7 / 2, x),
        lambda: check_max_error("0.25", x),
    )
    assert_hints_hide(hints, right)


def test_kivi_full_precision_hides_the_answer(capsys):
    right = (100 % 32, 32)
    check_kivi_full_precision(right, S=100, R=32)
    assert_not_revealed(capsys.readouterr().out, right, *right)
    hints = failures(
        *(lambda w=w: check_kivi_full_precision(w) for w in ((32, 32), (0, 0), (5, 31), 36))
    )
    assert_hints_hide(hints, right, *right)
