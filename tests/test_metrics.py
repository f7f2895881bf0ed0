"""Quality measures against by-hand NumPy versions, and their errors."""

import math

import numpy as np
import pytest
import torch

from kvlib.metrics import agreement, perplexity, relative_error


def test_perplexity_matches_a_float64_log_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g) * 3
    targets = torch.randint(0, 7, (2, 5), generator=g)
    x = logits.double().numpy()
    m = x.max(-1, keepdims=True)
    log_probs = x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))  # (B, N, V)
    nll = -np.take_along_axis(log_probs, targets.numpy()[..., None], -1).mean()
    assert math.isclose(perplexity(logits, targets), math.exp(nll), rel_tol=1e-5)


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    ppl = perplexity(torch.zeros(3, 4, 11), torch.zeros(3, 4, dtype=torch.long))
    assert math.isclose(ppl, 11, rel_tol=1e-6), ppl  # fp32 log(11)


def test_agreement_counts_matching_argmax_positions():
    ref = torch.zeros(1, 4, 3)
    ref[0, :, 0] = 1.0  # argmax 0 everywhere
    other = ref.clone()
    other[0, 1, 2] = 5.0  # one position now picks token 2
    assert agreement(ref, ref) == 1.0
    assert agreement(other, ref) == 0.75


def test_relative_error():
    ref = torch.tensor([3.0, 4.0])
    assert relative_error(ref, ref) == 0.0
    assert math.isclose(relative_error(torch.tensor([3.0, 5.0]), ref), 1 / 5, rel_tol=1e-6)
    assert math.isclose(relative_error(ref.half(), ref), 0.0)  # upcast to fp32


def test_misuse():
    with pytest.raises(ValueError, match=r"logits must be a floating \(B, N, V\) tensor"):
        perplexity(torch.zeros(4, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="logits is empty"):
        perplexity(torch.zeros(0, 5, 3), torch.zeros(0, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="targets must be a tensor of token ids"):
        perplexity(torch.zeros(1, 2, 3), torch.zeros(1, 2))
    with pytest.raises(ValueError, match=r"must have the \(B, N\) of logits"):
        perplexity(torch.zeros(1, 2, 3), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="differ in shape"):
        agreement(torch.zeros(1, 2, 3), torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match=r"reference must be a floating \(B, N, V\)"):
        agreement(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        relative_error(torch.zeros(2, dtype=torch.long), torch.ones(2))
    with pytest.raises(ValueError, match="differ"):
        relative_error(torch.zeros(2), torch.ones(3))
    with pytest.raises(ValueError, match="reference is all zeros"):
        relative_error(torch.ones(2), torch.zeros(2))
