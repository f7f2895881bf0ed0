"""kvlib.bench: the pieces run at tiny sizes, the JSON has its schema, tokens match.

No timing thresholds here: a benchmark's numbers depend on the machine. These tests check that
every section runs, that ratios are positive and finite, and that compared paths agree.
"""

import json
import math

import pytest
import torch

from kvlib import bench
from kvlib.config import tiny

CPU = torch.device("cpu")


def _positive(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_interleaved_takes_turns_and_times_every_call():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = bench.interleaved(fns, reps=3, device=CPU, warmup=1)
    assert calls[:2] == ["a", "b"], "warmup runs each contender once first"
    assert calls[2:] == ["a", "b", "b", "a", "a", "b"], f"rounds should rotate, got {calls}"
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert all(t >= 0 for ts in times.values() for t in ts)


def test_generation_tokens_match_and_speedups_are_positive():
    out = bench.bench_generation(CPU, [2, 5], reps=1, prompt_len=4)
    assert [r["new_tokens"] for r in out["rows"]] == [2, 5]
    for r in out["rows"]:
        assert r["tokens_equal"], f"cached and uncached tokens differ at {r['new_tokens']}"
        assert _positive(r["speedup"]) and _positive(r["cached_tok_s"]), r
    assert out["config"]["max_seq_len"] >= 4 + 5


def test_hf_comparison_checks_identical_tokens():
    pytest.importorskip("transformers")
    out = bench.bench_hf(CPU, "tiny", new_tokens=6, reps=1, prompt_len=5)
    assert "kvlib" in out["tok_s"] and len(out["speedup"]) >= 2, out["speedup"]
    assert out["default_attn"] in ("sdpa", "eager")
    for impl, same in out["tokens_equal"].items():
        assert same, f"kvlib and {impl} generated different tokens"
        assert _positive(out["speedup"][impl])


def test_paged_paths_agree_with_contiguous_attention():
    before = torch.get_num_threads()
    out = bench.bench_paged(CPU, S=37, B=2, H=4, K=2, D=8, block_size=4, reps=1, threads=1)
    assert torch.get_num_threads() == before and out["threads"] == 1
    assert set(out["ratio"]) == {
        "paged_gather",
        "paged_blocks",
        "paged_blocks_grouped",
        "paged_fused",
    }
    for name, diff in out["max_abs_diff"].items():
        assert diff < 1e-5, f"{name} differs from contiguous attention by {diff:.3g}"
        assert _positive(out["ratio"][name])


def test_bandwidth_fraction_is_positive():
    out = bench.bench_bandwidth(CPU, kv_bytes=2**16, B=1, H=4, K=2, D=8, reps=1)
    assert out["kv_bytes_read"] > 0 and _positive(out["fraction_of_copy"]), out


def test_memory_rows_come_from_cache_accounting():
    config = tiny(max_seq_len=64)
    out = bench.bench_memory(config, budget_bytes=2**20, lengths=[5, 64, 17], block_size=8)
    rows = {r["strategy"].split(" ")[0]: r for r in out["rows"]}
    # contiguous reserves max_seq_len slots per sequence, whatever the length
    per_token = config.kv_bytes_per_token(torch.float16)
    want = 64 * per_token * 3 / (5 + 64 + 17)
    assert rows["contiguous"]["bytes_per_token"] == pytest.approx(want)
    # paged holds whole blocks of 8 slots: 1 + 8 + 3 blocks
    assert rows["paged"]["bytes_per_token"] == pytest.approx(12 * 8 * per_token / 86)
    assert rows["paged"]["sequences_in_budget"] >= rows["contiguous"]["sequences_in_budget"]
    if "int8" in rows:
        assert rows["int8"]["bytes_per_token"] < rows["paged"]["bytes_per_token"]


def test_memory_rejects_lengths_past_the_config():
    with pytest.raises(bench.BenchError, match=r"lengths must be in \[1, 64\]"):
        bench.bench_memory(tiny(max_seq_len=64), 2**20, [65])


def test_run_writes_json_with_the_schema(tmp_path):
    result = bench.run(
        quick=True, threads=1, reps=1, sections=["generation", "paged", "memory", "bandwidth"]
    )
    path = bench.write_json(result, tmp_path / "b" / "bench.json")
    data = json.loads(path.read_text())
    assert data["schema"] == bench.SCHEMA
    for key in ("date", "command", "machine", "versions", "settings", "figures", "targets"):
        assert key in data, f"missing {key!r}"
    assert data["machine"]["torch_threads"] == 1
    assert data["versions"]["torch"] == torch.__version__
    assert set(data["figures"]) == {"generation", "paged", "memory", "bandwidth"}
    assert all(t["status"] in ("PASS", "MISS") for t in data["targets"])
    assert all(t["value"] > 0 for t in data["targets"]), data["targets"]
    assert all(r["tokens_equal"] for r in data["figures"]["generation"]["rows"])
    report = bench.format_report(result)
    assert "targets" in report and ("PASS" in report or "MISS" in report)


def test_main_prints_and_writes(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(
        [
            "--quick",
            "--quiet",
            "--threads",
            "1",
            "--reps",
            "1",
            "--sections",
            "memory",
            "--out",
            str(out),
        ]
    )
    assert json.loads(out.read_text())["settings"]["quick"] is True
    assert "memory" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(sections=["nope"]), r"unknown sections \['nope'\]"),
        (dict(threads=0), r"threads must be an int >= 1, got 0"),
        (dict(reps=0), r"reps must be an int >= 1, got 0"),
    ],
)
def test_run_rejects_bad_arguments(kwargs, match):
    with pytest.raises(bench.BenchError, match=match):
        bench.run(quick=True, **kwargs)


