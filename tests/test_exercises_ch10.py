import math

import numpy as np
import pytest

from kvlib.exercises.ch10 import (
    WARP_SUM_ROWS,
    check_intensity,
    check_split_ranges,
    check_tiles,
    check_warp_sum,
)
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


WARP_SUM = r"""
extern "C" __global__ void warp_sum(const float* __restrict__ x, float* __restrict__ out) {
    float v = x[blockIdx.x * 32 + threadIdx.x];  // one number per lane
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (threadIdx.x == 0) out[blockIdx.x] = v;
}
"""


def _warp_sum_mistakes():
    return [
        (WARP_SUM.replace("0xffffffffu", "0x0000ffffu"), "does not name the calling lane 16"),
        (WARP_SUM.replace("out[blockIdx.x] = v;", "(void)v;"), "never written"),
        (WARP_SUM.replace("o = 16", "o = 8"), "sums are wrong in 6 of 6 rows"),
        (WARP_SUM.replace("float v", "flot v"), "does not compile:\nline 3:5: error"),
        (WARP_SUM.replace("threadIdx.x];", "threadIdx.x + 1];"), "heap-buffer-overflow"),
        (WARP_SUM.replace("__shfl_xor_sync(0xffffffffu, v, o)", "x[o]"), "warp shuffles"),
        (WARP_SUM.replace("warp_sum(const float*", "wsum(const float*"), "void warp_sum"),
        (WARP_SUM.replace("float* __restrict__ out)", "int* __restrict__ out)"), "float\\* out"),
    ]


def test_warp_sum(capsys):
    check_warp_sum(WARP_SUM)
    assert capsys.readouterr().out.startswith("Correct")
    down = WARP_SUM.replace(
        "__shfl_xor_sync(0xffffffffu, v, o)", "__shfl_down_sync(0xffffffffu, v, o)"
    )
    check_warp_sum(down)  # lane 0 holds the sum with shuffles down too
    for source, hint in _warp_sum_mistakes():
        with pytest.raises(AssertionError, match=hint):
            check_warp_sum(source)
    with pytest.raises(AssertionError, match="a str"):
        check_warp_sum(None)


def test_warp_sum_hides_the_answer(capsys):
    rng = np.random.default_rng(10)  # the check's own input
    want = rng.integers(-100, 100, (WARP_SUM_ROWS, 32)).astype(np.float32).sum(axis=1)
    check_warp_sum(WARP_SUM)
    assert_not_revealed(capsys.readouterr().out, *want.tolist())
    hints = failures(*(lambda s=s: check_warp_sum(s) for s, _ in _warp_sum_mistakes()))
    assert_hints_hide(hints, *want.tolist())
