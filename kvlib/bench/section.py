"""What a section of the CPU bench is: a module with `run` and (optionally) `format`.

    run(quick: bool) -> dict                      or
    run(quick: bool, settings: Settings) -> dict  when it needs the device, reps or threads

returns the section's figure: any JSON-able dict. Targets (dicts made by
`kvlib.bench.report.target`) go in its "targets" list, or, for a section without one, are the
rows of its "rows" list that are targets; `kvlib.bench.cpu.run` moves them into the run's
target table. `format(figure) -> list[str]` gives the section's lines of the printed report;
a section without one is printed by `default_format`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from types import ModuleType

import torch

from kvlib.bench.report import fmt, is_target
from kvlib.errors import KVLibTypeError


@dataclass(frozen=True)
class Settings:
    """What every section of one run shares: device, timed repetitions, torch CPU threads."""

    device: torch.device
    reps: int
    threads: int


def run_section(module: ModuleType, quick: bool, settings: Settings) -> tuple[dict, list[dict]]:
    """Run one section; return (its figure without targets, its targets)."""
    wants_settings = "settings" in inspect.signature(module.run).parameters
    figure = module.run(quick, settings=settings) if wants_settings else module.run(quick)
    if not isinstance(figure, dict):
        raise KVLibTypeError(
            f"{module.__name__}.run must return a dict, got {type(figure).__name__}"
        )
    if "targets" in figure:
        targets = figure.pop("targets")
    else:
        targets = [row for row in figure.get("rows", []) if is_target(row)]
    return figure, targets


def format_section(module: ModuleType, name: str, figure: dict) -> list[str]:
    """The section's report lines: its own `format`, else `default_format`."""
    own = getattr(module, "format", None)
    return own(figure) if own is not None else default_format(name, figure)


def default_format(name: str, figure: dict) -> list[str]:
    """A section's lines when it has no `format`: its rows (target rows are in the target
    table), each as `key=value` pairs with numbers through `fmt`, or a note it was skipped."""
    lines = [f"\n{name}"]
    if "skipped" in figure:
        return lines + [f"  skipped: {figure['skipped']}"]
    for row in figure.get("rows", []):
        if is_target(row) or not isinstance(row, dict):
            continue
        cells = [f"{k}={_cell(v)}" for k, v in row.items() if not isinstance(v, list | dict)]
        lines.append("  " + " ".join(cells))
    return lines


def _cell(value: object) -> str:
    if isinstance(value, float):
        return fmt(value)
    return str(value)
