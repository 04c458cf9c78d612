"""One style for every figure: fonts, column widths, a colour-blind-safe palette, PDF + PNG output.

Use :func:`figure` to get a figure sized for a paper column and :func:`save` to write ``<stem>.pdf`` and
``<stem>.png`` atomically. ``pdf.fonttype = 42`` embeds TrueType fonts, as camera-ready rules ask.
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ftsim.core.io import atomic_write_bytes  # noqa: E402

__all__ = ["COLUMN_WIDTH", "TEXT_WIDTH", "PALETTE", "MARKERS", "apply", "figure", "save", "color"]

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


def figure(ncols: int = 1, nrows: int = 1, width: float = COLUMN_WIDTH, height: float | None = None, **kw):
    """A figure with ``nrows x ncols`` axes, ``width`` inches wide (height defaults to a 4:3 cell)."""
    apply()
    height = height if height is not None else width / ncols * 0.75 * nrows
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), constrained_layout=True, **kw)
    return fig, axes


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
