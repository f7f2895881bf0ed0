"""kvlib.bench (the CPU bench): the sections run at tiny sizes, the JSON has its schema and
round-trips, compared paths agree, and the command line runs.

No timing thresholds here: a benchmark's numbers depend on the machine. These tests check that
every section runs, that each ratio is the quotient of the medians it reports, and that
compared paths agree.
"""

import json
import math
import statistics
import subprocess
import sys
import time
import types

import pytest
import torch

from kvlib import timing
from kvlib.bench import bandwidth, cpu, generation, huggingface, memory, problems, report, section
from kvlib.bench import paged as paged_section
from kvlib.bench.__main__ import main
from kvlib.config import tiny
from kvlib.errors import BenchError
from tests.test_layers import layer_of, layers
from tests.toc import ROOT

CPU = torch.device("cpu")


def _positive(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_interleaved_takes_turns_and_times_every_call():
    calls = []

    def sleeper(name: str, seconds: float):
        return lambda: calls.append(name) or time.sleep(seconds)

    fns = {"a": sleeper("a", 0.002), "b": sleeper("b", 0.0)}
    times = timing.interleaved(fns, reps=3, device=CPU, warmup=1)
    assert calls[:2] == ["a", "b"], "warmup runs each contender once first"
    assert calls[2:] == ["a", "b", "b", "a", "a", "b"], f"rounds should rotate, got {calls}"
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    # each timing covers its own call: a's 2 ms sleep is inside every one of a's times
    assert all(t >= 0.002 for t in times["a"]), times
    assert statistics.median(times["b"]) < 0.002, times


def test_generation_tokens_match_and_speedups_are_positive():
    out = generation.bench_generation(CPU, [2, 5], reps=1, prompt_len=4)
    assert [r["new_tokens"] for r in out["rows"]] == [2, 5]
    for r in out["rows"]:
        assert r["tokens_equal"], f"cached and uncached tokens differ at {r['new_tokens']}"
        cached, uncached = timing.median(r["cached_s"]), timing.median(r["uncached_s"])
        assert _positive(cached) and _positive(uncached), r
        assert r["speedup"] == uncached / cached, r
        assert r["cached_tok_s"] == r["new_tokens"] / cached, r
    assert out["config"]["max_seq_len"] >= 4 + 5


def test_generation_rejects_bad_token_counts():
    with pytest.raises(BenchError, match="n_tokens must name at least one"):
        generation.bench_generation(CPU, [])
    with pytest.raises(BenchError, match="n_tokens must be an int >= 1, got 0"):
        generation.bench_generation(CPU, [4, 0])


def test_the_cpu_and_gpu_problems_scatter_blocks_the_same_way():
    """One home for the scattered paged copy: the kvlib.paged pool and the GPU kernels' pool."""
    inp = problems.decode_inputs(2, 21, 4, 2, 8, 4, CPU, seed=3, dtype=torch.float32)
    q, k, v = problems.decode_problem(2, 4, 2, 21, 8, torch.float32, CPU, seed=3)
    assert torch.equal(q, inp["q"]) and torch.equal(k, inp["k"]) and torch.equal(v, inp["v"])
    pool, tables, seq_lens = problems.paged_copy(k, v, block_size=4, seed=3)
    assert torch.equal(tables, inp["block_tables"].long()) and seq_lens.tolist() == [21, 21]
    assert torch.equal(pool.k_pool[0], inp["k_pool"]) and torch.equal(pool.v_pool[0], inp["v_pool"])
    assert torch.equal(pool.k_pool[0][tables[1, 5], :, 0], k[1, :, 20]), "token 20: block 5 slot 0"
    assert inp["k_pool"][tables[1, 5], :, 1:].abs().max() == 0, "zeros past S"
    with pytest.raises(ValueError, match=r"slots must be \(B, M\) = \(2, 6\), got \(2, 5\)"):
        problems.scatter_blocks(k, 4, tables[:, :5])


def test_hf_comparison_checks_identical_tokens():
    pytest.importorskip("transformers")
    out = huggingface.bench_hf(CPU, "tiny", new_tokens=6, reps=1, prompt_len=5)
    assert "kvlib" in out["tok_s"] and len(out["speedup"]) >= 2, out["speedup"]
    assert out["default_attn"] in ("sdpa", "eager")
    med = {name: timing.median(ts) for name, ts in out["times_s"].items()}
    for impl, same in out["tokens_equal"].items():
        assert same, f"kvlib and {impl} generated different tokens"
        assert out["speedup"][impl] == med[impl] / med["kvlib"] and _positive(med[impl])
    assert huggingface.hf_targets("tiny", out) == [], "no target on the tiny preset"
    ts = huggingface.hf_targets("125m", out)  # the 125m target applied to these numbers
    assert [t["value"] for t in ts] == list(out["speedup"].values())


def test_the_hf_section_builds_both_models_from_one_kvlib_config():
    assert huggingface.HF_CONFIGS["125m"].n_layers == 12
    model = huggingface._hf_llama(tiny(), seed=0, attn_implementation="eager")
    assert model.config.hidden_size == tiny().dim and model.config.head_dim == tiny().head_dim
    assert model.config.num_key_value_heads == tiny().n_kv_heads


def test_paged_paths_agree_with_contiguous_attention():
    before = torch.get_num_threads()
    out = paged_section.bench_paged(CPU, S=37, B=2, H=4, K=2, D=8, block_size=4, reps=1, threads=1)
    assert torch.get_num_threads() == before and out["threads"] == 1
    assert set(out["ratio"]) == {
        "paged_gather",
        "paged_blocks",
        "paged_blocks_grouped",
        "paged_fused",
    }
    for name, diff in out["max_abs_diff"].items():
        assert diff < 1e-5, f"{name} differs from contiguous attention by {diff:.3g}"
        assert out["ratio"][name] == out["median_s"][name] / out["median_s"]["contiguous"]
        assert _positive(out["median_s"][name])
    t = paged_section.paged_target(4, out)
    assert t["value"] == out["ratio"]["paged_fused"] and t["op"] == "<="


def test_bandwidth_fraction_is_the_ratio_of_the_two_rates():
    out = bandwidth.bench_bandwidth(CPU, kv_bytes=2**16, B=1, H=4, K=2, D=8, reps=1)
    S = out["shape"]["S"]
    assert S == 2**16 // (2 * 1 * 2 * 8 * 4) and out["kv_bytes_read"] == 2 * 2 * S * 8 * 4
    assert out["attention_bytes_per_s"] == out["kv_bytes_read"] / out["attention_s"]
    assert out["fraction_of_copy"] == out["attention_bytes_per_s"] / out["copy"]["bytes_per_s"]
    assert _positive(out["fraction_of_copy"]), out


def test_memory_rows_come_from_cache_accounting():
    config = tiny(max_seq_len=64)
    out = memory.bench_memory(config, budget_bytes=2**20, lengths=[5, 64, 17], block_size=8)
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
    with pytest.raises(BenchError, match=r"lengths must be in \[1, 64\]"):
        memory.bench_memory(tiny(max_seq_len=64), 2**20, [65])


def test_run_writes_json_that_round_trips_and_validates(tmp_path):
    result = cpu.run(
        quick=True, threads=1, reps=1, sections=["generation", "paged", "memory", "bandwidth"]
    )
    path = report.write_json(result, tmp_path / "b" / "bench.json")
    data = json.loads(path.read_text())
    assert data == json.loads(json.dumps(result)), "the JSON must hold the whole result"
    cpu.validate_result(data)
    assert report.load_results(tmp_path / "b", cpu.validate_result) == [data]
    assert data["schema"] == cpu.SCHEMA
    assert data["machine"]["torch_threads"] == 1
    assert data["versions"]["torch"] == torch.__version__
    assert list(data["figures"]) == ["generation", "paged", "memory", "bandwidth"]
    figs = data["figures"]
    assert all("targets" not in f for f in figs.values()), "targets move to the target table"
    # each target's value is the figure's own number
    values = [t["value"] for t in data["targets"]]
    want = [figs["generation"]["rows"][-1]["speedup"]]
    want += [figs["paged"][str(P)]["ratio"]["paged_fused"] for P in paged_section.BLOCK_SIZES]
    want += [figs["bandwidth"]["fraction_of_copy"]]
    assert values == want, (values, want)
    assert all(_positive(v) for v in values), values
    assert [r["new_tokens"] for r in figs["generation"]["rows"]] == [16, 64, 128]
    assert all(r["tokens_equal"] for r in figs["generation"]["rows"])
    text = cpu.format_report(result)
    for t in data["targets"]:
        assert f"{t['status']:<4} {t['figure']}: {t['metric']} = {report.fmt(t['value'])}" in text
    assert "cached vs uncached greedy generation" in text and "memory (torch.float16" in text


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda r: r.update(schema="kvlib.gpu.bench/1"), r"'schema' is 'kvlib.gpu.bench/1'"),
        (lambda r: r["machine"].update(torch_threads=0), r"'machine.torch_threads' must be >= 1"),
        (lambda r: r["versions"].pop("torch"), r"'versions.torch' is missing"),
        (lambda r: r["figures"].update(nope={}), r"unknown sections \['nope'\]"),
        (lambda r: r["targets"].append({"status": "OK"}), r"'targets' must be a list of targets"),
        (lambda r: r.update(date="today"), r"'date' must be an ISO date, got 'today'"),
    ],
)
def test_validate_result_rejects_invalid_cpu_results(change, match):
    result = report.new_result(cpu.SCHEMA, "test", report.machine_info(CPU, 1), {})
    result["versions"] = report.versions()
    result["figures"]["memory"] = {"rows": []}
    result["targets"].append(report.target("f", "m", 2.0, ">=", 1.0))
    cpu.validate_result(result)  # valid as built
    change(result)
    with pytest.raises(ValueError, match=match):
        cpu.validate_result(result)


