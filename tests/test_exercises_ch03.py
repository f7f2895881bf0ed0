"""Chapter 3 nucleus exercise check: accepts the right size, rejects wrong ones with a hint.

(The other chapter 3 checks are tested in tests/test_generate.py.)"""

from __future__ import annotations

import pytest
import torch

from kvlib import load_pretrained
from kvlib.exercises.ch03 import check_nucleus_size


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
