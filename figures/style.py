"""One style for every figure: fonts, column widths, a colour-blind-safe palette, PDF + PNG output.

Use :func:`figure` (or :func:`new_figure`) to get a figure sized for a paper column, :func:`legend_below` /
:func:`legend_right` to keep legends off the data, :func:`stats_of` / :func:`spread_note` for mean +- sample s.d.
and the words that say what a bar is, :func:`finish` once a figure is complete, and :func:`save` to write
``<stem>.pdf`` and ``<stem>.png`` atomically. ``pdf.fonttype = 42`` embeds TrueType fonts, as camera-ready rules ask.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable, Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.transforms import offset_copy  # noqa: E402

from ftsim.core.io import atomic_write_bytes  # noqa: E402
from ftsim.core.tables import Stats, summarize  # noqa: E402

__all__ = ["COLUMN_WIDTH", "TEXT_WIDTH", "PALETTE", "MARKERS", "apply", "new_figure", "figure", "save", "color",
           "stats_of", "spread_note", "legend_below", "finish", "legend_right", "dodge"]

COLUMN_WIDTH = 3.25  # inches: one column of a two-column paper
TEXT_WIDTH = 6.75  # inches: full text width

# Okabe & Ito (2008) colour-blind-safe palette.
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]

RC = {
    "pdf.fonttype": 42,
    "ps.fonttype": 42,
    "font.family": "sans-serif",
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "legend.fontsize": 7,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.5,
    "lines.linewidth": 1.2,
    "lines.markersize": 4,
    "legend.frameon": False,
    "savefig.dpi": 300,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.02,
    "axes.prop_cycle": matplotlib.cycler(color=PALETTE),
}


def apply() -> None:
    matplotlib.rcParams.update(RC)


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def new_figure(width: float = COLUMN_WIDTH, height: float | None = None) -> Figure:
    """An empty figure with constrained layout and its own Agg canvas, not registered with pyplot (so building
    many figures in tests keeps no global state; ``fig.canvas.draw()`` renders it)."""
    apply()
    fig = Figure(figsize=(width, height if height is not None else width * 0.75), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure(ncols: int = 1, nrows: int = 1, width: float = COLUMN_WIDTH, height: float | None = None, **kw):
    """A figure with ``nrows x ncols`` axes, ``width`` inches wide (height defaults to a 4:3 cell)."""
    height = height if height is not None else width / ncols * 0.75 * nrows
    fig = new_figure(width, height)
    axes = fig.subplots(nrows, ncols, **kw)
    return fig, axes


def stats_of(groups: Iterable[Iterable[float]], scale: float = 1.0) -> tuple:
    """Per group: (means, sample s.d.s, ns) as arrays, through :func:`ftsim.core.tables.summarize` (ddof = 1; the
    s.d. is NaN for n = 1, so no error bar or band is drawn for a single value)."""
    st: list[Stats] = [summarize(scale * float(v) for v in g if v is not None) for g in groups]
    return (np.array([s.mean for s in st]), np.array([s.std for s in st]), np.array([s.n for s in st]))


def spread_note(ns: Iterable[int], unit: str, units: str | None = None) -> str:
    """What an error bar or band is, for a legend title or an axis note: ``"mean ± sample s.d., 5 seeds"``
    (``"2-5 seeds"`` when groups differ; ``"one seed: no spread"`` when every group has one value)."""
    ns = sorted({int(n) for n in ns if n})
    units = units or unit + "s"
    if not ns:
        return "no values"
    if ns[-1] == 1:
        return f"one {unit} per point: no spread"
    count = f"{ns[0]} {units}" if len(ns) == 1 else f"{ns[0]}–{ns[-1]} {units}"
    return f"mean ± sample s.d., {count}"


def legend_below(ax, handles: Sequence | None = None, labels: Sequence[str] | None = None, ncol: int = 2, **kw):
    """The legend of ``ax`` outside it, centred under its x label, so it can never cover the data; constrained
    layout makes room for it. Call :func:`finish` once the figure is complete: it moves every such legend just
    below its axes' tick and axis labels."""
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    kw = {"fontsize": 6.5, "title_fontsize": 6.5, "handlelength": 2.2, "columnspacing": 1.0, **kw}
    leg = ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), bbox_transform=ax.transAxes,
                    ncol=ncol, borderaxespad=0.0, **kw)
    leg._ftsim_below = True  # noqa: SLF001 -- found again by finish()
    return leg


def finish(fig: Figure, pad_points: float = 4.0) -> Figure:
    """Place the legends of :func:`legend_below` under their axes' x labels (measured on a first layout pass:
    label heights in points do not change with the layout), so that panels of a row stay aligned."""
    below = [(ax, ax.get_legend()) for ax in fig.axes if getattr(ax.get_legend(), "_ftsim_below", False)]
    if not below:
        return fig
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax, leg in below:
        xaxis = ax.xaxis.get_tightbbox(renderer)
        drop = max(0.0, ax.bbox.y0 - xaxis.y0) * 72.0 / fig.dpi if xaxis is not None else 0.0
        leg.set_bbox_to_anchor((0.5, 0.0), transform=offset_copy(ax.transAxes, fig=fig, y=-(drop + pad_points),
                                                                  units="points"))
    return fig


def legend_right(ax, handles: Sequence | None = None, labels: Sequence[str] | None = None, **kw):
    """A legend outside the axes, to the right, top-aligned: it can never cover the data. Constrained layout
    makes room for it."""
    args = (handles, labels) if handles is not None else ()
    kw = {"loc": "upper left", "bbox_to_anchor": (1.02, 1.0), "borderaxespad": 0.0, "handlelength": 2.2,
          "alignment": "left", **kw}
    return ax.legend(*args, **kw)


def dodge(x, index: int, count: int, step: float, log: bool = False):
    """x positions of series ``index`` of ``count``, spread by ``step`` (a factor on a log axis) so that markers
    at the same x do not hide each other."""
    off = index - (count - 1) / 2
    x = np.asarray(x, float)
    return x * step ** off if log else x + step * off


def save(fig, stem: str | Path) -> list[Path]:
    """Write ``stem.pdf`` and ``stem.png`` atomically, close the figure, return the paths."""
    stem = Path(stem)
    paths = []
    for ext in ("pdf", "png"):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext)
        path = stem.with_suffix("." + ext)
        atomic_write_bytes(path, buf.getvalue())
        paths.append(path)
    plt.close(fig)
    return paths
