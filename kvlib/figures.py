"""Is a figure readable at the book's width? What matplotlib can tell, checked.

The book shows figures at most `width_in` inches wide (about 7), so a wider figure is scaled
down, and its fonts with it. Jupyter saves a figure cropped to the box around everything drawn
(`bbox_inches="tight"`), so that box is the picture. `figure_problems(fig)` draws the figure
and lists, as sentences:

- text that renders below `min_pt` points once the picture is scaled to the book's width
  (font size * min(1, width_in / picture width));
- with tight=False (a figure saved as sized), a title, axis label or tick label outside it;
- a legend that covers data (a line's points or its segments between them, a scatter point, a
  bar or other patch) or covers a title, an axis label or a tick label.

Everything is compared in display coordinates after `fig.canvas.draw()`, so log axes, twin
axes and figure legends are handled as they render. Images (heatmaps) are not data here: a
legend is not expected on one. `check_figure(fig)` raises `KVLibValueError` listing every problem.
"""

from __future__ import annotations

import numpy as np
from matplotlib.axes import Axes
from matplotlib.collections import Collection, PathCollection
from matplotlib.figure import Figure
from matplotlib.legend import Legend
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.text import Text
from matplotlib.transforms import Bbox

from kvlib.errors import KVLibTypeError, KVLibValueError

BOOK_WIDTH_IN = 7.0  # the widest a figure is shown in the book
MIN_PT = 8.0  # the smallest readable font at that width
SEGMENT_SAMPLES = 16  # points checked along each line segment, between its data points
PAD_PX = 1.0  # rounding slack, in pixels, for "inside the figure" and "overlaps"


def _shown(artist) -> bool:
    """Visible, and in a visible parent chain as far as matplotlib records it."""
    return artist.get_visible() and (artist.axes is None or artist.axes.get_visible())


def _texts(fig: Figure) -> list[Text]:
    """Every visible, non-empty text of the figure (titles, labels, tick labels, legends...)."""
    return [t for t in fig.findobj(Text) if _shown(t) and t.get_text().strip()]


def _tick_labels(ax: Axes) -> list[Text]:
    """The tick labels ax draws: visible, non-empty, at a tick inside the view limits."""
    out = []
    for axis in (ax.xaxis, ax.yaxis):
        lo, hi = sorted(axis.get_view_interval())
        for tick in axis.get_major_ticks() + axis.get_minor_ticks():
            if not (lo - 1e-12 * abs(hi - lo) <= tick.get_loc() <= hi + 1e-12 * abs(hi - lo)):
                continue
            for label in (tick.label1, tick.label2):
                if label.get_visible() and label.get_text().strip():
                    out.append(label)
    return out


def _axes_texts(ax: Axes) -> list[tuple[str, Text]]:
    """(what, text) for the titles, axis labels and drawn tick labels of ax."""
    named = [("title", ax.title), ("x label", ax.xaxis.label), ("y label", ax.yaxis.label)]
    named += [("tick label", t) for t in _tick_labels(ax)]
    return [(what, t) for what, t in named if t.get_visible() and t.get_text().strip()]


def _line_points(line: Line2D) -> np.ndarray:
    """Display coordinates of a line's data points and of points along its segments, (n, 2)."""
    xy = np.column_stack([line.get_xdata(orig=False), line.get_ydata(orig=False)]).astype(float)
    xy = line.get_transform().transform(xy)  # (n, 2) pixels
    xy = xy[np.isfinite(xy).all(axis=1)]
    if line.get_linestyle() in ("None", "none", " ", "") or len(xy) < 2:
        return xy
    t = np.linspace(0.0, 1.0, SEGMENT_SAMPLES)[None, :, None]  # (1, s, 1)
    seg = xy[:-1, None, :] * (1 - t) + xy[1:, None, :] * t  # (n-1, s, 2)
    return np.concatenate([xy, seg.reshape(-1, 2)])


def _inside(points: np.ndarray, box: Bbox) -> np.ndarray:
    """Which points (n, 2) lie strictly inside box (shrunk by PAD_PX)."""
    return (
        (points[:, 0] > box.x0 + PAD_PX)
        & (points[:, 0] < box.x1 - PAD_PX)
        & (points[:, 1] > box.y0 + PAD_PX)
        & (points[:, 1] < box.y1 - PAD_PX)
    )


def _overlap(a: Bbox, b: Bbox) -> bool:
    """The boxes share more than PAD_PX pixels in both directions."""
    return min(a.x1, b.x1) - max(a.x0, b.x0) > PAD_PX and min(a.y1, b.y1) - max(a.y0, b.y0) > PAD_PX


def _covers_area(coll: Collection, box: Bbox) -> bool:
    """Whether a filled collection (fill_between, bars drawn as polygons) reaches into box: a
    5 x 5 grid of points inside the box tested against each of its paths."""
    gx = np.linspace(box.x0 + PAD_PX, box.x1 - PAD_PX, 5)
    gy = np.linspace(box.y0 + PAD_PX, box.y1 - PAD_PX, 5)
    grid = np.stack(np.meshgrid(gx, gy), axis=-1).reshape(-1, 2)  # (25, 2) pixels
    transform = coll.get_transform()
    return any(path.contains_points(grid, transform).any() for path in coll.get_paths())


