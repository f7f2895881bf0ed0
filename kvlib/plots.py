"""Figures the chapters draw, sized for the book: 7 inches wide, no text under 8 points.

`draw_paging` draws a paged KV pool and the block tables that index it (chapter 5);
`plot_memory_over_time` and `plot_block_sizes` draw `kvlib.serving` simulation results.
Each function returns the `matplotlib.figure.Figure` it made and shows nothing; a notebook
cell calls `plt.show()`. Block and slot geometry is in slot units: one slot is a unit square.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.patches import Rectangle

BOOK_WIDTH = 7.0  # inches: the width of the book's text column
FONT = 8  # points: the smallest text a figure uses
COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]


def draw_paging(
    tables: dict[str, list[int]],
    lengths: dict[str, int],
    block_size: int,
    num_blocks: int,
    *,
    refcount: dict[int, int] | None = None,
    title: str = "",
    per_row: int = 8,
):
    """The physical pool (top) and each sequence's logical blocks (below).

    Pool: `per_row` blocks per line, each labelled with its id above it; a slot holding a
    token is shaded in its owner's colour, a block held by more than one table is hatched and
    its label says how many (x2, x3, ...). Tables: one line per sequence, logical block j
    drawn as a box labelled with the physical block that holds it.
    """
    refcount = refcount or {}
    owner: dict[int, tuple[int, int]] = {}  # block -> (first owner's index, slots filled)
    for s, (name, table) in enumerate(tables.items()):
        for j, blk in enumerate(table):
            filled = min(max(lengths[name] - j * block_size, 0), block_size)
            first, most = owner.get(blk, (s, 0))
            owner[blk] = (first, max(most, filled))
    cell = block_size + 1  # a block and a one-slot gap
    pool_rows = -(-num_blocks // per_row)
    longest = max((len(t) for t in tables.values()), default=0)
    width = max(per_row, longest) * cell - 1  # slot units
    pitch = 2.4  # each pool line: a block (1 unit), its labels above it, then a gap
    pool_h = pitch * pool_rows
    table_top = -pool_h - 1.2  # a gap, then one line per table, 1.5 units apart
    height = pool_h + 1.2 + 1.5 * len(tables)
    unit = BOOK_WIDTH / (width + 4)  # inches per slot; 4 units of margin for the row names
    title_in = 0.3 if title else 0.0  # inches for the title line
    fig, ax = plt.subplots(figsize=(BOOK_WIDTH, unit * (height + 1) + title_in))
    for blk in range(num_blocks):
        x, y = (blk % per_row) * cell, -pitch * (blk // per_row) - 2.0  # lower-left corner
        s, filled = owner.get(blk, (0, 0))
        for p in range(block_size):
            shade = COLORS[s % len(COLORS)] if p < filled else "white"
            ax.add_patch(Rectangle((x + p, y), 1, 1, fc=shade, ec="gray", lw=0.5, alpha=0.8))
        shared = refcount.get(blk, 1) > 1
        ax.add_patch(
            Rectangle(
                (x, y),
                block_size,
                1,
                fill=False,
                ec="black",
                lw=1.0,
                hatch="//" if shared else None,
            )
        )
        label = f"{blk}" + (f" (x{refcount[blk]})" if shared else "")
        ax.text(x + block_size / 2, y + 1.1, label, ha="center", va="bottom", fontsize=FONT)
    ax.text(-0.5, -1.5, "pool", ha="right", va="center", fontsize=FONT)
    for s, (name, table) in enumerate(tables.items()):
        y = table_top - 1.5 * s - 1.0
        ax.text(-0.5, y + 0.5, name, ha="right", va="center", fontsize=FONT)
        for j, blk in enumerate(table):
            color = COLORS[s % len(COLORS)]
            box = Rectangle((j * cell, y), block_size, 1, fc=color, alpha=0.35, ec="black")
            ax.add_patch(box)
            ax.text(j * cell + block_size / 2, y + 0.5, f"{blk}", ha="center", va="center",
                    fontsize=FONT)  # fmt: skip
    bottom = table_top - 1.5 * len(tables) - 0.2
    ax.set_xlim(-4, width + 0.2)
    ax.set_ylim(bottom, 0.2)
    ax.set_aspect("equal")
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=FONT + 1)
    fig.tight_layout(pad=0.2)
    return fig


def plot_memory_over_time(results, budget: int, *, steps: int = 2000):
    """Token slots reserved and holding tokens per step, one panel per result (stacked)."""
    fig, axes = plt.subplots(
        len(results), 1, figsize=(BOOK_WIDTH, 1.2 + 1.5 * len(results)), sharex=True, sharey=True
    )
    axes = list(axes) if len(results) > 1 else [axes]
    for ax, r in zip(axes, results, strict=True):
        n = min(steps, r.steps)
        t = range(n)
        ax.fill_between(t, r.reserved[:n], color="tab:red", alpha=0.25, label="reserved / held")
        ax.fill_between(t, r.used[:n], color="tab:blue", alpha=0.7, label="holding tokens")
        ax.axhline(budget, color="black", lw=1, ls="--", label="pool")
        ax.set_ylim(0, 1.08 * budget)
        ax.set_ylabel("slots", fontsize=FONT + 1)
        ax.set_title(r.label, loc="left", fontsize=FONT + 1, pad=2)
        ax.tick_params(labelsize=FONT)
    axes[-1].set_xlabel("step", fontsize=FONT + 1)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=3, fontsize=FONT + 1, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    return fig


def plot_block_sizes(results):
    """Waste against block size (paged) beside the contiguous policies' waste, and batch size."""
    by_label = {r.label: r for r in results}
    paged = [r for r in results if r.policy == "paged"]
    contiguous = [r for r in results if r.policy != "paged"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(BOOK_WIDTH, 3.2))
    ax1.plot([r.block_size for r in paged], [100 * r.waste for r in paged], "o-", label="paged")
    for r, style in zip(contiguous, ["--", "-.", ":"], strict=False):
        ax1.axhline(100 * r.waste, ls=style, color="gray", label=f"contiguous {r.label}")
    ax1.set_xscale("log", base=2)
    ax1.set_ylim(0, 100)
    ax1.set_xlabel("block size (slots)", fontsize=FONT + 1)
    ax1.set_ylabel("waste (% of reserved slots)", fontsize=FONT + 1)
    ax1.legend(fontsize=FONT, loc="upper left", bbox_to_anchor=(0, -0.22), ncol=2, frameon=False)
    labels = [r.label for r in contiguous + paged]
    ax2.barh(
        labels,
        [by_label[label].mean_batch for label in labels],
        color=["gray"] * len(contiguous) + ["tab:blue"] * len(paged),
    )
    ax2.invert_yaxis()
    ax2.set_xlabel("requests served at once (mean)", fontsize=FONT + 1)
    for ax in (ax1, ax2):
        ax.tick_params(labelsize=FONT)
    fig.tight_layout(pad=0.3)
    return fig
