"""Roofline arithmetic: intensities counted from shapes, ridge points from the GPU registry."""

import pytest
import torch

from kvlib import memory
from kvlib.gpu import roofline as rl
from kvlib.memory import GPUS, get_model


def _count(G, S, D, T, nbytes):
    """FLOPs and bytes counted operation by operation, as a check on the closed forms."""
    qk = G * T * S * (2 * D)  # each score: D multiplies and D adds
    pv = G * T * D * (2 * S)  # each output number: S multiplies and S adds
    moved = (S * D + S * D + G * T * D + G * T * D) * nbytes  # K, V, q, out
    return qk + pv, moved


@pytest.mark.parametrize("G,S,D,T", [(1, 4096, 128, 1), (8, 1000, 64, 1), (4, 512, 128, 5)])
def test_intensity_matches_counting(G, S, D, T):
    flops, moved = _count(G, S, D, T, 2)
    assert rl.decode_attention_flops(G, S, D, T) == flops
    assert rl.decode_attention_bytes(G, S, D, T, torch.float16) == moved
    assert rl.decode_attention_intensity(G, S, D, T) == pytest.approx(flops / moved)


def test_mha_decode_is_about_one_and_gqa_about_g():
    mha = rl.decode_attention_intensity(1, 8192, 128)
    assert 0.99 < mha < 1.0, mha
    gqa = rl.model_attention_intensity("Llama-3-8B", 8192)
    G = get_model("Llama-3-8B").group_size
    assert G - 0.05 < gqa < G, (gqa, G)
    assert rl.decode_attention_intensity(1, 8192, 128, dtype=torch.float32) == pytest.approx(
        mha / 2
    )


def test_every_gpu_in_the_zoo_makes_decode_memory_bound():
    for gpu in GPUS.values():
        ridge = rl.ridge_point(gpu)
        assert ridge == pytest.approx(gpu.peak_flops / gpu.bandwidth)
        assert ridge > 8 * rl.decode_attention_intensity(1, 4096, 128), gpu.name
        mha = rl.decode_attention_intensity(1, 4096, 128)
        assert rl.attainable_flops(mha, gpu) == pytest.approx(mha * gpu.bandwidth)
        assert rl.attainable_flops(10 * ridge, gpu) == gpu.peak_flops


def test_matmul_intensity_grows_with_size():
    small, big = rl.matmul_intensity(16, 16, 16), rl.matmul_intensity(4096, 4096, 4096)
    assert small == pytest.approx(2 * 16**3 / (3 * 16 * 16 * 2))
    assert big > rl.ridge_point("A100-80") > small


def test_tile_utilization():
    assert rl.tile_utilization(1) == 1 / 16
    assert rl.tile_utilization(8) == 0.5
    assert rl.tile_utilization(4, 4) == 1.0
    assert rl.tile_utilization(7, 3) == 21 / 32


def test_misuse_raises():
    with pytest.raises(ValueError, match="G must be an int >= 1"):
        rl.decode_attention_flops(0, 10, 64)
    with pytest.raises(TypeError, match="S must be an int"):
        rl.decode_attention_bytes(1, 10.0, 64)
    with pytest.raises(ValueError, match="intensity must be a positive"):
        rl.attainable_flops(0.0, "T4")
    with pytest.raises(TypeError, match="GPU or a GPU name"):
        rl.ridge_point(3)
    with pytest.raises(KeyError, match="unknown GPU"):
        rl.ridge_point("A1000")
    with pytest.raises(TypeError, match="ModelConfig or a name"):
        rl.model_attention_intensity(42, 100)


def test_cuda_core_ridge_point_is_below_the_tensor_core_one():
    t4 = rl.cuda_core_ridge_point("T4")
    assert t4 == pytest.approx(8.1e12 / 320e9), f"T4 CUDA-core ridge {t4:.1f} FLOP/byte"
    for name, gpu in memory.GPUS.items():
        cuda = rl.cuda_core_ridge_point(gpu)
        assert 1 < cuda < rl.ridge_point(gpu), f"{name}: CUDA-core ridge {cuda:.1f}"