def _legends(fig: Figure) -> list[Legend]:
    found = list(fig.legends)
    for ax in fig.axes:
        if ax.get_legend() is not None:
            found.append(ax.get_legend())
    return [leg for leg in found if leg.get_visible()]


def _legend_covers(fig: Figure, legend: Legend, renderer) -> list[str]:
    """What the legend's box covers: data of any axes, or their titles, labels, tick labels."""
    box = legend.get_window_extent(renderer)
    problems = []
    for i, ax in enumerate(fig.axes):
        where = f"axes {i}" + (f" ({ax.get_title()!r})" if ax.get_title() else "")
        clip = ax.get_window_extent(renderer)  # data outside the axes is clipped, not drawn
        for line in ax.get_lines():
            if not line.get_visible():
                continue
            pts = _line_points(line)
            if line.get_clip_on():
                pts = pts[_inside(pts, clip)]
            if _inside(pts, box).any():
                problems.append(f"the legend covers line {line.get_label()!r} of {where}")
        for coll in ax.collections:
            if not coll.get_visible():
                continue
            if isinstance(coll, PathCollection):  # scatter: one marker at each offset
                offsets = np.asarray(coll.get_offsets(), dtype=float)
                pts = coll.get_offset_transform().transform(offsets)
                if _inside(pts[_inside(pts, clip)], box).any():
                    problems.append(f"the legend covers points {coll.get_label()!r} of {where}")
            elif _covers_area(coll, box):
                problems.append(f"the legend covers a filled area of {where}")
        for patch in ax.patches:
            if isinstance(patch, Patch) and patch.get_visible() and patch is not ax.patch:
                extent = Bbox.intersection(patch.get_window_extent(renderer), clip)
                if extent is not None and _overlap(box, extent):
                    problems.append(f"the legend covers a bar or patch of {where}")
                    break
        for what, text in _axes_texts(ax):
            if text.figure is not None and _overlap(box, text.get_window_extent(renderer)):
                problems.append(f"the legend covers the {what} {text.get_text()!r} of {where}")
    return problems


def figure_problems(
    fig: Figure, width_in: float = BOOK_WIDTH_IN, min_pt: float = MIN_PT, tight: bool = True
) -> list[str]:
    """Every readability problem of fig at a book width of width_in inches (empty: none).

    tight=True (how Jupyter's inline backend saves a figure, so how the book shows it): the
    picture is the figure cropped or grown to the box around everything drawn, so nothing is
    cut off and that box's width is what gets scaled. tight=False: the picture is the figure
    as sized, and text outside it is reported cut off.
    """
    if not isinstance(fig, Figure):
        raise KVLibTypeError(f"fig must be a matplotlib Figure, got {type(fig).__name__}")
    if not (width_in > 0 and min_pt > 0):
        raise KVLibValueError(f"width_in and min_pt must be > 0, got {width_in!r} and {min_pt!r}")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    shown_w = fig.get_tightbbox(renderer).width if tight else fig.get_figwidth()  # inches
    scale = min(1.0, width_in / shown_w)
    problems = []
    small = sorted({t.get_fontsize() for t in _texts(fig) if t.get_fontsize() * scale < min_pt})
    if small:
        examples = [t.get_text() for t in _texts(fig) if t.get_fontsize() == small[0]][:3]
        problems.append(
            f"text of {small[0]:g} pt (e.g. {examples}) renders at {small[0] * scale:.1f} pt in a "
            f"{shown_w:.3g}-inch picture shown {min(shown_w, width_in):.3g} inches wide; "
            f"needs >= {min_pt:g}"
        )
    frame = fig.bbox
    for i, ax in enumerate(fig.axes if not tight else []):
        if not ax.get_visible():
            continue
        for what, text in _axes_texts(ax):
            b = text.get_window_extent(renderer)
            if (
                b.x0 < frame.x0 - PAD_PX
                or b.y0 < frame.y0 - PAD_PX
                or b.x1 > frame.x1 + PAD_PX
                or b.y1 > frame.y1 + PAD_PX
            ):
                problems.append(f"the {what} {text.get_text()!r} of axes {i} is cut off")
    for legend in _legends(fig):
        problems += _legend_covers(fig, legend, renderer)
    return list(dict.fromkeys(problems))  # each problem once, in order


def check_figure(
    fig: Figure, width_in: float = BOOK_WIDTH_IN, min_pt: float = MIN_PT, tight: bool = True
) -> None:
    """KVLibValueError listing every problem `figure_problems` finds; None if it reads well."""
    problems = figure_problems(fig, width_in, min_pt, tight)
    if problems:
        raise KVLibValueError(
            "figure not readable at the book's width:\n  " + "\n  ".join(problems)
        )