def test_main_prints_and_writes(tmp_path, capsys):
    out = tmp_path / "bench.json"
    main(["--quick", "--quiet", "--threads", "1", "--reps", "1", "--sections", "memory",
          "--out", str(out)])  # fmt: skip
    data = json.loads(out.read_text())
    cpu.validate_result(data)
    assert data["settings"]["quick"] is True and list(data["figures"]) == ["memory"]
    assert data["command"].startswith("python -m kvlib.bench --quick"), data["command"]
    printed = capsys.readouterr().out
    assert "bytes/token" in printed and f"wrote {out}" in printed


def test_command_line_runs_one_section(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "kvlib.bench", "--quick", "--quiet", "--threads", "1",
         "--sections", "memory", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    cpu.validate_result(data)
    assert list(data["figures"]) == ["memory"] and data["machine"]["torch_threads"] == 1
    rows = data["figures"]["memory"]["rows"]
    assert rows[0]["strategy"].startswith("contiguous") and rows[0]["vs_contiguous"] == 1.0
    assert "targets" in proc.stdout and f"wrote {out}" in proc.stdout


def test_command_line_rejects_an_unknown_section():
    proc = subprocess.run(
        [sys.executable, "-m", "kvlib.bench", "--quick", "--sections", "nope"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2 and "invalid choice: 'nope'" in proc.stderr, proc.stderr


# ---- the registry of sections -----------------------------------------------------------------


def test_every_section_is_a_module_below_the_cpu_bench():
    table = layers()
    cpu_layer = layer_of("kvlib.bench.cpu", table)
    for name, module_name in cpu.SECTIONS.items():
        module = cpu.section_module(name)
        assert module.__name__ == module_name and callable(module.run), name
        assert layer_of(module_name, table) < cpu_layer, f"{module_name} is not below bench.cpu"
    with pytest.raises(BenchError, match=r"unknown section 'nope'"):
        cpu.section_module("nope")


def _fake_section(monkeypatch, name: str, module: types.ModuleType) -> None:
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(cpu.SECTIONS, name, module.__name__)


def test_a_section_with_only_run_quick_joins_the_run(monkeypatch):
    """A module like the ones moved in later: run(quick) -> rows of target dicts, no format."""
    fake = types.ModuleType("kvlib.bench.fake")
    seen = []

    def run(quick: bool) -> dict:
        seen.append((quick, torch.get_num_threads()))
        rows = [report.target("fake figure", "ratio", 3.0, ">=", 2.0),
                report.target("fake figure", "time", 3.0, "<=", 2.0)]  # fmt: skip
        return {"rows": [*rows, {"setup": "a", "tok_s": 12.345}]}

    fake.run = run
    _fake_section(monkeypatch, "fake", fake)
    result = cpu.run(quick=True, threads=1, sections=["fake"])
    assert seen == [(True, 1)], "run(quick) called once, under the run's thread count"
    assert [t["status"] for t in result["targets"]] == ["PASS", "MISS"]
    text = cpu.format_report(result)
    assert "\nfake\n  setup=a tok_s=12.35" in text, text
    assert "MISS fake figure: time = 3.00 (target <= 2.0)" in text, text


def test_a_section_with_settings_and_format(monkeypatch):
    fake = types.ModuleType("kvlib.bench.fake2")

    def run(quick: bool, settings: section.Settings) -> dict:
        return {"reps": settings.reps, "targets": [report.target("g", "m", 1.0, ">=", 1.0)]}

    fake.run = run
    fake.format = lambda figure: [f"fake2 with {figure['reps']} reps"]
    _fake_section(monkeypatch, "fake2", fake)
    result = cpu.run(quick=False, threads=1, reps=2, sections=["fake2"])
    assert result["figures"] == {"fake2": {"reps": 2}}
    assert [t["figure"] for t in result["targets"]] == ["g"]
    assert "fake2 with 2 reps" in cpu.format_report(result)
    fake.run = lambda quick: [1, 2]
    with pytest.raises(TypeError, match="kvlib.bench.fake2.run must return a dict, got list"):
        cpu.run(quick=True, threads=1, sections=["fake2"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(sections=["nope"]), r"unknown sections \['nope'\]"),
        (dict(threads=0), r"threads must be an int >= 1, got 0"),
        (dict(reps=0), r"reps must be an int >= 1, got 0"),
    ],
)
def test_run_rejects_bad_arguments(kwargs, match):
    with pytest.raises(BenchError, match=match):
        cpu.run(quick=True, **kwargs)


def test_bad_device_and_reps_raise():
    with pytest.raises(BenchError, match="device must be 'cpu', 'cuda' or 'auto'"):
        timing.resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(BenchError, match="torch sees no CUDA GPU"):
            timing.resolve_device("cuda")
    with pytest.raises(BenchError, match="reps must be an int >= 1"):
        timing.interleaved({"a": lambda: None}, reps=0, device=CPU)
    with pytest.raises(BenchError, match="unknown HF config 'huge'"):
        huggingface.bench_hf(CPU, "huge", 4)


def test_targets_pass_at_the_bound_and_format():
    assert report.target("f", "m", 1.0, ">=", 1.0)["status"] == "PASS"
    assert report.target("f", "m", 0.999, ">=", 1.0)["status"] == "MISS"
    assert report.target("f", "m", 1.3, "<=", 1.3)["status"] == "PASS"
    assert report.target("f", "m", 1.31, "<=", 1.3)["status"] == "MISS"
    with pytest.raises(BenchError, match="op must be '>=' or '<=', got '<'"):
        report.target("f", "m", 1.0, "<", 1.0)
    assert [report.fmt(x) for x in (0.0, 1.234, 12345.0, 0.001234)] == [
        "0.0", "1.23", "1.23e+04", "0.00123"
    ]  # fmt: skip


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

    _, k, v = problems.decode_problem(3, 4, 2, 21, 8, torch.float32, CPU, seed=5)
    pool, tables, _ = problems.paged_copy(k, v, block_size=4, seed=6)
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

    _, k, v = problems.decode_problem(1, 2, 1, 8, 4, torch.float32, CPU, seed=0)
    pool, tables, _ = problems.paged_copy(k, v, block_size=4, seed=0)
    with pytest.raises(ValueError, match=r"seq_lens up to 9 exceed the 2 blocks x 4 slots"):
        gather_kv(pool, tables, torch.tensor([9]), 0)


@pytest.mark.parametrize("T", [1, 3])
def test_paged_block_path_skips_masks_only_where_every_key_is_visible(T):
    from kvlib.paged import paged_attention

    q, k, v = problems.decode_problem(3, 4, 2, 23, 8, torch.float32, CPU, seed=7)
    q = torch.randn(3, 4, T, 8)  # (B, H, T, D)
    pool, tables, _ = problems.paged_copy(k, v, block_size=4, seed=8)
    seq_lens = torch.tensor([23, 11, 17])  # full, partial and unequal blocks
    got = paged_attention(q, pool, tables, seq_lens, 0, method="blocks")
    want = paged_attention(q, pool, tables, seq_lens, 0, method="gather")
    diff = (got - want).abs().max().item()
    assert diff < 1e-5, f"blocks path differs from the gather reference by {diff:.3g}"


@pytest.mark.parametrize("per_step", [2, 3, 100])
def test_paged_blocks_grouped_match_the_gather_reference(per_step):
    from kvlib.paged import paged_attention

    _, k, v = problems.decode_problem(3, 4, 2, 23, 8, torch.float32, CPU, seed=9)
    q = torch.randn(3, 4, 2, 8)  # (B, H, T, D)
    pool, tables, _ = problems.paged_copy(k, v, block_size=4, seed=10)
    seq_lens = torch.tensor([23, 6, 17])
    got = paged_attention(q, pool, tables, seq_lens, 0, method="blocks", blocks_per_step=per_step)
    want = paged_attention(q, pool, tables, seq_lens, 0, method="gather")
    diff = (got - want).abs().max().item()
    assert diff < 1e-5, f"{per_step} blocks per step differ from the gather path by {diff:.3g}"


def test_paged_blocks_per_step_must_be_positive():
    from kvlib.paged import paged_attention

    q, k, v = problems.decode_problem(1, 2, 1, 8, 4, torch.float32, CPU, seed=0)
    pool, tables, lens = problems.paged_copy(k, v, block_size=4, seed=0)
    with pytest.raises(ValueError, match=r"blocks_per_step must be an int >= 1, got 0"):
        paged_attention(q, pool, tables, lens, 0, blocks_per_step=0)


def test_copy_bandwidth_is_a_plausible_rate():
    out = timing.copy_bandwidth("cpu", 2**22, reps=2)
    assert out["nbytes"] == 2**22 and math.isfinite(out["bytes_per_s"])
    assert 1e8 < out["bytes_per_s"] < 1e13, out["bytes_per_s"]
    with pytest.raises(ValueError, match="nbytes must be an int >= 1, got 0"):
        timing.copy_bandwidth("cpu", 0)


def test_interleaved_uses_the_given_timer_in_rotated_order():
    calls = []
    fns = {n: (lambda n=n: calls.append(n)) for n in "abc"}
    times = timing.interleaved(fns, reps=3, device=CPU, warmup=0, timer=lambda fn, dev: fn() or 0.5)
    assert times == {n: [0.5] * 3 for n in "abc"}
    assert calls == list("abc" + "bca" + "cab")


def test_median_of_nothing_raises():
    with pytest.raises(BenchError, match="median of no timings"):
        timing.median([])
