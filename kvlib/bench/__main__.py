"""Command line: `python -m kvlib.bench [--quick] [--gpu] [--sections ...] [--out F] ...`.

Without --gpu: the CPU bench (`kvlib.bench.cpu`), every section of `cpu.SECTIONS` or the ones
named; with --gpu: chapter 10's kernels (`kvlib.bench.gpu`). Prints the report and writes the
result as JSON. A request the machine cannot meet (no GPU, an unknown section) exits with
status 1 and a one-line message, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvlib.bench import cpu
from kvlib.bench.report import write_json
from kvlib.errors import BenchError

DEFAULT_OUT = Path("_build") / "bench" / "bench.json"
DEFAULT_GPU_OUT = DEFAULT_OUT.with_name("gpu.json")  # python -m kvlib.bench --gpu


def main(argv: list[str] | None = None) -> dict:
    """Parse the arguments, run the bench, print the report, write the JSON; return the result."""
    parser = argparse.ArgumentParser(
        prog="python -m kvlib.bench",
        description="Every optimization in kvlib measured side by side.",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (under a minute)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: all cores)"
    )
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per contender")
    parser.add_argument(
        "--sections", nargs="+", choices=list(cpu.SECTIONS), default=None,
        help="run only these sections",
    )  # fmt: skip
    parser.add_argument(
        "--out",
        default=None,
        help=f"JSON path (default {DEFAULT_OUT}; {DEFAULT_GPU_OUT} with --gpu)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--gpu", action="store_true", help="chapter 10's CUDA kernels instead (kvlib.bench.gpu)"
    )
    args = parser.parse_args(argv)
    command = " ".join(["python -m kvlib.bench", *(sys.argv[1:] if argv is None else argv)])
    if args.gpu:
        from kvlib.bench import gpu

        if args.sections is not None or args.threads is not None or args.device != "cpu":
            raise BenchError(
                "--sections, --threads and --device belong to the CPU bench, not to --gpu"
            )
        result = gpu.run_gpu(quick=args.quick, reps=args.reps, quiet=args.quiet, command=command)
        report, out = gpu.format_gpu(result), args.out or DEFAULT_GPU_OUT
    else:
        result = cpu.run(
            quick=args.quick,
            device=args.device,
            threads=args.threads,
            sections=args.sections,
            quiet=args.quiet,
            reps=args.reps,
            command=command,
        )
        report, out = cpu.format_report(result), args.out or DEFAULT_OUT
    print(report)
    print(f"wrote {write_json(result, out)}")
    return result


if __name__ == "__main__":
    try:
        main()
    except BenchError as err:  # a request the machine cannot meet: say so, without a traceback
        sys.exit(f"python -m kvlib.bench: {err}")
