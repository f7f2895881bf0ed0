"""What both benchmarks report, and how a result is written, read back and checked.

A result is one JSON object: schema, date (UTC, ISO), command, machine, settings, figures (the
measurements, one entry per figure) and targets (each figure checked against its target by
`target`, printed PASS or MISS by `format_targets`). `machine_info` and `versions` record
where and with what a run happened; `write_json` / `load_results` store and read results;
`validate_result` checks the fields every result has (each bench adds its own checks).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from kvlib.config import ModelConfig
from kvlib.errors import BenchError, KVLibValueError, MissingFileError

STATUSES = ("PASS", "MISS")


def target(figure: str, metric: str, value: float, op: str, bound: float, note: str = "") -> dict:
    """A figure checked against its target: op is '>=' or '<='."""
    if op not in (">=", "<="):
        raise BenchError(f"op must be '>=' or '<=', got {op!r}")
    ok = value >= bound if op == ">=" else value <= bound
    return {
        "figure": figure,
        "metric": metric,
        "value": value,
        "op": op,
        "target": bound,
        "status": STATUSES[0] if ok else STATUSES[1],
        "note": note,
    }


def is_target(row: object) -> bool:
    """Whether `row` is a dict made by `target` (a figure, a value and PASS or MISS)."""
    return (
        isinstance(row, dict)
        and row.get("status") in STATUSES
        and {"figure", "metric", "value"} <= set(row)
    )


def fmt(x: float) -> str:
    """A measured number for a report: 2 decimals, or 3 significant digits when large or small."""
    if x == 0 or math.isinf(x) or math.isnan(x):
        return str(x)
    if abs(x) >= 1e4 or abs(x) < 1e-2:
        return f"{x:.3g}"
    return f"{x:.2f}"


def format_targets(targets: list[dict]) -> list[str]:
    """Lines of a report's target table: status, figure, metric = value (target op bound)."""
    lines = ["\ntargets"]
    for t in targets:
        note = f"  ({t['note']})" if t.get("note") else ""
        lines.append(
            f"  {t['status']:<4} {t['figure']}: {t['metric']} = {fmt(t['value'])} "
            f"(target {t['op']} {t['target']}){note}"
        )
    return lines


def machine_info(device: torch.device, threads: int) -> dict:
    """Where the run happened: platform, cores, threads, accelerator, load average."""
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
    }
    if hasattr(os, "getloadavg"):
        info["load_average"] = list(os.getloadavg())
    return info


def versions() -> dict:
    """Versions of Python and the libraries measured."""
    out = {"python": platform.python_version(), "torch": torch.__version__}
    out["kvlib"] = getattr(sys.modules.get("kvlib"), "__version__", "unknown")
    for name in ("transformers", "numpy"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def config_dict(config: ModelConfig) -> dict:
    """The shape fields of a model config, as a figure records them."""
    return {
        "vocab_size": config.vocab_size,
        "dim": config.dim,
        "n_layers": config.n_layers,
        "n_heads": config.n_heads,
        "n_kv_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "max_seq_len": config.max_seq_len,
        "n_params": config.n_params,
    }


def new_result(schema: str, command: str, machine: dict, settings: dict) -> dict:
    """An empty result: schema, date (UTC), command, machine, settings, no figures yet."""
    return {
        "schema": schema,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": command,
        "machine": machine,
        "settings": settings,
        "figures": {},
        "targets": [],
    }


# ---- results as files --------------------------------------------------------------------------


def write_json(result: dict, path: str | Path) -> Path:
    """Write the result as JSON (parent folders created); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return path


def positive(x: object) -> bool:
    """Whether x is a finite number > 0 (not a bool): what a time, a rate or a ratio must be."""
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def field(data: dict, path: str) -> object:
    """The value at a dotted path ('machine.versions.torch'); ValueError naming it if missing."""
    node: object = data
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KVLibValueError(f"result field {path!r} is missing")
        node = node[part]
    return node


def validate_result(data: object, schema: str) -> None:
    """Raise ValueError naming the first missing or invalid field every result has.

    schema, date (ISO), command, figures (a non-empty object) and targets (a list of `target`
    dicts, each PASS or MISS).
    """
    if not isinstance(data, dict):
        raise KVLibValueError(f"a bench result must be a JSON object, got {type(data).__name__}")
    if field(data, "schema") != schema:
        raise KVLibValueError(f"result field 'schema' is {data['schema']!r}, expected {schema!r}")
    date = field(data, "date")
    try:
        _dt.datetime.fromisoformat(date)
    except (TypeError, ValueError):
        raise KVLibValueError(f"result field 'date' must be an ISO date, got {date!r}") from None
    command = field(data, "command")
    if not isinstance(command, str) or not command:
        raise KVLibValueError(f"result field 'command' must name what ran, got {command!r}")
    figs = field(data, "figures")
    if not isinstance(figs, dict) or not figs:
        raise KVLibValueError("result field 'figures' must be a non-empty object of measurements")
    tlist = field(data, "targets")
    if not isinstance(tlist, list) or not all(is_target(t) for t in tlist):
        raise KVLibValueError("result field 'targets' must be a list of targets with PASS or MISS")


def load_results(folder: str | Path, validate: Callable[[object], None]) -> list[dict]:
    """Every `*.json` result in folder, sorted by file name, each checked by `validate`.

    [] when the folder holds none; ValueError naming the file when one is not valid JSON or
    fails `validate`; FileNotFoundError when the folder does not exist.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(f"no results folder {folder}")
    out = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
            validate(data)
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            raise KVLibValueError(f"{path.name}: {e}") from e
        out.append(data)
    return out
