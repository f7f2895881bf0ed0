"""Checks for chapter 3 (the decoder and the generation loop)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvlib.config import ModelConfig, tiny
from kvlib.exercises import correct, expect


def check_cached_floats(n_cached_floats: int, config: ModelConfig, batch: int, tokens: int) -> None:
    """Numbers a cache holds after `tokens` tokens in each of `batch` rows of `config`'s model."""
    expected = batch * tokens * config.kv_elements_per_token
    expect(
        isinstance(n_cached_floats, int) and not isinstance(n_cached_floats, bool),
        f"n_cached_floats should be an int, got {type(n_cached_floats).__name__}",
    )
    expect(
        n_cached_floats != batch * tokens * config.n_layers * config.n_kv_heads * config.head_dim,
        "your count is half the right one: that counts only the keys (or only the values), the "
        "cache holds both",
    )
    expect(
        n_cached_floats != 2 * batch * tokens * config.n_layers * config.n_heads * config.head_dim
        or config.n_heads == config.n_kv_heads,
        f"your count is {config.group_size}x too large: with grouped-query attention the cache "
        "holds K kv heads per layer, not H query heads",
    )
    expect(
        n_cached_floats == expected,
        "count B * T tokens, each with a key and a value vector of D numbers per kv head per layer",
    )
    correct(f"your count for batch {batch} and {tokens} tokens matches B * T * 2 * L * K * D")


def check_greedy_loop(greedy: Callable, n_new: int = 12) -> None:
    """`greedy(model, prompt, n)` must return what kvlib.generate returns for greedy decoding."""
    from kvlib.generate import generate
    from kvlib.transformer import Transformer

    torch.manual_seed(123)
    model = Transformer(tiny(), init_std=0.2).eval()
    prompt = torch.randint(0, model.config.vocab_size, (2, 5))
    expected = generate(model, prompt, n_new)
    with torch.inference_mode():
        got = greedy(model, prompt, n_new)
    expect(isinstance(got, torch.Tensor), f"greedy should return a tensor, got {type(got)}")
    expect(
        tuple(got.shape) == tuple(expected.shape),
        f"expected shape {tuple(expected.shape)} (prompt + new tokens), got {tuple(got.shape)}",
    )
    expect(torch.equal(got[:, :5], prompt), "the result should start with the prompt")
    wrong = (got != expected).any(0).nonzero().flatten().tolist()  # columns that differ
    expect(
        not wrong,
        f"tokens differ from kvlib.generate from position {wrong[0] if wrong else 0} on: "
        "did you feed only the newest token after the prefill?",
    )
    correct(f"your loop produced the same {n_new} tokens as kvlib.generate")


def check_nucleus_size(nucleus_size: int, prompt: str = "Life is", top_p: float = 0.9) -> None:
    """Tokens top-p keeps (temperature 1, no top-k) after `prompt` with the trained model."""
    from kvlib.generate import filter_logits
    from kvlib.pretrained import load_pretrained

    expect(
        isinstance(nucleus_size, int) and not isinstance(nucleus_size, bool),
        f"nucleus_size should be an int, got {type(nucleus_size).__name__}",
    )
    model, tok = load_pretrained()
    with torch.inference_mode():
        logits = model(torch.tensor([tok.encode(prompt)]))[:, -1]  # (1, V)
    kept = filter_logits(logits, top_p=top_p).isfinite()  # (1, V)
    expected = int(kept.sum())
    expect(nucleus_size > 0, "the nucleus always keeps at least the most likely token")
    expect(
        nucleus_size != expected - 1,
        f"one short: keep the token whose cumulative probability first reaches {top_p} too",
    )
    expect(
        nucleus_size == expected,
        f"{nucleus_size} is not right: sort the probabilities (softmax of the logits, temperature "
        f"1) in decreasing order and count tokens until their sum reaches {top_p}",
    )
    correct(
        f"your nucleus size for top_p={top_p} after {prompt!r} matches what "
        "kvlib.generate.filter_logits keeps"
    )
