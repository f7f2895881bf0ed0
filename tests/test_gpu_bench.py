"""`python -m kvlib.bench --gpu` (kvlib.bench.gpu and its gpu_* modules): the pure parts
everywhere, the whole run on a GPU (marker `gpu`).

Without a GPU: the errors, the split and GPU-name rules, the inputs and the fp32 reference
(checked against torch SDPA and against the kernels' NumPy emulation), the launch settings
(checked against `paged_decode_attention`'s own launches with the launcher recorded), and the
result's schema, report, targets and files. On a GPU: `run_gpu(quick=True)` end to end.
"""

import copy
import json
import subprocess
import sys
import tomllib

import pytest
import torch

from kvlib import timing
from kvlib.bench import gpu, problems, report
from kvlib.bench import gpu_decode as gdecode
from kvlib.bench import gpu_gemm as ggemm
from kvlib.bench import gpu_machine as gmachine
from kvlib.bench import gpu_results as gresults
from kvlib.bench import gpu_timing as gtiming
from kvlib.bench.__main__ import main
from kvlib.errors import BenchError
from kvlib.gpu import emulate as em
from kvlib.gpu import kernels as gk
from kvlib.registry import GPUS
from tests.toc import ROOT

CPU = torch.device("cpu")
GiB, MiB = 2**30, 2**20


requires_gpu = pytest.mark.skipif(not gk.available(), reason="needs a CUDA GPU and CuPy")


# ---- no GPU: clear errors ---------------------------------------------------------------------


def test_require_gpu_says_where_to_run(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BenchError, match=r"needs a CUDA GPU.*Colab.*T4.*kvlib\[gpu\]"):
        gmachine.require_gpu()


