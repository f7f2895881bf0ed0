"""kvlib.bench.quantized on small sizes: every figure present, statuses computed from the values."""

import pytest
import torch

from kvlib.bench import quantized as bench_quant
from kvlib.roofline import decode_step


@pytest.fixture(scope="module")
def result():
    return bench_quant.run(True, sizes=[256, 8192], S_model=256, reps=1)


def test_rows_cover_every_target(result):
    figures = [(r["figure"], r["metric"]) for r in result["rows"]]
    assert ("decode attention S=8192", "int8 / fp32 time") in figures
    assert ("decode attention S=8192", "FP8 / fp32 time") in figures
    assert ("model decode S=256", "int8 / contiguous tokens/s") in figures
    assert ("model decode S=256", "paged+int8 / int8 time") in figures
    assert not any("S=256" in f and "attention" in f for f, _ in figures), "targets hold at S >= 8k"
    for r in result["rows"]:
        ok = r["value"] <= r["target"] if r["op"] == "<=" else r["value"] >= r["target"]
        assert r["status"] == ("PASS" if ok else "MISS"), r


def test_ratios_and_bandwidths_follow_the_times(result):
    for row in result["attention"].values():
        for m in row.values():
            assert m["vs_fp32"] == pytest.approx(m["time_s"] / row["fp32"]["time_s"])
            assert m["GB_s"] == pytest.approx(m["bytes"] / m["time_s"] / 1e9)
    caches = result["model"]["caches"]
    assert set(caches) == {"contiguous", "paged", "int8", "FP8", "KIVI-4", "paged+int8"}
    for m in caches.values():
        assert m["tokens_per_s"] == pytest.approx(1 / m["time_s"])
    assert "load_average" in result and result["copy_bandwidth_GB_s"] > 0
    lines = bench_quant.report(result)
    assert sum(line.startswith(("PASS", "MISS")) for line in lines) == len(result["rows"])


def test_bytes_read_per_step():
    S = 1000
    fp32 = bench_quant.stored_bytes("fp32", S)
    assert fp32 == 2 * 8 * S * 128 * 4
    assert bench_quant.stored_bytes("int8", S) == 2 * 8 * S * (128 + 4)  # codes + fp32 scale
    assert bench_quant.stored_bytes("FP8", S) == fp32 / 4
    assert bench_quant.stored_bytes("paged+int8", S) == bench_quant.stored_bytes("int8", S)


def test_the_model_config_is_dominated_by_its_cache_at_the_full_context():
    step = decode_step(bench_quant.MODEL, 1, 16384, bandwidth=1e10, peak_flops=1e12,
                       weight_dtype=torch.float32)  # fmt: skip
    assert step.kv_share > 0.7, f"the cache is only {step.kv_share:.0%} of a step's bytes"
