"""Chapter 10's kernels measured on a GPU: `python -m kvlib.bench --gpu`.

What is measured, on one CUDA GPU:

    copy              device-to-device `dst.copy_(src)` of a buffer much larger than L2: the
                      bandwidth the memory system really delivers (`gpu_timing.copy_bandwidth`)
    gemm              fp16 GEMM, kvlib's kernels vs cuBLAS (`gpu_gemm`)
    decode_attention  decode attention bandwidth from S = 1k to 64k tokens, kvlib's paged
                      kernels vs torch SDPA (`gpu_decode`)

Timing: CUDA events, L2 flushed before each call (`gpu_timing`); the contenders take turns
and the median wins. Correctness: each output is compared with a reference on the same inputs
(attention: the fp32 `reference_decode`; GEMM: cuBLAS), within REL_TOL = 1e-2 relative to the
reference's largest value. `run_gpu` returns the result (`kvlib.bench.report`'s layout,
schema `gpu_results.SCHEMA`), `format_gpu` prints it, `targets` checks it; the target
constants and `load_results` / `summary_rows` (the committed results) are importable from here.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch

from kvlib.bench.gpu_decode import (
    ATTENTION_TARGET,
    ATTENTION_TARGET_S,
    LENGTHS,
    QUICK_LENGTHS,
    attention_targets,
    bench_decode_attention,
)
from kvlib.bench.gpu_gemm import GEMM_TARGET, GEMM_TARGET_N, bench_gemm, gemm_target
from kvlib.bench.gpu_machine import gpu_machine, require_gpu
from kvlib.bench.gpu_results import SCHEMA, load_results, summary_rows
from kvlib.bench.gpu_timing import copy_bandwidth
from kvlib.bench.report import format_targets, new_result
from kvlib.gpu import kernels as gk
from kvlib.registry import GPUS
from kvlib.timing import check_reps

# what chapter 10 reads from here: the run, its report, its targets and the committed results
__all__ = [
    "ATTENTION_TARGET",
    "ATTENTION_TARGET_S",
    "GEMM_TARGET",
    "GEMM_TARGET_N",
    "format_gpu",
    "load_results",
    "run_gpu",
    "summary_rows",
    "targets",
]


def targets(result: dict) -> list[dict]:
    """GEMM wmma >= 50% of cuBLAS at 4096^3; split-KV wmma >= 70% of copy at each S >= 16k."""
    figs = result["figures"]
    out = gemm_target(figs["gemm"]) if "gemm" in figs else []
    if "decode_attention" in figs:
        out += attention_targets(figs["decode_attention"])
    return out


def _plan(quick: bool) -> dict:
    """Sizes: quick (under a minute: GEMM 1024, S up to 16k, 3 reps) or full."""
    if quick:
        return {"reps": 3, "gemm_n": 1024, "lengths": QUICK_LENGTHS}
    return {"reps": 10, "gemm_n": 4096, "lengths": LENGTHS}


def run_gpu(
    quick: bool = False,
    reps: int | None = None,
    command: str | None = None,
    quiet: bool = True,
    gemm_methods: Iterable[str] = gk.GEMM_METHODS,
) -> dict:
    """Measure copy, GEMM and decode attention on this machine's GPU; return the result dict.

    BenchError without a CUDA GPU and CuPy. reps: timed repetitions per contender (default 3
    quick, 10 full). command: what to record as the command that ran.
    """
    dev = require_gpu()
    plan = _plan(quick)
    reps = check_reps(plan["reps"] if reps is None else reps)
    gemm_methods = list(gemm_methods)
    attention_methods = list(gk.ATTENTION_METHODS)
    if torch.cuda.get_device_capability(dev) < gk.MIN_TENSOR_CORE_CC:  # no WMMA before sm_75
        gemm_methods = [m for m in gemm_methods if m != "wmma"]
        attention_methods.remove("wmma")
    machine = gpu_machine(dev)
    spec = GPUS[machine["gpu_spec"]].bandwidth if machine["gpu_spec"] else None
    settings = {
        "quick": quick,
        "reps": reps,
        "gemm_n": plan["gemm_n"],
        "gemm_methods": gemm_methods,
        "attention_methods": attention_methods,
        "lengths": list(plan["lengths"]),
    }
    result = new_result(
        SCHEMA, command or f"kvlib.bench.gpu.run_gpu(quick={quick}, reps={reps})", machine, settings
    )
    from tqdm.auto import tqdm

    bar = tqdm(total=2 + len(plan["lengths"]), disable=quiet, desc="kvlib.bench.gpu")
    figs = result["figures"]
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            bar.set_postfix_str("copy")
            figs["copy"] = copy_bandwidth(dev, reps=reps)
            bar.update()
            bar.set_postfix_str("GEMM")
            figs["gemm"] = bench_gemm(dev, plan["gemm_n"], reps, gemm_methods, bar.update)
            bar.set_postfix_str("decode attention")
            figs["decode_attention"] = bench_decode_attention(
                dev,
                plan["lengths"],
                reps=reps,
                methods=attention_methods,
                copy=figs["copy"],
                spec_bytes_per_s=spec,
                progress=bar.update,
            )
    finally:
        bar.close()
    result["targets"] = targets(result)
    result["elapsed_s"] = time.perf_counter() - t0
    return result


# ---- report -------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def format_gpu(result: dict) -> str:
    """The printed tables: GEMM TFLOP/s, decode attention GB/s per S, targets PASS/MISS."""
    m, s, figs = result["machine"], result["settings"], result["figures"]
    v = m["versions"]
    lines = [
        f"kvlib.bench.gpu on {m['gpu_name']} (sm_{m['compute_capability'].replace('.', '')}, "
        f"{m['sm_count']} SMs, L2 {m['l2_bytes'] / 2**20:.0f} MiB, "
        f"{m['memory_bytes'] / 2**30:.1f} GiB; datasheet entry {m.get('gpu_spec')})",
        f"driver {v['driver']}, CUDA runtime {v['cuda_runtime']}, CuPy {v['cupy']}, "
        f"torch {v['torch']}, kvlib {v['kvlib']}; {result['date']}; reps={s['reps']}, "
        f"quick={s['quick']}",
    ]
    if "copy" in figs:
        c = figs["copy"]
        lines.append(
            f"\ncopy: {c['nbytes'] / 2**20:.0f} MiB buffer, {c['bytes_per_s'] / 1e9:.0f} GB/s "
            "(bytes read + written)"
        )
    if "gemm" in figs:
        g = figs["gemm"]
        lines.append(f"\nfp16 GEMM {g['n']}^3")
        lines.append(f"{'method':>10} {'TFLOP/s':>9} {'vs cuBLAS':>10} {'rel err':>9}")
        for name, r in g["rows"].items():
            flag = "" if r["ok"] else "  WRONG"
            lines.append(
                f"{name:>10} {r['tflops']:9.2f} {_pct(r['ratio_to_cublas']):>10} "
                f"{r['max_rel_err']:9.1e}{flag}"
            )
    if "decode_attention" in figs:
        a = figs["decode_attention"]
        sh = a["shape"]
        lines.append(
            f"\ndecode attention, B={sh['B']} H={sh['H']} K={sh['K']} D={sh['D']} "
            f"block {sh['block_size']} (bytes: K/V read + q read + out written)"
        )
        lines.append(
            f"{'S':>6} {'contender':<22} {'splits':>6} {'GB/s':>7} {'% copy':>7} "
            f"{'% spec':>7} {'rel err':>8}"
        )
        for row in a["rows"]:
            for name, c in row["contenders"].items():
                flag = "" if c["ok"] else "  WRONG"
                if c.get("equals_call") is False:
                    flag += "  differs from the call"
                ns = "-" if c["num_splits"] is None else str(c["num_splits"])
                lines.append(
                    f"{row['S']:>6} {name:<22} {ns:>6} {c['bytes_per_s'] / 1e9:7.0f} "
                    f"{_pct(c['fraction_of_copy']):>7} {_pct(c['fraction_of_spec']):>7} "
                    f"{c['rel_err']:8.1e}{flag}"
                )
    lines += format_targets(result["targets"])
    if "elapsed_s" in result:
        lines.append(f"\nelapsed {result['elapsed_s']:.1f} s")
    return "\n".join(lines)