def test_require_gpu_says_what_to_install(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` raises ImportError
    with pytest.raises(BenchError, match=r"needs CuPy.*pip install 'kvlib\[gpu\]'"):
        gmachine.require_gpu()


def test_main_gpu_fails_with_the_message(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu.json"
    with pytest.raises(BenchError, match="needs a CUDA GPU"):
        main(["--gpu", "--quick", "--out", str(out)])
    assert not out.exists(), "no JSON may be written when nothing was measured"
    for flag in (["--threads", "2"], ["--device", "cuda"], ["--sections", "paged"]):
        with pytest.raises(BenchError, match="--threads and --device belong to the CPU"):
            main(["--gpu", *flag])


@pytest.mark.skipif(gk.available(), reason="checks the exit where no GPU is present")
def test_command_line_exits_nonzero_without_a_gpu():
    proc = subprocess.run(
        [sys.executable, "-m", "kvlib.bench", "--gpu", "--quick", "--quiet"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 1, proc.stdout
    assert proc.stderr.startswith("python -m kvlib.bench: the GPU benchmark needs"), proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


def test_gpu_functions_reject_bad_arguments_before_touching_a_gpu():
    with pytest.raises(BenchError, match="the GPU timings need a CUDA device, got 'cpu'"):
        gtiming.time_cuda({"a": lambda: None}, 1, CPU)
    with pytest.raises(BenchError, match="reps must be an int >= 1, got 0"):
        gtiming.time_cuda({"a": lambda: None}, 0, "cuda")
    with pytest.raises(BenchError, match="at least one contender"):
        gtiming.time_cuda({}, 1, "cuda")
    with pytest.raises(BenchError, match=r"methods must be a non-empty subset .*'cublas'"):
        ggemm.bench_gemm(CPU, 16, methods=["cublas"])
    with pytest.raises(BenchError, match="splits must be ints >= 1 or 'auto', got 0"):
        gdecode.bench_decode_attention(CPU, [64], splits=(0,))
    with pytest.raises(BenchError, match="splits must name at least one setting"):
        gdecode.bench_decode_attention(CPU, [64], splits=())
    with pytest.raises(BenchError, match="the GPU timings need a CUDA device"):
        gdecode.bench_decode_attention(CPU, [64])


# ---- pure rules -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("per_split1", "sms", "kv_blocks", "want"),
    [
        (32, 40, 64, 3),  # T4, B=4 K=8 wmma: 80 blocks wanted, 32 per split -> 3 splits
        (32, 132, 4096, 9),  # H100/H200: 264 wanted -> 9
        (40, 40, 100, 2),  # exactly 2 per SM
        (128, 40, 64, 1),  # already 3 blocks per SM: no split
        (1, 132, 4, 4),  # capped: a partition holds at least one block of the cache
    ],
)
def test_auto_splits_gives_every_sm_two_blocks(per_split1, sms, kv_blocks, want):
    got = gdecode.auto_splits(per_split1, sms, kv_blocks)
    assert got == want, f"auto_splits({per_split1}, {sms}, {kv_blocks}) = {got}, want {want}"
    if got < kv_blocks:  # not capped: enough blocks, and the fewest splits that give them
        assert per_split1 * got >= 2 * sms
        assert got == 1 or per_split1 * (got - 1) < 2 * sms


def test_auto_splits_rejects_bad_counts():
    with pytest.raises(ValueError, match="sm_count must be an int >= 1, got 0"):
        gdecode.auto_splits(32, 0, 64)
    with pytest.raises(ValueError, match="n_blocks_per_split1 must be an int >= 1"):
        gdecode.auto_splits(0, 40, 64)


@pytest.mark.parametrize(
    ("name", "memory", "want"),
    [
        ("Tesla T4", 15360 * MiB, "T4"),
        ("NVIDIA L4", 23034 * MiB, "L4"),
        ("NVIDIA A10", 23028 * MiB, "A10"),
        ("NVIDIA A10G", 23028 * MiB, None),  # another board: not the A10 entry
        ("NVIDIA A100-SXM4-40GB", 40960 * MiB, "A100-40"),
        ("NVIDIA A100-SXM4-80GB", 81920 * MiB, "A100-80"),
        ("NVIDIA H100 80GB HBM3", 81559 * MiB, "H100-80"),
        ("NVIDIA H100 PCIe", 81559 * MiB, None),  # PCIe: less bandwidth than the SXM entry
        ("NVIDIA H200", 143771 * MiB, "H200-141"),
        ("Tesla V100-SXM2-16GB", 16160 * MiB, None),  # only the 32 GB V100 is listed
        ("NVIDIA GeForce RTX 4090", 24564 * MiB, None),
    ],
)
def test_match_gpu_rule(name, memory, want):
    assert gmachine.match_gpu(name, memory) == want, f"{name} with {memory / GiB:.1f} GiB"


def test_match_gpu_checks_types_and_cuda_versions_read_right():
    with pytest.raises(TypeError, match="device_name must be a str"):
        gmachine.match_gpu(None, GiB)
    assert gmachine.cuda_version(12040) == "12.4"
    assert gmachine.cuda_version(11080) == "11.8"
    assert gmachine.cuda_version(13000) == "13.0"
    assert gtiming.flush_bytes(40 * MiB) == 80 * MiB and gtiming.flush_bytes(0) == 256 * MiB


def test_attention_bytes_count_kv_q_and_out():
    B, H, K, S, D = 4, 32, 8, 1024, 128
    want = 2 * B * K * S * D * 2 + 2 * B * H * D * 2  # K and V read, q read, out written (fp16)
    assert gdecode.attention_bytes(B, H, K, S, D) == want
    with pytest.raises(ValueError, match="H=6 must be a multiple of K=4"):
        gdecode.attention_bytes(1, 6, 4, 8, 16)


# ---- inputs, reference and launches (CPU) -----------------------------------------------------


def test_decode_inputs_hold_the_same_kv_contiguous_and_paged():
    B, S, H, K, D, P = 2, 37, 4, 2, 16, 8
    inp = problems.decode_inputs(B, S, H, K, D, P, CPU, seed=3)
    M = -(-S // P)
    assert inp["q"].shape == (B, H, 1, D) and inp["k"].shape == (B, K, S, D)
    assert inp["k_pool"].shape == (B * M, K, P, D) and inp["block_tables"].shape == (B, M)
    assert inp["block_tables"].dtype == torch.int32 and inp["seq_lens"].tolist() == [S] * B
    ids = inp["block_tables"].flatten().sort().values
    assert ids.tolist() == list(range(B * M)), "every pool block used exactly once"
    assert not torch.equal(ids, inp["block_tables"].flatten()), "blocks should be shuffled"
    for b in range(B):
        for s in range(S):
            blk = int(inp["block_tables"][b, s // P])
            assert torch.equal(inp["k_pool"][blk, :, s % P], inp["k"][b, :, s]), (b, s)
            assert torch.equal(inp["v_pool"][blk, :, s % P], inp["v"][b, :, s]), (b, s)


def test_reference_matches_torch_sdpa_and_the_kernels_emulation():
    B, S, H, K, D, P = 2, 45, 8, 2, 16, 8
    inp = problems.decode_inputs(B, S, H, K, D, P, CPU, seed=1)
    ref = problems.reference_decode(inp["q"], inp["k"], inp["v"])  # (B, H, 1, D) fp32
    q, k, v = (inp[n].float() for n in "qkv")
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    diff = (ref - sdpa).abs().max().item()
    assert diff < 1e-5, f"reference vs torch SDPA (fp32): max diff {diff:.2e}"
    paged = {n: inp[n] for n in ("q", "k_pool", "v_pool", "block_tables", "seq_lens")}
    splits = gdecode.auto_splits(gk.launch_plan("wmma", B, H, K, 1, D, 1)["blocks_per_split"], 3, 6)
    for kernel in gk.ATTENTION_METHODS:
        emu = torch.from_numpy(em.paged_attention(**paged, num_splits=splits, kernel=kernel))
        err = problems.output_error(emu.half(), ref)
        assert err["ok"], f"{kernel} emulation, {splits} splits vs reference: {err}"


def test_output_error_is_scale_free():
    ref = torch.full((1, 2, 1, 4), 1e-3)
    assert problems.output_error(torch.zeros_like(ref), ref)["rel_err"] == pytest.approx(1.0)
    assert not problems.output_error(torch.zeros_like(ref), ref)["ok"], "a zero output must fail"
    assert problems.output_error(ref.clone(), ref) == {
        "max_abs_diff": 0.0,
        "rel_err": 0.0,
        "ok": True,
    }
    with pytest.raises(ValueError, match="differ"):
        problems.output_error(ref[:, :1], ref)
    with pytest.raises(ValueError, match="expected T = 1"):
        problems.reference_decode(
            torch.zeros(1, 2, 3, 4), torch.zeros(1, 1, 5, 4), torch.zeros(1, 1, 5, 4)
        )


class _Recorder:
    """Stands in for the CuPy launcher: records what would run (no GPU needed)."""

    def __init__(self, monkeypatch):
        self.launches = []
        monkeypatch.setattr(gk, "_check_devices", lambda **t: next(iter(t.values())).device)
        monkeypatch.setattr(gk, "_check_tensor_cores", lambda device: None)
        monkeypatch.setattr(gk, "_as_cupy", lambda x: x)
        monkeypatch.setattr(gk, "_launch", self.launch)

    def launch(self, device, file, kernel, grid, block, args, shared_mem=0):
        kept = tuple(a.shape if isinstance(a, torch.Tensor) else a for a in args)
        self.launches.append((file, kernel, tuple(grid), tuple(block), kept, shared_mem))


@pytest.mark.parametrize("method", gk.ATTENTION_METHODS)
@pytest.mark.parametrize(("H", "K", "splits"), [(32, 8, 3), (8, 1, 1), (4, 4, 2)])
def test_bare_launches_repeat_the_public_calls_launches(monkeypatch, method, H, K, splits):
    rec = _Recorder(monkeypatch)
    inp = problems.decode_inputs(2, 40, H, K, 16, 8, CPU)
    paged = {n: inp[n] for n in ("q", "k_pool", "v_pool", "block_tables", "seq_lens")}
    gk.paged_decode_attention(**paged, method=method, num_splits=splits)
    public = list(rec.launches)
    rec.launches.clear()
    gk.paged_decode_launcher(**paged, method=method, num_splits=splits)()
    assert rec.launches == public, f"bare launches {rec.launches}\n vs the call's {public}"
    plan = gk.launch_plan(method, 2, H, K, 1, 16, splits)
    assert public[0][2] == plan["grid"] and plan["blocks_per_split"] * splits == (
        plan["grid"][0] * plan["grid"][1] * plan["grid"][2]
    )


class _Emulator(_Recorder):
    """Runs each launch with the kernels' NumPy emulation, writing the output buffers."""

    def launch(self, device, file, kernel, grid, block, args, shared_mem=0):
        super().launch(device, file, kernel, grid, block, args, shared_mem)
        if kernel == "split_kv_reduce":
            m, l, o, out = args[:4]
            out.copy_(torch.from_numpy(em.split_kv_reduce(m.numpy(), l.numpy(), o.numpy())))
            return
        q, kp, vp, tables, lens, m, l, o = args[:8]
        ns, scale = int(args[14]), float(args[15])
        kind = "wmma" if kernel.endswith("wmma") else "cuda_core"
        parts = em.paged_attention_partials(
            q, kp, vp, tables, lens, num_splits=ns, scale=scale, kernel=kind
        )
        for buf, part in zip((m, l, o), parts, strict=True):
            buf.copy_(torch.from_numpy(part))


def test_one_length_end_to_end_with_emulated_kernels(monkeypatch):
    """The per-S path of bench_decode_attention on the CPU: kernels emulated, timed on CPU."""
    rec = _Emulator(monkeypatch)
    monkeypatch.setattr(
        gdecode, "time_cuda", lambda fns, reps, dev: timing.interleaved(fns, reps, dev)
    )
    row = gdecode._bench_one_length(
        CPU, 40, B=2, H=8, K=2, D=16, block_size=8, methods=list(gk.ATTENTION_METHODS),
        splits=[1, "auto"], reps=1, sm_count=3, copy_bytes_per_s=1e9, spec_bytes_per_s=None,
    )  # fmt: skip
    names = ["cuda_core/1/call", "cuda_core/1", "cuda_core/auto/call", "cuda_core/auto",
             "wmma/1/call", "wmma/1", "wmma/auto/call", "wmma/auto", "sdpa"]  # fmt: skip
    assert list(row["contenders"]) == names
    assert row["bytes"] == gdecode.attention_bytes(2, 8, 2, 40, 16) and row["n_kv_blocks"] == 5
    for name, c in row["contenders"].items():
        assert c["ok"], f"{name}: relative error {c['rel_err']:.2e} vs the fp32 reference"
        assert c["fraction_of_spec"] is None, (name, c)
        assert c["bytes_per_s"] == row["bytes"] / c["median_s"], (name, c)
        assert c["fraction_of_copy"] == c["bytes_per_s"] / 1e9, (name, c)
        if c["timing"] == "kernels":
            assert c["equals_call"], f"{name}: bare launches differ from the call"
    auto = row["contenders"]["wmma/auto"]["num_splits"]
    assert auto == gdecode.auto_splits(2 * 2 * 1, 3, 5) == 2, "B*K*tiles = 4 blocks, 3 SMs -> 2"
    assert len(rec.launches) == 2 * 2 * 8, "warm-up + 1 rep, 8 paged contenders, 2 kernels"


# ---- synthetic results: rows, targets, report, files -------------------------------------------

MACHINE = {
    "gpu_name": "Tesla T4",
    "gpu_spec": gmachine.match_gpu("Tesla T4", 15360 * MiB),
    "compute_capability": "7.5",
    "sm_count": 40,
    "l2_bytes": 4 * MiB,
    "memory_bytes": 15360 * MiB,
    "platform": "Linux",
    "versions": {"driver": "12.4", "cuda_runtime": "12.9", "cupy": "14.0.0", "torch": "2.13.0",
                 "kvlib": "0.1.0"},
}  # fmt: skip


def _synthetic_result(wmma_gemm_s=2.0, wmma_attention_s=1.0, S=16384) -> dict:
    """A result built by the module's own pure parts, with chosen timings (no GPU)."""
    result = report.new_result(
        gresults.SCHEMA,
        "python -m kvlib.bench --gpu --quick",
        copy.deepcopy(MACHINE),
        {"quick": True, "reps": 1},
    )
    n = 4096
    gemm_rows = {"cublas": ggemm.gemm_row([1.0], n, 1.0, 0.0)}
    gemm_rows["wmma"] = ggemm.gemm_row([wmma_gemm_s], n, 1.0, 4e-4)
    gemm_rows["naive"] = ggemm.gemm_row([9.0], n, 1.0, 0.9)  # a wrong kernel
    result["figures"]["gemm"] = {"n": n, "dtype": "float16", "flops": 2 * n**3, "rows": gemm_rows}
    copy_fig = {"nbytes": 256 * MiB, "median_s": 1.0, "bytes_per_s": 10.0}
    result["figures"]["copy"] = copy_fig
    spec = GPUS[MACHINE["gpu_spec"]].bandwidth
    ref = torch.ones(1, 2, 1, 4)
    rows = []
    for length in (1024, S):
        nbytes = 7  # 7 B / 1 s over a 10 B/s copy: fraction 0.7 exactly at 1 s
        ns = gdecode.auto_splits(
            gk.launch_plan("wmma", 4, 32, 8, 1, 128, 1)["blocks_per_split"], 40, 64
        )
        contenders = {}
        for name, t, info in (
            ("wmma/1", 2.0, dict(method="wmma", splits=1, num_splits=1, timing="kernels")),
            ("wmma/auto", wmma_attention_s,
             dict(method="wmma", splits="auto", num_splits=ns, timing="kernels")),
            ("wmma/auto/call", 3.0,
             dict(method="wmma", splits="auto", num_splits=ns, timing="call")),
            ("sdpa", 1.5, dict(method="sdpa", splits=None, num_splits=None, timing="torch")),
        ):  # fmt: skip
            err = problems.output_error(ref * 1.001, ref)
            contenders[name] = gdecode.attention_row(
                [t], nbytes, copy_fig["bytes_per_s"], spec, err, **info
            )
        rows.append({"S": length, "bytes": nbytes, "n_kv_blocks": 64, "contenders": contenders})
    result["figures"]["decode_attention"] = {
        "shape": {"B": 4, "H": 32, "K": 8, "D": 128, "T": 1, "block_size": 16},
        "copy_bytes_per_s": copy_fig["bytes_per_s"],
        "spec_bytes_per_s": spec,
        "rows": rows,
    }
    result["targets"] = gpu.targets(result)
    return result


def test_synthetic_result_validates_formats_and_round_trips(tmp_path):
    result = _synthetic_result()
    text = gpu.format_gpu(result)
    gresults.validate_result(result)
    path = report.write_json(result, tmp_path / "t4-2025-01-01.json")
    assert gresults.load_results(tmp_path) == [json.loads(path.read_text())]
    assert "Tesla T4" in text and "fp16 GEMM 4096^3" in text and "% copy" in text
    assert "WRONG" in text, "the naive row's 0.9 relative error must be flagged"
    assert "PASS" in text and "targets" in text


@pytest.mark.parametrize(
    ("path", "match"),
    [
        ("schema", r"'schema' is missing"),
        ("machine.gpu_name", r"'machine.gpu_name' is missing"),
        ("machine.versions.driver", r"'machine.versions.driver' is missing"),
        ("machine.versions.cupy", r"'machine.versions.cupy' is missing"),
        ("machine.versions.kvlib", r"'machine.versions.kvlib' is missing"),
        ("date", r"'date' is missing"),
        ("command", r"'command' is missing"),
        ("figures", r"'figures' is missing"),
        ("targets", r"'targets' is missing"),
    ],
)
def test_validate_result_names_each_missing_field(path, match):
    result = _synthetic_result()
    *parents, last = path.split(".")
    node = result
    for p in parents:
        node = node[p]
    del node[last]
    with pytest.raises(ValueError, match=match):
        gresults.validate_result(result)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda r: r.update(schema="kvlib.bench/1"), r"'schema' is 'kvlib.bench/1', expected"),
        (lambda r: r["machine"].update(gpu_name=""), r"'machine.gpu_name' must be the GPU's name"),
        (lambda r: r["machine"]["versions"].update(torch=None), r"'machine.versions.torch' must"),
        (lambda r: r.update(date="yesterday"), r"'date' must be an ISO date, got 'yesterday'"),
        (lambda r: r.update(command=""), r"'command' must name what ran"),
        (lambda r: r.update(figures={}), r"'figures' must be a non-empty object"),
        (lambda r: r["figures"]["copy"].update(median_s=float("inf")),
         r"'figures.copy.median_s' must be positive seconds, got inf"),
        (lambda r: r["figures"]["gemm"]["rows"]["wmma"].update(median_s=0.0),
         r"'figures.gemm.rows.wmma.median_s' must be positive seconds, got 0.0"),
        (lambda r: r["figures"]["decode_attention"]["rows"][1]["contenders"]["sdpa"].clear(),
         r"'figures.decode_attention.rows\[1\].sdpa.median_s' must be positive"),
        (lambda r: r["targets"].append({"status": "OK"}), r"'targets' must be a list of targets"),
    ],
)  # fmt: skip
def test_validate_result_rejects_invalid_fields(change, match):
    result = _synthetic_result()
    change(result)
    with pytest.raises(ValueError, match=match):
        gresults.validate_result(result)
    with pytest.raises(ValueError, match="must be a JSON object, got list"):
        gresults.validate_result([])


def test_load_results_reads_a_folder(tmp_path):
    assert gresults.load_results(tmp_path) == []
    report.write_json(_synthetic_result(), tmp_path / "a-good.json")
    bad = _synthetic_result()
    del bad["command"]
    report.write_json(bad, tmp_path / "b-bad.json")
    with pytest.raises(ValueError, match=r"b-bad.json: result field 'command' is missing"):
        gresults.load_results(tmp_path)
    (tmp_path / "b-bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"b-bad.json: Expecting property name"):
        gresults.load_results(tmp_path)
    with pytest.raises(FileNotFoundError, match="no results folder"):
        gresults.load_results(tmp_path / "missing")


def test_shipped_results_are_valid():
    assert gresults.RESULTS_DIR.is_dir() and (gresults.RESULTS_DIR / "README.md").is_file()
    files = sorted(gresults.RESULTS_DIR.glob("*.json"))
    if not files:
        pytest.skip("no GPU result committed in kvlib/gpu/results/ yet")
    results = gresults.load_results()  # raises, naming the file, on any invalid one
    assert len(results) == len(files)
    for r in results:
        assert r["schema"] == gresults.SCHEMA and gresults.summary_rows(r), r["machine"]["gpu_name"]


def test_a_written_result_loads_back_from_a_results_folder(tmp_path):
    """What the shipped-results test does, on a result this test writes."""
    results = [_synthetic_result(), _synthetic_result(wmma_gemm_s=4.0)]
    for i, r in enumerate(results):
        report.write_json(r, tmp_path / f"gpu-{i}.json")
    loaded = gresults.load_results(tmp_path)
    assert loaded == json.loads(json.dumps(results)), "load_results must read every file back"
    assert [t["status"] for t in loaded[1]["targets"]] == ["MISS", "PASS"]
    rows = gresults.summary_rows(loaded[0])
    assert {r["figure"] for r in rows} == {"gemm", "decode attention"}


def test_results_ship_as_package_data():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    globs = data["package-data"]["kvlib"]
    assert "gpu/results/*.json" in globs and "gpu/results/README.md" in globs, globs


def test_format_shows_a_missed_target():
    result = _synthetic_result(wmma_gemm_s=4.0)  # wmma at a quarter of cuBLAS
    text = gpu.format_gpu(result)
    assert "MISS fp16 GEMM: wmma speed / cuBLAS at n=4096 = 0.25" in text, text
    assert "PASS Tensor Core decode attention" in text, text


@pytest.mark.parametrize(
    ("gemm_s", "attention_s", "want"),
    [
        (2.0, 1.0, ["PASS", "PASS"]),  # exactly 0.5 of cuBLAS, exactly 0.7 of copy
        (2.0 * 1.0001, 1.0001, ["MISS", "MISS"]),  # just below both
        (1.0, 0.5, ["PASS", "PASS"]),
    ],
)
def test_targets_at_the_thresholds(gemm_s, attention_s, want):
    result = _synthetic_result(wmma_gemm_s=gemm_s, wmma_attention_s=attention_s)
    ts = gpu.targets(result)
    assert [t["status"] for t in ts] == want, ts
    assert ts[0]["figure"] == "fp16 GEMM" and ts[0]["target"] == ggemm.GEMM_TARGET
    assert ts[1]["metric"] == "fraction of copy bandwidth at S=16384", ts[1]
    assert ts[1]["note"].startswith("wmma/auto"), "the split-KV row, not wmma/1 or the call"


def test_no_attention_target_below_16k():
    result = _synthetic_result(S=8192)
    assert [t["figure"] for t in gpu.targets(result)] == ["fp16 GEMM"]


def test_summary_rows_are_compact():
    result = _synthetic_result()
    rows = gresults.summary_rows(result)
    gemm = [r for r in rows if r["figure"] == "gemm"]
    attn = [r for r in rows if r["figure"] == "decode attention"]
    assert [r["contender"] for r in gemm] == ["cublas", "wmma", "naive"]
    assert len(attn) == 2 * 3, "per S: wmma/1, wmma/auto and sdpa (no /call rows)"
    wmma = next(r for r in attn if r["contender"] == "wmma/auto" and r["size"] == "S=16384")
    assert wmma["fraction"] == pytest.approx(0.7) and wmma["unit"] == "GB/s"
    assert wmma["fraction_of_spec"] == pytest.approx(7 / 320e9), "T4 datasheet 320 GB/s"
    assert {tuple(sorted(r)) for r in rows} == {tuple(sorted(rows[0]))}, "same keys everywhere"


def test_run_gpu_wires_the_figures_into_one_result(monkeypatch):
    """run_gpu's own work (plan, settings, targets, report) with each figure stood in for."""
    figs = _synthetic_result()["figures"]
    calls = {}

    def gemm(dev, n, reps, methods, progress):
        calls["gemm"] = (n, reps, list(methods))
        return figs["gemm"]

    def decode(dev, lengths, reps, methods, copy, spec_bytes_per_s, progress):
        calls["decode"] = (list(lengths), reps, list(methods), copy, spec_bytes_per_s)
        return figs["decode_attention"]

    monkeypatch.setattr(gpu, "require_gpu", lambda: CPU)
    monkeypatch.setattr(gpu, "gpu_machine", lambda dev: copy.deepcopy(MACHINE))
    monkeypatch.setattr(gpu, "copy_bandwidth", lambda dev, reps: figs["copy"])
    monkeypatch.setattr(gpu, "bench_gemm", gemm)
    monkeypatch.setattr(gpu, "bench_decode_attention", decode)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev: (7, 5))
    result = gpu.run_gpu(quick=True, reps=2)
    gresults.validate_result(json.loads(json.dumps(result)))
    assert calls["gemm"] == (1024, 2, list(gk.GEMM_METHODS))
    t4 = GPUS["T4"].bandwidth  # MACHINE is a T4: its datasheet bandwidth is the spec
    assert calls["decode"] == (list(gdecode.QUICK_LENGTHS), 2, list(gk.ATTENTION_METHODS),
                               figs["copy"], t4)  # fmt: skip
    assert result["targets"] == gpu.targets(result) and len(result["targets"]) == 2
    assert result["command"] == "kvlib.bench.gpu.run_gpu(quick=True, reps=2)"
    assert "PASS fp16 GEMM" in gpu.format_gpu(result)


def test_targets_flag_wrong_outputs():
    result = _synthetic_result()
    result["figures"]["gemm"]["rows"]["wmma"]["ok"] = False
    result["figures"]["decode_attention"]["rows"][1]["contenders"]["wmma/auto"]["ok"] = False
    notes = [t["note"] for t in gpu.targets(result)]
    assert all("OUTPUT WRONG" in n for n in notes), notes


# ---- on a GPU ---------------------------------------------------------------------------------


@pytest.mark.gpu
@requires_gpu
def test_time_cuda_times_every_call():
    dev = gmachine.require_gpu()
    x = torch.randn(2**20, device=dev)
    times = gtiming.time_cuda({"a": lambda: x.mul_(1.0), "b": lambda: x.add_(0.0)}, 3, dev)
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert all(t > 0 for ts in times.values() for t in ts), times
    copy = gtiming.copy_bandwidth(dev, 64 * MiB, reps=3)
    assert copy["bytes_per_s"] > 1e9, copy


@pytest.mark.gpu
@requires_gpu
def test_run_gpu_quick_measures_correct_kernels(tmp_path):
    result = gpu.run_gpu(quick=True)
    gresults.validate_result(result)
    for name, r in result["figures"]["gemm"]["rows"].items():
        assert r["ok"], f"gemm {name}: max relative error {r['max_rel_err']:.2e} vs cuBLAS"
        assert all(t > 0 for t in r["times_s"]), (name, r["times_s"])
    for row in result["figures"]["decode_attention"]["rows"]:
        for name, c in row["contenders"].items():
            assert c["ok"], (
                f"S={row['S']} {name}: max diff {c['max_abs_diff']:.2e}, relative "
                f"{c['rel_err']:.2e} vs the fp32 reference"
            )
            assert all(t > 0 for t in c["times_s"]), (row["S"], name, c["times_s"])
            assert c.get("equals_call", True), f"S={row['S']} {name}: bare launch != the call"
    assert result["targets"], "quick runs reach S = 16k: both targets are checked"
    path = report.write_json(result, tmp_path / "gpu.json")
    loaded = gresults.load_results(tmp_path)
    assert len(loaded) == 1 and loaded[0]["machine"]["gpu_name"] == result["machine"]["gpu_name"]
    assert "targets" in gpu.format_gpu(json.loads(path.read_text()))


def test_launch_plan_misuse():
    with pytest.raises(ValueError, match="method must be one of"):
        gk.launch_plan("tensor", 1, 8, 2, 1, 64, 1)
    with pytest.raises(ValueError, match="H=6 must be a multiple of K=4"):
        gk.launch_plan("wmma", 1, 6, 4, 1, 64, 1)
    with pytest.raises(ValueError, match="num_splits must be an int >= 1"):
        gk.launch_plan("cuda_core", 1, 8, 2, 1, 64, 0)


def test_require_gpu_when_cupy_sees_no_gpu(monkeypatch):
    cupy = pytest.importorskip("cupy")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cupy, "is_available", lambda: False)
    with pytest.raises(BenchError, match="CuPy is installed but finds no usable CUDA GPU"):
        gmachine.require_gpu()
