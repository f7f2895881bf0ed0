"""Notebook setup shared by every chapter: seeds, device choice, plot style.

Each chapter's first code cell is the same bootstrap (checked by tests/test_notebooks.py):
it installs kvlib on Colab, then calls `setup()`. `BOOTSTRAP` is that cell's exact source.
"""

from __future__ import annotations

import random

import numpy as np
import torch

REPOSITORY_URL = "https://github.com/kvcache-book/kvcache-book"

BOOTSTRAP = f"""\
# Setup: on Colab, install kvlib from the book's repository; then fix seeds and pick a device.
import sys

if "google.colab" in sys.modules:
    %pip install --quiet "kvlib @ git+{REPOSITORY_URL}"

import kvlib.notebook

device = kvlib.notebook.setup(seed=0)"""


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
