"""The CPU bench: every section run on one device and thread count, one result, one report.

`SECTIONS` is the registry: section name -> the module that measures it (see
`kvlib.bench.section` for what such a module provides). `run` runs the chosen sections and
gathers their figures and targets into one result (schema `SCHEMA`, see
`kvlib.bench.report`); `format_report` prints it; `validate_result` checks a result read back.
"""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Iterable
from types import ModuleType

import torch

from kvlib.bench.report import field, format_targets, machine_info, new_result, positive, versions
from kvlib.bench.report import validate_result as validate_common
from kvlib.bench.section import Settings, format_section, run_section
from kvlib.errors import BenchError, KVLibValueError, check_int
from kvlib.timing import check_reps, resolve_device

SCHEMA = "kvlib.bench/1"

# section name -> module (in the order a run measures them); one line adds a section
SECTIONS: dict[str, str] = {
    "generation": "kvlib.bench.generation",
    "hf": "kvlib.bench.huggingface",
    "paged": "kvlib.bench.paged",
    "bandwidth": "kvlib.bench.bandwidth",
    "memory": "kvlib.bench.memory",
    "pretrained": "kvlib.bench.pretrained",
    "quantized": "kvlib.bench.quantized",
    "engine": "kvlib.bench.engine",
}


def section_module(name: str) -> ModuleType:
    """The module registered for section `name` (imported on first use)."""
    if name not in SECTIONS:
        raise BenchError(f"unknown section {name!r}; choose from {list(SECTIONS)}")
    return importlib.import_module(SECTIONS[name])


def run(
    quick: bool = False,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    sections: Iterable[str] | None = None,
    quiet: bool = True,
    reps: int | None = None,
    command: str | None = None,
) -> dict:
    """Run the benchmark; return every measurement, the targets with PASS/MISS, and metadata.

    sections: a subset of SECTIONS (default all). threads: torch CPU threads (default: all
    cores). reps: timed repetitions per contender (default 3 quick, 5 full). command: what to
    record as the command that ran (default: this call, spelled out).
    """
    dev = resolve_device(device)
    sections = list(SECTIONS if sections is None else sections)
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise BenchError(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    if threads is None:
        threads = os.cpu_count() or 1
    check_int("threads", threads, error=BenchError)
    reps = check_reps((3 if quick else 5) if reps is None else reps)
    settings = Settings(device=dev, reps=reps, threads=threads)
    result = new_result(
        SCHEMA,
        command
        or f"kvlib.bench.cpu.run(quick={quick}, device={str(dev)!r}, threads={threads}, "
        f"sections={sections}, reps={reps})",
        machine_info(dev, threads),
        {"quick": quick, "reps": reps, "device": str(dev), "threads": threads},
    )
    result["versions"] = versions()
    from tqdm.auto import tqdm

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    bar = tqdm(total=len(sections), disable=quiet, desc="kvlib.bench")
    t_start = time.perf_counter()
    try:
        with torch.inference_mode():
            for name in sections:
                bar.set_postfix_str(name)
                figure, targets = run_section(section_module(name), quick, settings)
                result["figures"][name] = figure
                result["targets"] += targets
                bar.update()
    finally:
        torch.set_num_threads(previous_threads)
        bar.close()
    result["elapsed_s"] = time.perf_counter() - t_start
    return result


def format_report(result: dict) -> str:
    """The printed tables: each figure's numbers, then every target with PASS or MISS."""
    m, s = result["machine"], result["settings"]
    lines = [
        f"kvlib.bench on {m['device']} ({m['device_name']}), {s['threads']} threads, "
        f"reps={s['reps']}, quick={s['quick']}, load average {m.get('load_average')}"
    ]
    for name, figure in result["figures"].items():
        lines += format_section(section_module(name), name, figure)
    lines += format_targets(result["targets"])
    lines.append(f"\nelapsed {result.get('elapsed_s', 0):.1f} s")
    return "\n".join(lines)


def validate_result(data: object) -> None:
    """Raise ValueError naming the first missing or invalid field of a CPU bench result:
    the fields every result has, the machine's thread count, the versions, known sections,
    and every target's value a finite number."""
    validate_common(data, SCHEMA)
    threads = field(data, "machine.torch_threads")
    if not positive(threads):
        raise KVLibValueError(f"result field 'machine.torch_threads' must be >= 1, got {threads!r}")
    torch_version = field(data, "versions.torch")
    if not isinstance(torch_version, str) or not torch_version:
        raise KVLibValueError(
            f"result field 'versions.torch' must be a version, got {torch_version!r}"
        )
    unknown = sorted(set(data["figures"]) - set(SECTIONS))
    if unknown:
        raise KVLibValueError(f"result field 'figures' holds unknown sections {unknown}")
    for t in data["targets"]:
        if not isinstance(t["value"], int | float) or t["value"] != t["value"]:
            raise KVLibValueError(
                f"target {t['figure']!r}: value must be a number, got {t['value']!r}"
            )
