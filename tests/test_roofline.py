import pytest

from kvlib.config import tiny
from kvlib.errors import KVLibValueError
from kvlib.memory import get_model
from kvlib.roofline import bytes_per_token, decode_step, kv_dominates_from, matmul_params

LLAMA3 = get_model("Llama-3-8B")


def step(B, S, **kw):
    return decode_step(LLAMA3, B, S, bandwidth=3.35e12, peak_flops=989e12, **kw)


def test_llama3_8b_at_batch_1_reads_mostly_weights():
    s = step(1, 8192)
    assert 14e9 < s.weight_bytes < 17e9, s.weight_bytes  # about 16 GB of bf16 weights
    assert s.kv_bytes == 8192 * 2 * 32 * 8 * 128 * 2  # 128 KiB per token: about 1.07 GB
    assert s.kv_share < 0.1 and s.bound == "memory"


def test_batching_amortises_weight_reads_never_kv_reads():
    one, many = step(1, 4096), step(64, 4096)
    w1, kv1 = bytes_per_token(one)
    w64, kv64 = bytes_per_token(many)
    assert w64 == pytest.approx(w1 / 64), "weight bytes per token fall as 1 / B"
    assert kv64 == kv1, "every sequence reads its own cache"
    assert many.kv_share > 0.5 > 0.1 > one.kv_share


def test_quantized_cache_shortens_only_the_kv_part():
    fp, q8 = step(64, 8192), step(64, 8192, kv_bytes_per_token=LLAMA3.kv_elements_per_token * 1)
    assert q8.kv_bytes == fp.kv_bytes / 2 and q8.weight_bytes == fp.weight_bytes
    saved = (fp.time_s - q8.time_s) / fp.time_s
    assert saved == pytest.approx(fp.kv_share / 2), "time saved = half the KV share"
    short = step(1, 512)
    saved_short = (
        short.time_s - step(1, 512, kv_bytes_per_token=LLAMA3.kv_elements_per_token).time_s
    ) / short.time_s
    assert saved_short < 0.01, "batch 1, short context: the weights dominate"


def test_crossover_context():
    S = kv_dominates_from(LLAMA3, 4)
    s = step(4, int(S))
    assert s.kv_bytes == pytest.approx(s.weight_bytes, rel=1e-3)


def test_compute_bound_at_huge_batch_and_flops():
    c = tiny()
    s = decode_step(c, 10**6, 1, bandwidth=1e12, peak_flops=1e9)
    assert s.bound == "compute" and s.time_s == s.compute_s
    assert s.flops == 2 * matmul_params(c) * 10**6 + 4 * c.n_layers * c.n_heads * c.head_dim * 10**6


def test_bad_arguments():
    with pytest.raises(KVLibValueError, match="bandwidth"):
        decode_step(LLAMA3, 1, 1, bandwidth=0, peak_flops=1.0)
    with pytest.raises(TypeError, match="B must be an int"):
        decode_step(LLAMA3, 1.0, 1, bandwidth=1.0, peak_flops=1.0)
