"""Chapter 3 exercise checks: the nucleus check accepts the right size and rejects wrong ones
with a hint; no check prints the expected answer.

(The cached-floats and greedy-loop checks' verdicts are tested in tests/test_generate.py.)"""

from __future__ import annotations

import pytest
import torch

from kvlib import load_pretrained
from kvlib.config import tiny
from kvlib.exercises.ch03 import check_cached_floats, check_greedy_loop, check_nucleus_size
from kvlib.generate import generate
from kvlib.transformer import Transformer
from tests.answers import assert_hints_hide, assert_not_revealed, failures


def _nucleus_by_hand(prompt: str, top_p: float) -> int:
    model, tok = load_pretrained()
    with torch.inference_mode():
        logits = model(torch.tensor([tok.encode(prompt)]))[0, -1]  # (V,)
    probs = torch.softmax(logits.double(), dim=-1).sort(descending=True).values  # (V,)
    before = probs.cumsum(0) - probs  # mass of the strictly more likely tokens
    return int((before < top_p).sum())


@pytest.mark.parametrize(("prompt", "top_p"), [("Life is", 0.9), ("Never trust", 0.5)])
def test_nucleus_size_accepts_the_right_count(prompt, top_p, capsys):
    check_nucleus_size(_nucleus_by_hand(prompt, top_p), prompt=prompt, top_p=top_p)
    assert capsys.readouterr().out.startswith("Correct")


def test_nucleus_size_rejects_wrong_counts():
    right = _nucleus_by_hand("Life is", 0.9)
    with pytest.raises(AssertionError, match="one short"):
        check_nucleus_size(right - 1)
    with pytest.raises(AssertionError, match="not right"):
        check_nucleus_size(right + 3)
    with pytest.raises(AssertionError, match="at least the most likely"):
        check_nucleus_size(0)
    with pytest.raises(AssertionError, match="should be an int"):
        check_nucleus_size(float(right))


# ---- the checks never print the expected answer ------------------------------------------------
def test_cached_floats_hides_the_answer(capsys):
    c = tiny()
    right = 4 * 100 * 2 * c.n_layers * c.n_kv_heads * c.head_dim
    check_cached_floats(right, c, batch=4, tokens=100)
    assert_not_revealed(capsys.readouterr().out, right)
    hints = failures(
        *(
            lambda wrong=wrong: check_cached_floats(wrong, c, batch=4, tokens=100)
            for wrong in (right // 2, right * c.group_size, right + 1)
        )
    )
    assert "half the right one" in hints[0]
    assert_hints_hide(hints, right)


def test_greedy_loop_hides_the_answer(capsys):
    torch.manual_seed(123)  # the check's own model and prompt, to know its expected tokens
    model = Transformer(tiny(), init_std=0.2).eval()
    prompt = torch.randint(0, model.config.vocab_size, (2, 5))
    want = generate(model, prompt, 12)
    new = want[:, 5:]
    check_greedy_loop(lambda model, x, n: generate(model, x, n))  # the reference itself
    assert_not_revealed(capsys.readouterr().out, want, new, new[0], new[1])
    hints = failures(
        lambda: check_greedy_loop(lambda model, x, n: torch.cat([x, x[:, :1].repeat(1, n)], 1)),
        lambda: check_greedy_loop(lambda model, x, n: x),
    )
    assert_hints_hide(hints, want, new, new[0], new[1])


def test_nucleus_size_hides_the_answer(capsys):
    right = _nucleus_by_hand("Life is", 0.9)
    check_nucleus_size(right, prompt="Life is", top_p=0.9)
    assert_not_revealed(capsys.readouterr().out, right)
    hints = failures(
        lambda: check_nucleus_size(right - 1),
        lambda: check_nucleus_size(right + 3),
        lambda: check_nucleus_size(0),
    )
    assert_hints_hide(hints, right)