def test_bad_device_and_reps_raise():
    with pytest.raises(bench.BenchError, match="device must be 'cpu', 'cuda' or 'auto'"):
        bench.resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(bench.BenchError, match="torch sees no CUDA GPU"):
            bench.resolve_device("cuda")
    with pytest.raises(bench.BenchError, match="reps must be an int >= 1"):
        bench.interleaved({"a": lambda: None}, reps=0, device=CPU)
    with pytest.raises(bench.BenchError, match="unknown HF config 'huge'"):
        bench.bench_hf(CPU, "huge", 4)


# ---- the optimized paths the bench drove, each against its reference ---------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_rms_norm_matches_the_reference(dtype):
    from kvlib.transformer import RMSNorm, rms_norm_reference

    torch.manual_seed(0)
    norm = RMSNorm(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 48).to(dtype)
    got, want = norm(x), rms_norm_reference(x, norm.weight, 1e-5)
    assert got.dtype == want.dtype == dtype
    # torch's rms_norm and the spelled-out mean are different kernels: the fp32 sum of squares
    # may be added in another order (the vector width decides), so the two may differ by a few
    # units in the last place of `dtype`; a wrong formula would be off by far more.
    ulps = 4 * torch.finfo(dtype).eps * want.float().abs()
    excess = ((got.float() - want.float()).abs() - ulps).max().item()
    assert excess <= 0, f"fused RMSNorm differs from the reference by {excess:.3g} beyond 4 ulp"


