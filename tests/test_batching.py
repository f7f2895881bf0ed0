"""Variable-length batching: left-padded batches yield exactly the tokens of each row alone."""

import pytest
import torch

from kvlib.config import tiny
from kvlib.generate import generate, pad_prompts
from tests.models import CONFIGS, model_for

LENGTHS = (3, 9, 1, 6)


def prompts(lengths=LENGTHS, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 64, (n,), generator=g) for n in lengths]


def test_left_pad_builds_tokens_and_mask():
    tokens, mask = pad_prompts([[5, 6], [7], [1, 2, 3]], pad_id=9)
    assert tokens.tolist() == [[9, 5, 6], [9, 9, 7], [1, 2, 3]]
    assert mask.tolist() == [[0, 1, 1], [0, 0, 1], [1, 1, 1]]


def test_left_pad_rejects_empty_inputs():
    with pytest.raises(ValueError, match="at least one prompt"):
        pad_prompts([])
    with pytest.raises(ValueError, match="every prompt needs at least one token"):
        pad_prompts([[1], []])


@pytest.mark.parametrize("kind", CONFIGS)
@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "uncached"])
def test_batched_greedy_equals_each_row_alone(kind, use_cache):
    model = model_for(CONFIGS[kind])
    rows = prompts()
    tokens, mask = pad_prompts(rows)
    batch = generate(model, tokens, 16, attention_mask=mask, use_cache=use_cache)
    for b, row in enumerate(rows):
        alone = generate(model, row[None], 16, use_cache=use_cache)[0, -16:]
        assert torch.equal(batch[b, -16:], alone), (
            f"{kind} row {b} (length {row.numel()}): batched {batch[b, -16:].tolist()} "
            f"vs alone {alone.tolist()}"
        )


@pytest.mark.parametrize("kind", CONFIGS)
def test_batched_cached_equals_batched_uncached(kind):
    model = model_for(CONFIGS[kind], seed=3)
    tokens, mask = pad_prompts(prompts(seed=4))
    a = generate(model, tokens, 20, attention_mask=mask)
    b = generate(model, tokens, 20, attention_mask=mask, use_cache=False)
    assert torch.equal(a, b), f"cached {a.tolist()} vs uncached {b.tolist()}"


def test_padded_logits_match_unpadded_logits():
    model = model_for(tiny())
    rows = prompts()
    tokens, mask = pad_prompts(rows)
    with torch.no_grad():
        batch = model(tokens, attention_mask=mask)  # (B, T, V)
        for b, row in enumerate(rows):
            alone = model(row[None])[0]  # (T_b, V)
            d = (batch[b, -row.numel() :] - alone).abs().max().item()
            assert d < 1e-5, f"row {b}: max |logit diff| padded vs alone = {d:.3g}"


def test_pad_token_value_does_not_matter():
    model = model_for(tiny())
    rows = prompts()
    outs = []
    for pad_id in (0, 17, 63):
        tokens, mask = pad_prompts(rows, pad_id=pad_id)
        outs.append(generate(model, tokens, 10, attention_mask=mask))
    for out in outs[1:]:
        assert torch.equal(out[:, -10:], outs[0][:, -10:])


def test_batched_sampling_is_reproducible_with_a_seed():
    model = model_for(tiny())
    tokens, mask = pad_prompts(prompts())
    kw = dict(attention_mask=mask, temperature=1.0, top_p=0.95, seed=11)
    a = generate(model, tokens, 12, **kw)
    b = generate(model, tokens, 12, use_cache=False, **kw)
    assert torch.equal(a, b), f"cached {a.tolist()} vs uncached {b.tolist()}"


def test_batched_eos_pads_finished_rows_only():
    model = model_for(tiny())
    rows = prompts()
    tokens, mask = pad_prompts(rows)
    free = generate(model, tokens, 12, attention_mask=mask)
    eos = int(free[0, -12 + 2])  # row 0 finishes at its third new token
    out = generate(model, tokens, 12, attention_mask=mask, eos_token_id=eos)
    for b in range(len(rows)):
        new, ref = out[b, tokens.shape[1] :].tolist(), free[b, tokens.shape[1] :].tolist()
        n = ref.index(eos) + 1 if eos in ref else len(ref)
        assert new[:n] == ref[:n][: len(new)], f"row {b}: {new} vs {ref}"
        assert all(t == eos for t in new[n:]), f"row {b} continues after EOS: {new}"


def test_bad_attention_mask_raises_before_generating():
    model = model_for(tiny())
    tokens, _ = pad_prompts(prompts((2, 3)))
    with pytest.raises(ValueError, match="only LEFT padding"):
        generate(model, tokens, 4, attention_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]))


# ---- chapter 4 exercise checks -----------------------------------------------------------------


def test_check_position_ids_accepts_right_and_rejects_arange():
    from kvlib.exercises.ch04 import check_position_ids

    check_position_ids(lambda mask: (mask.cumsum(1) - 1).clamp(min=0))
    with pytest.raises(AssertionError, match="numbered from 0"):
        check_position_ids(lambda mask: torch.arange(mask.shape[1]).expand(mask.shape))


def test_check_padding_waste_accepts_right_and_rejects_wrong():
    from kvlib.exercises.ch04 import check_padding_waste

    lengths = [3, 9, 1, 6]
    right = 1 - sum(lengths) / (len(lengths) * max(lengths))
    check_padding_waste(right, lengths)
    with pytest.raises(AssertionError, match="fraction of real tokens"):
        check_padding_waste(1 - right, lengths)
    with pytest.raises(AssertionError, match="slots - sum"):
        check_padding_waste(right + 0.1, lengths)
    with pytest.raises(AssertionError, match="should be a float"):
        check_padding_waste(1, lengths)
