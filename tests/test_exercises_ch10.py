import math

import pytest

from kvlib.exercises.ch10 import check_intensity, check_split_ranges, check_tiles
from kvlib.gpu.emulate import split_ranges
from kvlib.memory import GPUS, MODELS
from tests.answers import assert_hints_hide, assert_not_revealed, failures


def _qwen_intensity(nbytes=2, with_q=True, G=None):
    cfg = MODELS["Qwen2.5-7B"]
    G = cfg.group_size if G is None else G
    S, D = 32768, cfg.head_dim
    flops = 4 * G * S * D
    moved = 2 * S * D * nbytes + (2 * G * D * nbytes if with_q else 0)
    return flops / moved


def test_intensity(capsys):
    right = _qwen_intensity()
    bound = right < GPUS["T4"].peak_flops / GPUS["T4"].bandwidth
    check_intensity(right, bound)
    assert capsys.readouterr().out.startswith("Correct")
    check_intensity(_qwen_intensity(with_q=False), bound)  # the q/out bytes are negligible
    with pytest.raises(AssertionError, match="MHA value"):
        check_intensity(_qwen_intensity(G=1), bound)
    with pytest.raises(AssertionError, match="2 bytes"):
        check_intensity(_qwen_intensity(nbytes=4), bound)
    with pytest.raises(AssertionError, match="not right"):
        check_intensity(right * 1.5, bound)
    with pytest.raises(AssertionError, match="ridge point"):
        check_intensity(right, not bound)
    with pytest.raises(AssertionError, match="True or False"):
        check_intensity(right, "yes")


def test_tiles(capsys):
    G = MODELS["Llama-3-70B"].group_size
    rows = G * 3
    tiles = math.ceil(rows / 16)
    check_tiles(tiles, rows / (tiles * 16))
    assert capsys.readouterr().out.startswith("Correct")
    with pytest.raises(AssertionError, match="round up"):
        check_tiles(rows // 16, rows / (tiles * 16))
    with pytest.raises(AssertionError, match="G\\*T rows, not G"):
        check_tiles(tiles, G / 16)
    with pytest.raises(AssertionError, match="not right"):
        check_tiles(tiles, 0.6)
    with pytest.raises(AssertionError, match="int"):
        check_tiles(float(tiles), 0.75)


def test_split_ranges(capsys):
    blocks = math.ceil(1000 / 16)
    per = math.ceil(blocks / 4) * 16
    right = [(i * per, min((i + 1) * per, 1000)) for i in range(4)]
    check_split_ranges(right)
    assert capsys.readouterr().out.startswith("Correct")
    with pytest.raises(AssertionError, match="whole blocks"):
        check_split_ranges([(0, 250), (250, 500), (500, 750), (750, 1000)])
    with pytest.raises(AssertionError, match="end at the sequence length"):
        check_split_ranges([(0, 256), (256, 512), (512, 768), (768, 1024)])
    with pytest.raises(AssertionError, match="list of 4"):
        check_split_ranges(right[:3])
    with pytest.raises(AssertionError, match="not quite"):
        check_split_ranges([(0, 240), (240, 480), (480, 720), (720, 1000)])


# ---- the checks never print the expected answer ------------------------------------------------
def _no_verdict(text: str) -> None:
    """memory_bound is part of the answer: the output must not name the verdict."""
    for verdict in ("memory bound", "memory-bound", "compute bound", "compute-bound"):
        assert verdict not in text.lower(), f"the verdict shows in: {text!r}"


def test_intensity_hides_the_answer(capsys):
    right = _qwen_intensity()
    bound = right < GPUS["T4"].peak_flops / GPUS["T4"].bandwidth
    check_intensity(right, bound)
    out = capsys.readouterr().out
    assert_not_revealed(out, right)
    _no_verdict(out)
    hints = failures(
        lambda: check_intensity(_qwen_intensity(G=1), bound),
        lambda: check_intensity(_qwen_intensity(nbytes=4), bound),
        lambda: check_intensity(right * 1.5, bound),
        lambda: check_intensity(right, not bound),
    )
    assert "half the right one" in hints[1]
    assert_hints_hide(hints, right)
    for hint in hints:
        _no_verdict(hint)


def test_tiles_hides_the_answer(capsys):
    G = MODELS["Llama-3-70B"].group_size
    rows = G * 3  # the tile count follows from it directly
    tiles = math.ceil(rows / 16)
    util = rows / (tiles * 16)
    check_tiles(tiles, util)
    assert_not_revealed(capsys.readouterr().out, tiles, util, rows)
    hints = failures(
        lambda: check_tiles(rows // 16, util),
        lambda: check_tiles(tiles + 1, util),
        lambda: check_tiles(tiles, G / 16),
        lambda: check_tiles(tiles, 0.6),
    )
    assert_hints_hide(hints, tiles, util, rows)


def test_split_ranges_hides_the_answer(capsys):
    right = split_ranges(1000, 16, 4)
    blocks = math.ceil(1000 / 16)  # the partitions follow from it directly
    check_split_ranges(right)
    out = capsys.readouterr().out
    assert_not_revealed(out, right, *right, blocks)
    hints = failures(
        lambda: check_split_ranges([(0, 250), (250, 500), (500, 750), (750, 1000)]),
        lambda: check_split_ranges([(0, 240), (240, 480), (480, 720), (720, 1000)]),
        lambda: check_split_ranges([(0, 256), (256, 512), (512, 768), (768, 1024)]),
    )
    assert_hints_hide(hints, right, blocks)
