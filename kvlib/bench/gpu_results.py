"""GPU results are data: one JSON per GPU run, committed in kvlib/gpu/results/ (package data).

`load_results` reads them back, `validate_result` checks each (the fields every bench result
has, plus the GPU's name, the driver / CUDA / CuPy / torch / kvlib versions and a positive
median time for every measurement), `summary_rows` condenses one into rows chapter 10 prints.
"""

from __future__ import annotations

from pathlib import Path

from kvlib.bench import report
from kvlib.bench.report import field, positive
from kvlib.errors import KVLibValueError

SCHEMA = "kvlib.gpu.bench/1"
RESULTS_DIR = Path(__file__).parents[1] / "gpu" / "results"
VERSION_FIELDS = ("driver", "cuda_runtime", "cupy", "torch", "kvlib")


def validate_result(data: object) -> None:
    """Raise ValueError naming the first missing or invalid field of a GPU bench result."""
    report.validate_result(data, SCHEMA)
    name = field(data, "machine.gpu_name")
    if not isinstance(name, str) or not name:
        raise KVLibValueError(
            f"result field 'machine.gpu_name' must be the GPU's name, got {name!r}"
        )
    for key in VERSION_FIELDS:
        value = field(data, f"machine.versions.{key}")
        if not isinstance(value, str) or not value:
            raise KVLibValueError(
                f"result field 'machine.versions.{key}' must be a version string, got {value!r}"
            )
    figs = data["figures"]
    timed = []
    if "copy" in figs:
        timed.append(("figures.copy", figs["copy"]))
    if "gemm" in figs:
        for name, r in field(data, "figures.gemm.rows").items():
            timed.append((f"figures.gemm.rows.{name}", r))
    if "decode_attention" in figs:
        for i, row in enumerate(field(data, "figures.decode_attention.rows")):
            for name, c in row.get("contenders", {}).items():
                timed.append((f"figures.decode_attention.rows[{i}].{name}", c))
    if not timed:
        raise KVLibValueError("result field 'figures' holds none of copy, gemm, decode_attention")
    for path, r in timed:
        if not isinstance(r, dict) or not positive(r.get("median_s")):
            got = r.get("median_s") if isinstance(r, dict) else r
            raise KVLibValueError(
                f"result field '{path}.median_s' must be positive seconds, got {got!r}"
            )


def load_results(folder: str | Path = RESULTS_DIR) -> list[dict]:
    """Every `*.json` GPU result in folder, sorted by file name, each validated ([] when none)."""
    return report.load_results(folder, validate_result)


def summary_rows(result: dict) -> list[dict]:
    """Compact rows for printing: GEMM per method, decode attention per S and contender.

    Each row: gpu, figure, size, contender, value, unit, fraction (of cuBLAS for GEMM, of the
    copy bandwidth for attention), fraction_of_spec (attention only, None when unknown).
    Decode attention rows are the kernels-only timings and SDPA.
    """
    gpu = result["machine"]["gpu_name"]
    figs = result["figures"]
    rows = []
    if "gemm" in figs:
        n = figs["gemm"]["n"]
        for name, r in figs["gemm"]["rows"].items():
            rows.append(
                {
                    "gpu": gpu,
                    "figure": "gemm",
                    "size": f"n={n}",
                    "contender": name,
                    "value": r["tflops"],
                    "unit": "TFLOP/s",
                    "fraction": r["ratio_to_cublas"],
                    "fraction_of_spec": None,
                }
            )
    if "decode_attention" in figs:
        for row in figs["decode_attention"]["rows"]:
            for name, c in row["contenders"].items():
                if c["timing"] == "call":
                    continue
                rows.append(
                    {
                        "gpu": gpu,
                        "figure": "decode attention",
                        "size": f"S={row['S']}",
                        "contender": name,
                        "value": c["bytes_per_s"] / 1e9,
                        "unit": "GB/s",
                        "fraction": c["fraction_of_copy"],
                        "fraction_of_spec": c["fraction_of_spec"],
                    }
                )
    return rows
