"""The online softmax folds chunks of scores into the same result as one softmax over all."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlib.online_softmax import online_softmax_lse, online_softmax_result, online_softmax_step


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), chunk=st.integers(1, 17), seed=st.integers(0, 2**16))
def test_chunks_give_the_softmax_over_all_keys(n, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(3, 4, n, generator=g, dtype=torch.float64) * 5  # (B, rows, n)
    scores[0, 1] = float("-inf")  # a row that sees nothing
    scores[1, 2, : n // 2] = float("-inf")  # a row whose first chunks are all masked
    values = torch.randn(3, n, 8, generator=g, dtype=torch.float64)  # (B, n, D)
    state = None
    for a in range(0, n, chunk):
        state = online_softmax_step(state, scores[..., a : a + chunk], values[:, a : a + chunk])
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # the masked row: zeros
    want = weights @ values  # (B, rows, D)
    torch.testing.assert_close(online_softmax_result(state), want)
    lse = online_softmax_lse(state)  # (B, rows)
    torch.testing.assert_close(lse, torch.logsumexp(scores, dim=-1))
    assert torch.isinf(lse[0, 1]) and lse[0, 1] < 0


def test_values_may_be_a_function_of_the_weights():
    scores = torch.tensor([[1.0, 2.0, 3.0]])  # (rows, n)
    values = torch.tensor([[1.0], [2.0], [4.0]])  # (n, D)
    state = online_softmax_step(None, scores[:, :2], lambda p: p @ values[:2])
    state = online_softmax_step(state, scores[:, 2:], values[2:])
    want = torch.softmax(scores, dim=-1) @ values
    torch.testing.assert_close(online_softmax_result(state), want)