def test_block_gather_matches_a_token_by_token_gather():
    from kvlib.paged import gather_kv

    _, k, v = bench._decode_problem(3, 4, 2, 21, 8, torch.float32, CPU, seed=5)
    pool, tables, _ = bench._paged_copy(k, v, block_size=4, seed=6)
    seq_lens = torch.tensor([21, 9, 14])
    gk, gv, valid = gather_kv(pool, tables, seq_lens, 0)
    assert gk.shape == (3, 2, 21, 8) and valid.shape == (3, 21)
    # reference: every token read from its block and slot, one at a time
    for b in range(3):
        for i in range(int(seq_lens[b])):
            blk, off = int(tables[b, i // 4]), i % 4
            assert torch.equal(gk[b, :, i], pool.k_pool[0][blk, :, off]), (b, i)
            assert torch.equal(gv[b, :, i], pool.v_pool[0][blk, :, off]), (b, i)
    assert valid.sum(1).tolist() == seq_lens.tolist()
    diff = (gk[0] - k[0]).abs().max().item()
    assert diff == 0.0, f"gathered keys differ from the contiguous ones by {diff:.3g}"


def test_block_gather_rejects_lengths_past_the_tables():
    from kvlib.paged import gather_kv

    _, k, v = bench._decode_problem(1, 2, 1, 8, 4, torch.float32, CPU, seed=0)
    pool, tables, _ = bench._paged_copy(k, v, block_size=4, seed=0)
    with pytest.raises(ValueError, match=r"seq_lens up to 9 exceed the 2 blocks x 4 slots"):
        gather_kv(pool, tables, torch.tensor([9]), 0)


@pytest.mark.parametrize("T", [1, 3])
def test_paged_block_path_skips_masks_only_where_every_key_is_visible(T):
    from kvlib.paged import paged_attention

    q, k, v = bench._decode_problem(3, 4, 2, 23, 8, torch.float32, CPU, seed=7)
    q = torch.randn(3, 4, T, 8)  # (B, H, T, D)
    pool, tables, _ = bench._paged_copy(k, v, block_size=4, seed=8)
    seq_lens = torch.tensor([23, 11, 17])  # full, partial and unequal blocks
    got = paged_attention(q, pool, tables, seq_lens, 0, method="blocks")
    want = paged_attention(q, pool, tables, seq_lens, 0, method="gather")
    diff = (got - want).abs().max().item()
    assert diff < 1e-5, f"blocks path differs from the gather reference by {diff:.3g}"


@pytest.mark.parametrize("per_step", [2, 3, 100])
def test_paged_blocks_grouped_match_the_gather_reference(per_step):
    from kvlib.paged import paged_attention

    _, k, v = bench._decode_problem(3, 4, 2, 23, 8, torch.float32, CPU, seed=9)
    q = torch.randn(3, 4, 2, 8)  # (B, H, T, D)
    pool, tables, _ = bench._paged_copy(k, v, block_size=4, seed=10)
    seq_lens = torch.tensor([23, 6, 17])
    got = paged_attention(q, pool, tables, seq_lens, 0, method="blocks", blocks_per_step=per_step)
    want = paged_attention(q, pool, tables, seq_lens, 0, method="gather")
    diff = (got - want).abs().max().item()
    assert diff < 1e-5, f"{per_step} blocks per step differ from the gather path by {diff:.3g}"


def test_paged_blocks_per_step_must_be_positive():
    from kvlib.paged import paged_attention

    q, k, v = bench._decode_problem(1, 2, 1, 8, 4, torch.float32, CPU, seed=0)
    pool, tables, lens = bench._paged_copy(k, v, block_size=4, seed=0)
    with pytest.raises(ValueError, match=r"blocks_per_step must be an int >= 1, got 0"):
        paged_attention(q, pool, tables, lens, 0, blocks_per_step=0)


def test_copy_bandwidth_is_a_plausible_rate():
    out = bench.copy_bandwidth("cpu", 2**22, reps=2)
    assert out["nbytes"] == 2**22 and math.isfinite(out["bytes_per_s"])
    assert 1e8 < out["bytes_per_s"] < 1e13, out["bytes_per_s"]
    with pytest.raises(ValueError, match="nbytes must be an int >= 1, got 0"):
        bench.copy_bandwidth("cpu", 0)


def test_interleaved_uses_the_given_timer_in_rotated_order():
    calls = []
    fns = {n: (lambda n=n: calls.append(n)) for n in "abc"}
    times = bench.interleaved(fns, reps=3, device=CPU, warmup=0, timer=lambda fn, dev: fn() or 0.5)
    assert times == {n: [0.5] * 3 for n in "abc"}
    assert calls == list("abc" + "bca" + "cab")


def test_median_of_nothing_raises():
    with pytest.raises(bench.BenchError, match="median of no timings"):
        bench.median([])
