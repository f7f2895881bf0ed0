import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from kvlib.plots import BOOK_WIDTH, FONT, draw_paging, plot_block_sizes, plot_memory_over_time  # noqa: E402
from kvlib.serving import fragmentation_study, sharegpt_like_trace  # noqa: E402

TABLES = {"A": [0, 3, 6], "B": [1, 4], "C": [2, 5]}
LENGTHS = {"A": 10, "B": 5, "C": 7}


def visible_texts(fig) -> list:
    """The texts a drawn figure shows: tick labels only of axes that are on, within the view."""
    ticks, hidden = set(), set()
    shown = []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                ticks |= {id(tick.label1), id(tick.label2)}
            if not ax.axison:
                hidden.add(id(axis.label))
                continue
            lo, hi = sorted(axis.get_view_interval())
            for tick in axis.get_major_ticks():
                if lo <= tick.get_loc() <= hi and tick.label1.get_visible():
                    shown.append(tick.label1)
    for text in fig.findobj(matplotlib.text.Text):
        if id(text) not in ticks and id(text) not in hidden:
            shown.append(text)
    return [t for t in shown if t.get_visible() and t.get_text().strip()]


def readable_problems(fig) -> list[str]:
    """What would be unreadable at the book's width: small text, text off the figure, legends
    over plotted lines, figure legends over an axes."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    scale = min(1.0, BOOK_WIDTH / fig.get_figwidth())
    page = fig.bbox
    problems = []
    for text in visible_texts(fig):
        if text.get_fontsize() * scale < FONT:
            problems.append(f"{text.get_text()!r}: {text.get_fontsize() * scale:.1f} pt")
        box = text.get_window_extent(renderer)
        if (
            box.x0 < page.x0 - 1
            or box.x1 > page.x1 + 1
            or box.y0 < page.y0 - 1
            or box.y1 > page.y1 + 1
        ):
            problems.append(f"{text.get_text()!r} outside the figure")
    for legend in fig.findobj(matplotlib.legend.Legend):
        box = legend.get_window_extent(renderer)
        for ax in fig.axes:
            for line in ax.lines:
                xy = ax.transData.transform(line.get_xydata())  # (n, 2) vertices on the page
                dense = (
                    np.concatenate(  # 50 points along each segment
                        [
                            a + (b - a) * f
                            for a, b in zip(xy[:-1], xy[1:], strict=True)
                            for f in np.linspace(0, 1, 50)[:, None]
                        ]
                    )
                    if len(xy) > 1
                    else xy
                )
                dense = dense.reshape(-1, 2)
                x, y = dense[:, 0], dense[:, 1]
                if ((x > box.x0) & (x < box.x1) & (y > box.y0) & (y < box.y1)).any():
                    problems.append(f"legend over the data of {line.get_label()!r}")
            if legend.axes is None and box.overlaps(ax.bbox):  # a figure legend over an axes
                problems.append("figure legend over an axes")
    return problems


def test_the_check_fails_on_a_bad_figure():
    fig, ax = plt.subplots(figsize=(12, 3))
    ax.plot([0, 1], [0, 1], label="data")
    ax.legend(loc="center")  # right over the line
    ax.set_title("tiny", fontsize=9)  # 9 pt at 12 in is 5.25 pt at 7 in
    problems = readable_problems(fig)
    plt.close(fig)
    assert any("legend over" in p for p in problems), problems
    assert any("'tiny'" in p for p in problems), problems


def test_draw_paging_draws_every_slot_block_and_table_entry():
    fig = draw_paging(TABLES, LENGTHS, 4, 12, refcount={0: 2, 3: 1}, title="pool")
    ax = fig.axes[0]
    rects = [p for p in ax.patches if isinstance(p, Rectangle)]
    n_table = sum(len(t) for t in TABLES.values())
    assert len(rects) == 12 * 4 + 12 + n_table, len(rects)
    hatched = [p for p in rects if p.get_hatch()]
    assert len(hatched) == 1, "only block 0 is shared"
    shaded = [p for p in rects if p.get_width() == 1 and p.get_facecolor()[:3] != (1.0, 1.0, 1.0)]
    assert len(shaded) == sum(LENGTHS.values()), "one shaded slot per cached token"
    texts = [t.get_text() for t in ax.texts]
    assert "0 (x2)" in texts and "3" in texts and "pool" in texts and "A" in texts
    plt.close(fig)


@pytest.mark.parametrize(("num_blocks", "per_row"), [(12, 8), (40, 8), (9, 4)])
def test_draw_paging_keeps_everything_in_view_and_labels_on_their_blocks(num_blocks, per_row):
    tables = {f"s{i}": list(range(i, num_blocks, 4))[:6] for i in range(4)}
    lengths = {name: 4 * len(t) - 1 for name, t in tables.items()}
    fig = draw_paging(tables, lengths, 4, num_blocks, per_row=per_row, title="a title")
    assert fig.get_figwidth() <= BOOK_WIDTH
    assert readable_problems(fig) == []
    ax = fig.axes[0]
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    for p in ax.patches:
        assert x0 <= p.get_x() and p.get_x() + p.get_width() <= x1, "a block outside the plot"
        assert y0 <= p.get_y() and p.get_y() + p.get_height() <= y1, "a block outside the plot"
    outlines = [p for p in ax.patches if p.get_width() == 4 and not p.get_fill()]
    labels = [t for t in ax.texts if t.get_va() == "bottom"]
    assert len(outlines) == len(labels) == num_blocks
    for box, label in zip(outlines, labels, strict=True):  # each id just above its block
        x, y = label.get_position()
        assert x == box.get_x() + 2 and 0 < y - (box.get_y() + 1) < 0.5, (label.get_text(), x, y)
    plt.close(fig)


@pytest.fixture(scope="module")
def runs():
    return fragmentation_study(sharegpt_like_trace(120, seed=0), budget=4096, block_sizes=(1, 16))


def test_memory_over_time_is_readable(runs):
    fig = plot_memory_over_time(runs[:2], 4096, steps=300)
    assert len(fig.axes) == 2 and fig.get_figwidth() <= BOOK_WIDTH
    assert readable_problems(fig) == []
    assert [ax.get_title(loc="left") for ax in fig.axes] == ["max", "pow2"]
    plt.close(fig)


def test_block_sizes_is_readable(runs):
    fig = plot_block_sizes(runs)
    ax1, ax2 = fig.axes
    assert len(ax2.patches) == len(runs), "one bar per policy"
    assert list(ax1.lines[0].get_xdata()) == [1, 16]
    assert readable_problems(fig) == []
    plt.close(fig)
